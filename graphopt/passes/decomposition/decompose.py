"""The ``decompose`` pass: options in, :func:`~graphopt.passes.decomposition.decomposer.
decompose_model` out.

Kept small on purpose: importing it (every run registers every pass) must not load the
analysis and numerics that only a decompose run needs.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.calibration import CALIB_OPTION, HOLDOUT_OPTION, calibration_for
from graphopt.refusals import refuse_unchanged
from graphopt.registry import GraphPass, PassOption, Stage, register

TARGETS = ("flops", "ratio")
MODULE_KINDS = ("mlp", "qk", "vo")


def parse_target(text: str) -> tuple[str, float]:
    """``flops=R`` or ``ratio=R`` with 0 < R < 1, else a one-line UserInputError."""
    kind, sep, number = str(text).partition("=")
    kind = kind.strip().lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not sep or kind not in TARGETS or not 0.0 < value < 1.0:
        raise UserInputError(
            f"--decompose {text!r}: expected flops=R (share of the model's FLOPs to remove) "
            "or ratio=R (share of each module's inner dimension) with 0 < R < 1"
        )
    return kind, value


def parse_modules(text: str) -> tuple[str, ...]:
    """``mlp,qk,vo`` (any non-empty subset, in that order), else a one-line UserInputError."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    wrong = [n for n in names if n not in MODULE_KINDS]
    if wrong or not names:
        raise UserInputError(
            f"--modules {text!r}: expected a comma-separated subset of {','.join(MODULE_KINDS)}"
        )
    return tuple(k for k in MODULE_KINDS if k in names)


@register
class DecomposePass(GraphPass):
    """Shrink MLP, Q/K and V/O inner dimensions by MoDeGPT module decomposition (lossy)."""

    name = "decompose"
    exact = False
    stage = Stage.FACTORIZE
    handles_subgraphs = False
    ops = frozenset({"MatMul", "Gemm"})
    flag = "--decompose"
    flag_metavar = "flops=R|ratio=R"
    flag_help = (
        "MoDeGPT module decomposition: remove a share R of the FLOPs (at the calibration "
        "shapes) or of each module's inner dim; needs --calib"
    )
    options = (
        PassOption("flops", float, 0.0, "share of the model's FLOPs to remove (0 < R < 1)"),
        PassOption("ratio", float, 0.0, "share of each selected inner dimension to remove"),
        PassOption(
            "modules",
            str,
            "mlp,qk,vo",
            "which modules: mlp (Nyström), qk (CR), vo (SVD), comma-separated",
            flag="--modules",
            metavar="mlp,qk,vo",
        ),
        # global by default: on MiniLM at flops=0.25 it measured 0.951 held-out cosine
        # against uniform's 0.919 (uniform cuts Q/K and V/O as deep as the MLPs, and
        # attention dims cost more fidelity per FLOP; BENCHMARKS.md, "Factorization").
        PassOption(
            "allocation",
            str,
            "global",
            "share per module kind: global (default; by measured module error per FLOP "
            "removed) or uniform (the same share of every inner dim)",
            flag="--decompose-allocation",
            choices=("uniform", "global"),
        ),
        CALIB_OPTION,
        PassOption(
            "ridge",
            float,
            1.0,
            "leverage-score ridge, relative to mean activation power",
            bounds=(0.0, 1e6),
        ),
        PassOption(
            "damp", float, 0.1, "Nyström refit damping toward the kept rows", bounds=(0.0, 1e6)
        ),
        HOLDOUT_OPTION,
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        """``--decompose flops=0.25`` (or the API's ``decompose=``) as this pass's options."""
        kind, value = parse_target(text)
        return {kind: value}

    def rewrite(self, model: ir.Model) -> int:
        from graphopt.passes.decomposition.decomposer import DecomposeSettings, decompose_model

        s = self.settings
        given = [(k, s[k]) for k in TARGETS if s[k]]
        if len(given) != 1:
            raise UserInputError("decompose: give exactly one target, flops=R or ratio=R")
        kind, value = parse_target(f"{given[0][0]}={given[0][1]}")
        if s["allocation"] not in ("uniform", "global"):
            raise UserInputError(
                f"--decompose-allocation {s['allocation']!r}: choose uniform or global"
            )
        settings = DecomposeSettings(
            kind,
            value,
            parse_modules(s["modules"]),
            s["ridge"],
            s["damp"],
            s["holdout"],
            s["allocation"],
        )
        if not s["calib"]:
            raise UserInputError(
                "decompose: needs calibration data: pass --calib FILE.npz (or --calib random "
                "to use generated inputs, not recommended)"
            )
        calib = calibration_for(
            "decompose", s["calib"], model, self.context, "the decompositions were fitted"
        )
        result, record = decompose_model(model, settings, calib, self.context)
        if not record.decomposed:
            # No module found, or every one left as it was (found unfit, or failing its
            # check): the model would come back unchanged ("0 modules decomposed", exit 0).
            refuse_unchanged(
                model,
                f"decompose {record.target}",
                "decompose",
                record.skipped,
                "module",
                f"no {'/'.join(settings.modules)} module found",
            )
        record.summary = record.headline()
        self.context.note(record.summary)
        self.context.details["decompose"] = record
        if result is not model:
            model.graph = result.graph  # the pass manager works on ``model`` in place
        return len(record.decomposed)
