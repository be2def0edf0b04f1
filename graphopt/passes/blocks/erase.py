"""The ``erase-blocks`` pass: options in, :func:`~graphopt.passes.blocks.eraser.erase_model` out.

Kept small on purpose: importing it (every run registers every pass) must not load the
analysis and numerics that only an erasure run needs.
"""

from __future__ import annotations

import re
from typing import Any

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.calibration import CALIB_OPTION, HOLDOUT_OPTION, calibration_for
from graphopt.registry import GraphPass, PassOption, Stage, register

SCORES = ("removal", "angular")
REPLACEMENTS = ("none", "mean", "linear")
DEFAULTS = {"score": "removal", "replace": "mean"}
_EXPECTED = "expected N (blocks to erase, e.g. 2) or flops=R (0 < R < 1)"


@register
class EraseBlocksPass(GraphPass):
    """Erase whole residual blocks (transformer layers, ResNet blocks) scored on data (lossy)."""

    name = "erase-blocks"
    exact = False
    stage = Stage.PRUNE
    handles_subgraphs = False
    flag = "--erase-blocks"
    flag_metavar = "N|flops=R"
    flag_help = (
        "erase N residual blocks (a transformer layer is one block), or the fewest that "
        "remove a fraction R of FLOPs, the least useful on the --calib data first"
    )
    options = (
        PassOption("count", int, 0, "residual blocks to erase"),
        PassOption("flops", float, 0.0, "fraction of FLOPs to remove (0 < R < 1)"),
        # None: "not set", so the report can say which choices were defaults.
        PassOption(
            "score",
            str,
            None,
            "block importance: removal (output change with the block erased alone, default) "
            "or angular (angular distance between the block's input and output)",
            flag="--block-score",
            choices=SCORES,
        ),
        PassOption(
            "replace",
            str,
            None,
            "what replaces an erased block: none (its input), mean (input + mean "
            "contribution, default) or linear (least-squares x·A + b)",
            flag="--block-replace",
            choices=REPLACEMENTS,
        ),
        CALIB_OPTION,
        PassOption(
            "ridge",
            float,
            1e-3,
            "linear replacement ridge, relative to input energy",
            bounds=(0.0, 1e6),
        ),
        HOLDOUT_OPTION,
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        """``--erase-blocks 2`` or ``--erase-blocks flops=0.25`` as this pass's options."""
        raw = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+", raw):
            if int(raw) < 1:
                raise UserInputError(f"--erase-blocks {text!r}: erase at least 1 block")
            return {"count": int(raw)}
        if match := re.fullmatch(r"flops=([0-9.eE+-]+)", raw):
            try:
                ratio = float(match[1])
            except ValueError:
                ratio = -1.0
            if not 0.0 < ratio < 1.0:
                raise UserInputError(f"--erase-blocks {text!r}: R must be in (0, 1); {_EXPECTED}")
            return {"flops": ratio}
        raise UserInputError(f"--erase-blocks {text!r}: {_EXPECTED}")

    def rewrite(self, model: ir.Model) -> int:
        from graphopt.passes.blocks.eraser import EraseSettings, erase_model

        s = self.settings
        count, flops = s["count"], s["flops"]
        if bool(count) == bool(flops) or count < 0 or not 0.0 <= flops < 1.0:
            raise UserInputError(
                "erase-blocks: give exactly one target, N blocks or flops=R, e.g. --erase-blocks 1"
            )
        choices = {k: s[k] or DEFAULTS[k] for k in DEFAULTS}
        for key, allowed in (("score", SCORES), ("replace", REPLACEMENTS)):
            if choices[key] not in allowed:
                raise UserInputError(
                    f"--block-{key} {choices[key]!r}: choose one of {', '.join(allowed)}"
                )
        defaulted = [k for k in DEFAULTS if not s[k]]
        self.context.note(
            "erase-blocks: "
            + ", ".join(f"{k} {v}" + " (default)" * (k in defaulted) for k, v in choices.items())
        )
        if not s["calib"]:
            raise UserInputError(
                "erase-blocks: blocks are scored on calibration data: pass --calib FILE.npz "
                "(or --calib random to use generated inputs, not recommended)"
            )
        calib = calibration_for(
            "erase-blocks", s["calib"], model, self.context, "the blocks to erase were scored"
        )
        settings = EraseSettings(
            count=count,
            flops=flops,
            score=choices["score"],
            replacement=choices["replace"],
            ridge=s["ridge"],
            holdout=s["holdout"],
        )
        record = erase_model(model, settings, calib, self.context)
        record.defaults = [f"--block-{k}" for k in defaulted]
        record.summary = record.headline()
        self.context.details["erase-blocks"] = record
        return len(record.removed)
