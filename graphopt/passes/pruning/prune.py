"""The ``prune`` pass: options in, :func:`~graphopt.passes.pruning.pruner.prune_model` out.

Kept small on purpose: importing it (every run registers every pass) must not load the
analysis and numerics that only a pruning run needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.calibration import CALIB_OPTION, HOLDOUT_OPTION, calibration_for
from graphopt.passes.compensation import COMPENSATION_OPTION
from graphopt.passes.pruning.settings import (
    ALLOCATIONS,
    CRITERIA,
    DATA_CRITERIA,
    Choices,
    PruneSettings,
    PruneTarget,
    resolve_choices,
)
from graphopt.registry import GraphPass, PassOption, Stage, register

if TYPE_CHECKING:
    from graphopt.passes.calibration.samples import CalibrationSet


@register
class PrunePass(GraphPass):
    """Remove whole channels, hidden units and heads of zero-invariant groups (lossy)."""

    name = "prune"
    exact = False
    stage = Stage.PRUNE
    handles_subgraphs = False
    # The ops whose weights seed a prunable group (analysis.dependency_rules.seeds): without
    # one the model has nothing to prune, refused as "nothing to do" like the other lossy passes.
    ops = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"})
    flag = "--prune"
    flag_metavar = "flops=R|params=R"
    flag_help = "remove a fraction R of FLOPs (at the calibration/--input-shape shapes) or params"
    options = (
        # Bounds catch a recipe's or the API's value where it is read (the message names the
        # recipe key); the default 0.0 is "not given" (a given 0 was read as no target).
        PassOption(
            "flops",
            float,
            0.0,
            "fraction of FLOPs to remove (0 < R < 1)",
            bounds=(0.0, 1.0),
            open_bounds=True,
        ),
        PassOption(
            "params",
            float,
            0.0,
            "fraction of parameters to remove (0 < R < 1)",
            bounds=(0.0, 1.0),
            open_bounds=True,
        ),
        # criterion, allocation and compensation default to None, "not set": resolve_choices
        # then picks data-aware defaults for a calibration file, data-free ones otherwise.
        PassOption(
            "criterion",
            str,
            None,
            "unit importance (default: reconstruction with a --calib file, else l2; "
            "activation, fluctuation, reconstruction need --calib)",
            flag="--criterion",
            choices=CRITERIA,
        ),
        PassOption(
            "allocation",
            str,
            None,
            "share of each group removed (default: global with a --calib file, else uniform)",
            flag="--allocation",
            choices=ALLOCATIONS,
        ),
        COMPENSATION_OPTION,
        PassOption(
            "round_to",
            int,
            None,  # None: not given (0 given is refused, not read as "the default")
            "kept channel counts are multiples of N (default: 16 for groups of >= 32 "
            "channels, else 1)",
            flag="--round-to",
            metavar="N",
            bounds=(1, 65536),
        ),
        CALIB_OPTION,
        # Numeric defaults are PruneSettings' own: one value for the CLI, the API and recipes.
        PassOption(
            "max_group_ratio",
            float,
            PruneSettings.max_group_ratio,
            f"most any one group may lose (default {PruneSettings.max_group_ratio})",
            flag="--max-group-ratio",
            bounds=(0.0, 1.0),
        ),
        PassOption(
            "ridge",
            float,
            PruneSettings.ridge,
            "least-squares ridge, relative to mean variance",
            bounds=(0.0, 1e6),
        ),
        HOLDOUT_OPTION,
        PassOption("verify", bool, True, "refuse the result unless removing = zeroing the units"),
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        """``--prune flops=0.3`` (or the API's ``prune=``) as this pass's options."""
        target = PruneTarget.parse(text)
        return {target.kind: target.ratio}

    def rewrite(self, model: ir.Model) -> int:
        from graphopt.passes.pruning.pruner import prune_model

        settings, choices = self._settings()
        # Said first, before anything can fail: the settings used, and which were defaults.
        self.context.note(choices.note(self.settings["calib"]))
        calib = self._calibration(model, settings)
        pruned, record = prune_model(model, settings, calib, self.context)
        record.defaults = list(choices.defaulted)
        self.context.details["prune"] = record
        if self.eora_rank and calib is not None:
            from graphopt.passes.compensation.pruned import add_paths

            add_paths(model, pruned, calib, self.eora_rank, settings.holdout, self.context)
        if pruned is not model:
            model.graph = pruned.graph  # the pass manager works on ``model`` in place
        return record.units_removed

    def _settings(self) -> tuple[PruneSettings, Choices]:
        s = self.settings
        given = [(k, s[k]) for k in ("flops", "params") if s[k]]
        if len(given) != 1:
            raise UserInputError("prune: give exactly one target, flops=R or params=R")
        kind, ratio = given[0]
        compensation = s["compensation"]
        self.eora_rank = 0
        if compensation and str(compensation).strip().lower().startswith("eora"):
            from graphopt.passes.compensation.eora import parse_compensation, require_calibration

            # eora:R keeps pruning's own refit (its default, lsq with a --calib file: the
            # full-rank fit on the kept inputs) and adds rank-R paths from each pruned block's
            # input (compensation/pruned.py): the two recover different parts of the loss.
            self.eora_rank = parse_compensation(compensation, "prune")[0]
            require_calibration(self.eora_rank, s["calib"], "prune")
            compensation = None
        # The CLI, the API and recipes all reach here, so defaults are resolved once for all.
        choices = resolve_choices(s["criterion"], compensation, s["allocation"], s["calib"])
        return PruneSettings(
            target=PruneTarget.parse(f"{kind}={ratio}"),
            criterion=choices.criterion,
            allocation=choices.allocation,
            max_group_ratio=s["max_group_ratio"],
            round_to=s["round_to"],
            compensation=choices.compensation,
            ridge=s["ridge"],
            holdout=s["holdout"],
            check=bool(s["verify"]),
        ), choices

    def _calibration(self, model: ir.Model, settings: PruneSettings) -> CalibrationSet | None:
        source = self.settings["calib"]
        if not source:
            if settings.needs_data:
                wants = (
                    f"criterion {settings.criterion}"
                    if settings.criterion in DATA_CRITERIA
                    else f"compensation {settings.compensation}"
                )
                raise UserInputError(
                    f"prune: {wants} needs calibration data: pass --calib FILE.npz "
                    "(or --calib random to use generated inputs, not recommended)"
                )
            return None
        return calibration_for(
            "prune", source, model, self.context, "importance and compensation were fitted"
        )
