"""The ``prune`` pass: options in, :func:`~graphopt.passes.pruning.pruner.prune_model` out.

Kept small on purpose: importing it (every run registers every pass) must not load the
analysis and numerics that only a pruning run needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.pruning.settings import DATA_CRITERIA, PruneSettings, PruneTarget
from graphopt.registry import GraphPass, PassOption, Stage, register

if TYPE_CHECKING:
    from graphopt.passes.pruning.samples import CalibrationSet


@register
class PrunePass(GraphPass):
    """Remove whole channels, hidden units and heads of zero-invariant groups (lossy)."""

    name = "prune"
    exact = False
    stage = Stage.PRUNE
    handles_subgraphs = False
    options = (
        PassOption("flops", float, 0.0, "fraction of FLOPs to remove (0 < R < 1)"),
        PassOption("params", float, 0.0, "fraction of parameters to remove (0 < R < 1)"),
        PassOption(
            "criterion", str, "l2", "l1, l2, bn_scale, activation, fluctuation or reconstruction"
        ),
        PassOption("allocation", str, "uniform", "uniform or global"),
        PassOption("max_group_ratio", float, 0.8, "most any group may lose"),
        PassOption("round_to", int, 0, "kept channels multiple of N (0: default by size)"),
        PassOption("compensation", str, "none", "none, bias or lsq"),
        PassOption("calib", str, "", "calibration .npz, or 'random' for generated data"),
        PassOption("ridge", float, 0.3, "least-squares ridge, relative to mean variance"),
        PassOption("holdout", float, 0.25, "share of calibration samples kept for fidelity"),
        PassOption("verify", bool, True, "refuse the result unless removing = zeroing the units"),
    )

    def rewrite(self, model: ir.Model) -> int:
        from graphopt.passes.pruning.pruner import prune_model

        settings = self._settings()
        calib = self._calibration(model, settings)
        pruned, record = prune_model(model, settings, calib, self.context)
        self.context.details["prune"] = record
        if pruned is not model:
            model.graph = pruned.graph  # the pass manager works on ``model`` in place
        return record.units_removed

    def _settings(self) -> PruneSettings:
        s = self.settings
        given = [(k, s[k]) for k in ("flops", "params") if s[k]]
        if len(given) != 1:
            raise UserInputError("prune: give exactly one target, flops=R or params=R")
        kind, ratio = given[0]
        return PruneSettings(
            target=PruneTarget.parse(f"{kind}={ratio}"),
            criterion=s["criterion"],
            allocation=s["allocation"],
            max_group_ratio=s["max_group_ratio"],
            round_to=s["round_to"] or None,
            compensation=s["compensation"],
            ridge=s["ridge"],
            holdout=s["holdout"],
            check=bool(s["verify"]),
        )

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
        if source == "random":
            self.context.note(
                "warning: --calib random: importance and compensation were fitted on "
                "generated inputs, not real data; fidelity numbers are on generated inputs too"
            )
            from graphopt.passes.pruning.samples import random_calibration

            return random_calibration(model, dict(self.context.input_shapes))
        from graphopt.passes.pruning.samples import load_calibration

        return load_calibration(source, model)
