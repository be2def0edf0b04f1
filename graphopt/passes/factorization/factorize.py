"""The ``factorize`` pass: options in, :func:`~graphopt.passes.factorization.factorizer.
factorize_model` out.

Kept small on purpose: importing it (every run registers every pass) must not load the
numerics that only a factorize run needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.calibration import CALIB_OPTION, HOLDOUT_OPTION, calibration_for
from graphopt.passes.compensation import COMPENSATION_OPTION
from graphopt.passes.factorization.settings import (
    DEFAULT_MULTIPLE,
    METHODS,
    RankRule,
    resolve_method,
    speed_check_mode,
)
from graphopt.passes.sparsity.settings import parse_layers
from graphopt.registry import GraphPass, PassOption, Stage, register

if TYPE_CHECKING:
    from graphopt.passes.calibration.samples import CalibrationSet


@register
class FactorizePass(GraphPass):
    """Replace MatMul/Gemm/Conv weights by two thinner low-rank factors (lossy)."""

    name = "factorize"
    exact = False
    stage = Stage.FACTORIZE
    handles_subgraphs = False
    ops = frozenset({"MatMul", "Gemm", "Conv"})
    flag = "--factorize"
    flag_metavar = "flops=R|energy=E|rank=K|ratio=R"
    flag_help = (
        "replace layers by two low-rank factors: remove a fraction R of the model's FLOPs "
        "(ranks by measured error), keep energy E, rank K, or a ratio R of full rank"
    )
    options = (
        PassOption("rule", str, "", "the rank rule (the --factorize text)"),
        # None, "not set": asvd with calibration data, svd without (see resolve_method).
        PassOption(
            "method",
            str,
            None,
            "svd (weights only) or asvd (activation-aware, needs --calib; the default with it)",
            flag="--factorize-method",
            choices=METHODS,
        ),
        PassOption(
            "layers",
            str,
            "all",
            "which layers: all, ffn, attention or node/weight name globs, comma-separated",
            flag="--factorize-layers",
            metavar="all|ffn|attention|GLOB,...",
        ),
        PassOption(
            "keep_last",
            bool,
            True,
            "leave the last layer (classifier) whole (default true)",
            flag="--factorize-keep-last",
            metavar="true|false",
        ),
        PassOption(
            "speed_check",
            str,
            "on",
            "factorize a layer only if the pair is measured faster in ORT (on, default); off: "
            "FLOPs alone; FILE.onnx: replay the timings an earlier output recorded",
            flag="--factorize-speed-check",
            metavar="on|off|FILE.onnx",
        ),
        # Shared with prune (one flag sets both): there, kept channel counts; here, ranks.
        PassOption(
            "round_to",
            int,
            None,  # None: not given (0 given is refused, not read as "the default")
            f"ranks are multiples of N (default {DEFAULT_MULTIPLE})",
            flag="--round-to",
            metavar="N",
        ),
        COMPENSATION_OPTION,
        CALIB_OPTION,
        HOLDOUT_OPTION,
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        """``--factorize flops=0.25`` (or the API's ``factorize=``) as this pass's options."""
        RankRule.parse(text)  # a malformed rule is an error here, not mid-pipeline
        return {"rule": str(text)}

    def rewrite(self, model: ir.Model) -> int:
        from graphopt.passes.compensation.eora import parse_compensation, require_calibration
        from graphopt.passes.factorization.factorizer import FactorizeSettings, factorize_model

        s = self.settings
        if not s["rule"]:
            raise UserInputError("factorize: give a rank rule, e.g. --factorize flops=0.25")
        if s["round_to"] is not None and s["round_to"] < 1:
            raise UserInputError(f"--round-to {s['round_to']}: expected a positive multiple")
        eora, note = parse_compensation(s["compensation"], "factorize")
        if note:
            self.context.note(note)
        require_calibration(eora, s["calib"], "factorize")
        choices = resolve_method(s["method"], s["calib"])
        self.context.note(choices.note(s["calib"]))
        settings = FactorizeSettings(
            rule=RankRule.parse(s["rule"]),
            method=choices.method,
            layers=parse_layers(s["layers"]),
            keep_last=bool(s["keep_last"]),
            multiple=DEFAULT_MULTIPLE if s["round_to"] is None else s["round_to"],
            speed_check=speed_check_mode(s["speed_check"]),
            holdout=s["holdout"],
            compensation=eora,
        )
        calib = self._calibration(model)
        record = factorize_model(model, settings, calib, self.context)
        record.defaults = list(choices.defaulted)
        if calib is None:
            record.notes.insert(0, "no calibration data: plain SVD, errors are weight errors")
        record.summary = record.headline()
        self.context.details["factorize"] = record
        return len(record.layers)

    def _calibration(self, model: ir.Model) -> CalibrationSet | None:
        source = self.settings["calib"]
        if not source:
            return None
        return calibration_for("factorize", source, model, self.context, "the factors were fitted")
