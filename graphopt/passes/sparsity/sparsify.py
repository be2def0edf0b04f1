"""The ``sparsify`` pass: options in, :func:`~graphopt.passes.sparsity.sparsifier.sparsify_model`
out.

Kept small on purpose: importing it (every run registers every pass) must not load the
numerics that only a sparsify run needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.calibration import CALIB_OPTION, HOLDOUT_OPTION, calibration_for
from graphopt.passes.compensation import COMPENSATION_OPTION
from graphopt.passes.sparsity.settings import (
    ALLOCATIONS,
    CRITERIA,
    DATA_CRITERIA,
    Pattern,
    parse_layers,
    resolve_choices,
)
from graphopt.registry import GraphPass, PassOption, Stage, register

if TYPE_CHECKING:
    from graphopt.passes.calibration.samples import CalibrationSet


@register
class SparsifyPass(GraphPass):
    """Zero weights of MatMul/Gemm/Conv in N:M, block or unstructured patterns (lossy)."""

    name = "sparsify"
    exact = False
    stage = Stage.SPARSIFY
    handles_subgraphs = False
    ops = frozenset({"MatMul", "Gemm", "Conv"})
    flag = "--sparsity"
    flag_metavar = "N:M|block:RxC=S|unstructured=S"
    flag_help = (
        "zero weights along the reduction axis: N:M (2:4), tiles of R outputs x C reduction "
        "elements (block:1x4=0.8), or single weights (unstructured=0.5); stored dense"
    )
    options = (
        PassOption("pattern", str, "", "the sparsity pattern (the --sparsity text)"),
        # criterion and allocation default to None, "not set": resolve_choices then picks the
        # data-aware defaults for a calibration file, data-free ones otherwise.
        PassOption(
            "criterion",
            str,
            None,
            "which weights go (default: reconstruction with a --calib file, else magnitude; "
            "wanda and reconstruction need --calib)",
            flag="--sparsity-criterion",
            choices=CRITERIA,
        ),
        PassOption(
            "allocation",
            str,
            None,
            "share per layer: uniform (default) or global (by measured layer error, "
            "block/unstructured only)",
            flag="--sparsity-allocation",
            choices=ALLOCATIONS,
        ),
        PassOption(
            "layers",
            str,
            "all",
            "which layers: all, ffn, attention or node/weight name globs, comma-separated",
            flag="--sparsity-layers",
            metavar="all|ffn|attention|GLOB,...",
        ),
        PassOption(
            "keep_last",
            bool,
            True,
            "leave the last layer (classifier) dense (default true)",
            flag="--sparsity-keep-last",
            metavar="true|false",
        ),
        COMPENSATION_OPTION,
        CALIB_OPTION,
        HOLDOUT_OPTION,
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        """``--sparsity 2:4`` (or the API's ``sparsity=``) as this pass's options."""
        Pattern.parse(text)  # a malformed pattern is an error here, not mid-pipeline
        return {"pattern": str(text)}

    def rewrite(self, model: ir.Model) -> int:
        from graphopt.passes.compensation.eora import parse_compensation, require_calibration
        from graphopt.passes.sparsity.sparsifier import SparsifySettings, sparsify_model

        s = self.settings
        if not s["pattern"]:
            raise UserInputError("sparsify: give a pattern, e.g. --sparsity 2:4")
        rank, note = parse_compensation(s["compensation"], "sparsify")
        require_calibration(rank, s["calib"], "sparsify")
        choices = resolve_choices(s["criterion"], s["allocation"], s["calib"])
        self.context.note(choices.note(s["calib"]))
        settings = SparsifySettings(
            pattern=Pattern.parse(s["pattern"]),
            criterion=choices.criterion,
            allocation=choices.allocation,
            layers=parse_layers(s["layers"]),
            keep_last=bool(s["keep_last"]),
            holdout=s["holdout"],
            compensation=rank,
        )
        calib = self._calibration(model, choices.criterion)
        record = sparsify_model(model, settings, calib, self.context)
        if note:
            record.notes.append(note)
        record.defaults = list(choices.defaulted)
        if calib is None:
            record.notes.insert(0, "no calibration data: magnitude only, errors are weight errors")
        record.summary = record.headline()
        self.context.details["sparsify"] = record
        return len(record.layers)

    def _calibration(self, model: ir.Model, criterion: str) -> CalibrationSet | None:
        source = self.settings["calib"]
        if not source:
            if criterion in DATA_CRITERIA:
                raise UserInputError(
                    f"sparsify: criterion {criterion} needs calibration data: pass --calib "
                    "FILE.npz (or --calib random to use generated inputs, not recommended)"
                )
            return None
        return calibration_for(
            "sparsify", source, model, self.context, "the weights to zero were chosen"
        )
