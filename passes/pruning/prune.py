"""The structured pruning pass: score → allocate → remove → compensate → report fidelity."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.analysis.channel_removal import remove_channels
from graphopt.analysis.dependency import DimKey
from graphopt.analysis.flops import model_flops
from graphopt.analysis.zig import ZigReport, analyze
from graphopt.errors import UserInputError
from graphopt.passes.pruning.activations import channel_statistics
from graphopt.passes.pruning.allocation import CostModel, allocate, plan_group
from graphopt.passes.pruning.compensation import compensate
from graphopt.passes.pruning.consumers import find_consumers, strip_tags, tag_nodes
from graphopt.passes.pruning.fidelity import (
    Fidelity,
    measure,
    outputs_on,
    padding_mask,
    summary,
)
from graphopt.passes.pruning.importance import score_group
from graphopt.passes.pruning.samples import (
    CalibrationSet,
    load_calibration,
    random_calibration,
)
from graphopt.passes.pruning.settings import PruneSettings, PruneTarget
from graphopt.registry import GraphPass, PassOption, Stage, register

# Goal corrections when the measured reduction falls short of the cost model's prediction.
MAX_CORRECTIONS = 3
TOLERANCE = 0.005


@dataclass
class PruneReport:
    """What pruning did and what it cost in fidelity (held-out calibration samples)."""

    target: str
    criterion: str
    allocation: str
    compensation: str
    calibration: str
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    groups_pruned: int = 0
    groups_prunable: int = 0
    units_removed: int = 0
    layers_compensated: int = 0
    fallback_groups: int = 0
    fidelity_pruned: list[Fidelity] = field(default_factory=list)
    fidelity_compensated: list[Fidelity] = field(default_factory=list)
    heldout_samples: int = 0
    seconds: float = 0.0

    @property
    def flops_removed(self) -> float:
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    @property
    def params_removed(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("fidelity")}
        out["flops_removed"] = self.flops_removed
        out["params_removed"] = self.params_removed
        out["fidelity_pruned"] = [f.to_json() for f in self.fidelity_pruned]
        out["fidelity_compensated"] = [f.to_json() for f in self.fidelity_compensated]
        return out


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
        PassOption("criterion", str, "l2", "l1, l2, bn_scale, activation or fluctuation"),
        PassOption("allocation", str, "uniform", "uniform or global"),
        PassOption("max_group_ratio", float, 0.8, "most any group may lose"),
        PassOption("round_to", int, 0, "kept channels multiple of N (0: default by size)"),
        PassOption("compensation", str, "none", "none, bias or lsq"),
        PassOption("calib", str, "", "calibration .npz, or 'random' for generated data"),
        PassOption("ridge", float, 1e-2, "least-squares ridge, relative to mean variance"),
        PassOption("holdout", float, 0.25, "share of calibration samples kept for fidelity"),
    )

    def rewrite(self, model: ir.Model) -> int:
        start = time.perf_counter()
        settings = self._settings()
        calib = self._calibration(model, settings)
        shapes = calib.sample_shapes() if calib is not None else dict(self.context.input_shapes)
        report = analyze(model, shapes)
        prunable = report.prunable
        record = PruneReport(
            str(settings.target),
            settings.criterion,
            settings.allocation,
            settings.compensation,
            calib.source if calib is not None else "none",
            groups_prunable=len(prunable),
        )
        self.context.details["prune"] = record
        if not prunable:
            self.context.note("prune: no prunable group in this model (see `graphopt analyze`)")
            return 0
        fit, held = calib.split(settings.holdout) if calib is not None else (None, None)
        consumers = find_consumers(report, prunable)
        stats = None
        if settings.criterion in ("activation", "fluctuation"):
            stats = channel_statistics(model, sorted({c.data_key for c in consumers}), fit)
        scored = [score_group(report, g, settings.criterion, consumers, stats) for g in prunable]
        record.fallback_groups = sum(s.criterion != settings.criterion for s in scored)
        if record.fallback_groups:
            self.context.note(
                f"prune: criterion {settings.criterion} does not apply to "
                f"{record.fallback_groups} group(s) (no BatchNormalization / no consumer "
                "layer); l2 magnitude used there"
            )
        round_to = settings.round_to
        plans = [
            plan_group(g, s.scores, round_to, settings.max_group_ratio)
            for g, s in zip(prunable, scored, strict=True)
        ]
        flops_before = model_flops(model, shapes).total
        params_before = _live_params(model)
        pruned, removed, indices = self._remove(model, report, plans, settings.target, shapes)
        record.flops_before, record.params_before = flops_before, params_before
        record.flops_after = model_flops(pruned, shapes).total
        record.params_after = _live_params(pruned)
        record.units_removed = sum(len(u) for u in removed.values())
        record.groups_pruned = sum(1 for u in removed.values() if u)
        achieved = (
            record.flops_removed if settings.target.kind == "flops" else record.params_removed
        )
        if achieved + TOLERANCE < settings.target.ratio:
            self.context.note(
                f"prune: reached {settings.target.kind} -{100 * achieved:.1f}% of the asked "
                f"-{100 * settings.target.ratio:.0f}% (group limits, alignment or blocked groups)"
            )
        if held is not None:
            reference = outputs_on(model, held)
            names = [v.name for v in model.graph.outputs]
            record.heldout_samples = held.count
            record.fidelity_pruned = measure(
                names, reference, outputs_on(pruned, held), padding_mask(held)
            )
        if settings.compensation != "none" and fit is not None:
            touched = {gid for gid, units in removed.items() if units}
            live = [c for c in consumers if c.group in touched]
            notes: list[str] = []
            record.layers_compensated = compensate(
                model, pruned, live, fit, settings.compensation, settings.ridge, notes, indices
            )
            for note in notes[:5]:
                self.context.note(f"prune: {note}")
            if held is not None:
                record.fidelity_compensated = measure(
                    names, reference, outputs_on(pruned, held), padding_mask(held)
                )
        strip_tags(model)
        strip_tags(pruned)
        self._note_summary(record)
        record.seconds = time.perf_counter() - start
        _adopt(model, pruned)
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
        )

    def _calibration(self, model: ir.Model, settings: PruneSettings) -> CalibrationSet | None:
        source = self.settings["calib"]
        if not source:
            if settings.needs_data:
                wants = (
                    f"criterion {settings.criterion}"
                    if settings.criterion in ("activation", "fluctuation")
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
            return random_calibration(model, dict(self.context.input_shapes))
        return load_calibration(source, model)

    def _remove(
        self,
        model: ir.Model,
        report: ZigReport,
        plans,
        target: PruneTarget,
        shapes: dict[str, tuple[int, ...]],
    ) -> tuple[ir.Model, dict[int, list[int]], dict[DimKey, np.ndarray]]:
        """Allocate, remove, measure; correct the goal while the measurement falls short."""
        cost = CostModel(report, [p.group for p in plans])
        tag_nodes(model, find_consumers(report, [p.group for p in plans]))
        before = model_flops(model, shapes).total if target.kind == "flops" else _live_params(model)
        goal = target.ratio
        best, best_gap = None, float("inf")
        for _ in range(MAX_CORRECTIONS + 1):
            chosen = allocate(plans, cost, target.kind, goal, self.settings["allocation"])
            indices = _indices(plans, chosen)
            pruned = remove_channels(model, report.graph, indices)
            after = (
                model_flops(pruned, shapes).total
                if target.kind == "flops"
                else _live_params(pruned)
            )
            achieved = 1.0 - after / before if before else 0.0
            # Prefer results that reach the target; among them, the closest one.
            gap = abs(achieved - target.ratio) + (1.0 if achieved + TOLERANCE < target.ratio else 0)
            if gap < best_gap:
                best, best_gap = (pruned, chosen, indices), gap
            if abs(achieved - target.ratio) <= 2 * TOLERANCE:
                break
            goal = min(0.99, max(0.0, goal + (target.ratio - achieved)))
        return best

    def _note_summary(self, record: PruneReport) -> None:
        line = (
            f"prune: {record.units_removed} units from {record.groups_pruned}/"
            f"{record.groups_prunable} groups; FLOPs -{100 * record.flops_removed:.1f}%, "
            f"params -{100 * record.params_removed:.1f}%"
        )
        if record.fidelity_pruned:
            line += f"; held-out ({record.heldout_samples}): {summary(record.fidelity_pruned)}"
        if record.fidelity_compensated:
            line += f" -> after {record.compensation}: {summary(record.fidelity_compensated)}"
        self.context.note(line)


def _indices(plans, chosen: dict[int, list[int]]) -> dict[DimKey, np.ndarray]:
    removed: dict[DimKey, list[np.ndarray]] = {}
    for plan in plans:
        units = chosen.get(plan.group.id) or []
        if not units:
            continue
        for key, idx in plan.group.unit_indices(units).items():
            removed.setdefault(key, []).append(idx)
    return {k: np.unique(np.concatenate(v)) for k, v in removed.items()}


def _adopt(model: ir.Model, pruned: ir.Model) -> None:
    """Make ``model`` the pruned one (the pass manager works on ``model`` in place)."""
    model.graph = pruned.graph


def _live_params(model: ir.Model) -> int:
    """Parameter elements still in use (removal leaves replaced tensors for cleanup)."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None and (value.uses() or value.is_graph_output()):
            total += value.const_value.size
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes and node.outputs[0].uses():
            total += node.attributes["value"].value.size
    return total
