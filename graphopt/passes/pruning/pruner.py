"""Structured pruning of one model: score → allocate → remove → compensate → report.

:func:`prune_model` does the work behind the ``prune`` pass (:mod:`.prune`), which only
parses options: this module and the analysis it needs load when pruning is asked for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import onnx_ir as ir
from rich.console import Console

from graphopt.analysis.dependency import DimKey, split_key
from graphopt.analysis.excluded import describe
from graphopt.analysis.flops import model_flops
from graphopt.analysis.stats import live_parameter_count
from graphopt.analysis.zig import ZeroInvariantGroup, ZigReport, analyze
from graphopt.errors import CheckFailedError
from graphopt.inputs import make_inputs
from graphopt.passes.calibration.activations import channel_statistics
from graphopt.passes.calibration.fidelity import (
    Fidelity,
    measure,
    outputs_on,
    padding_mask,
    summary,
)
from graphopt.passes.calibration.report import removed_share
from graphopt.passes.calibration.samples import CalibrationSet, sample_input_shapes
from graphopt.passes.pruning.allocation import CostModel, allocate, plan_group
from graphopt.passes.pruning.channel_removal import remove_channels
from graphopt.passes.pruning.compensation import compensate
from graphopt.passes.pruning.consumers import find_consumers, strip_tags, tag_nodes
from graphopt.passes.pruning.importance import score_group
from graphopt.passes.pruning.rendering import headline
from graphopt.passes.pruning.settings import DATA_CRITERIA, PruneSettings, PruneTarget
from graphopt.passes.pruning.zig_check import check_chosen
from graphopt.refusals import refuse_unchanged
from graphopt.registry import PassContext
from graphopt.report import signed_percent
from graphopt.size_targets import size_target_missed

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
    compensation_kept: bool = True
    compensation_used: str = ""  # the method kept: the asked one, "bias" after lsq, or ""
    # The zero-invariance guard on the units removed: "passed", "passed (past the removed
    # channels)", "not judged: ...", "skipped (--no-verify)"; "" when nothing was removed.
    check: str = ""
    check_seconds: float = 0.0
    # Which of criterion/compensation/allocation the caller left unset and took a default
    # (settings.resolve_choices); empty when all three were given.
    defaults: list[str] = field(default_factory=list)
    # The summary note this run added to the report's notes ("" before it is written).
    summary: str = ""
    # The size target missed beyond the slack (size_targets.size_target_missed); "" when met.
    # Read by RunReport.targets_missed: the CLI exits 1 after writing the model.
    target_missed: str = ""

    @property
    def flops_removed(self) -> float:
        return removed_share(self.flops_before, self.flops_after)

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

    def render(self, console: Console) -> bool:
        """The report's pruning section (see :mod:`graphopt.report`'s ``RenderedDetails``)."""
        from graphopt.passes.pruning.rendering import print_pruning

        return print_pruning(self, console)


def prune_model(
    model: ir.Model,
    settings: PruneSettings,
    calib: CalibrationSet | None,
    context: PassContext,
) -> tuple[ir.Model, PruneReport]:
    """The pruned (and compensated) copy of ``model``, and what it cost; ``model`` keeps its
    content (consumer tags are added and removed again)."""
    start = time.perf_counter()
    shapes = calib.sample_shapes() if calib is not None else dict(context.input_shapes)
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
    context.details["prune"] = record
    if not prunable:
        # The model would come back unchanged, passing for a pruned one: refused (exit 2)
        # as the other lossy passes refuse it, with the reasons `graphopt analyze` gives.
        refuse_unchanged(
            model,
            f"prune {settings.target}",
            "prune",
            [],
            unit="group",
            none_found=f"no prunable group: {_why_none(report)} (see `graphopt analyze`)",
        )
    if report.excluded:
        context.note(f"prune: left as they are: {describe(report.excluded)}")
    fit, held = calib.split(settings.holdout) if calib is not None else (None, None)
    consumers = find_consumers(report, prunable)
    stats = None
    if settings.criterion in DATA_CRITERIA:
        keys = sorted({c.data_key for c in consumers})
        stats = channel_statistics(model, keys, fit, gram=settings.criterion == "reconstruction")
    scored = [score_group(report, g, settings.criterion, consumers, stats) for g in prunable]
    record.fallback_groups = sum(s.criterion != settings.criterion for s in scored)
    if record.fallback_groups:
        context.note(
            f"prune: criterion {settings.criterion} does not apply to "
            f"{record.fallback_groups} group(s) (no BatchNormalization / no consumer "
            "layer); l2 magnitude used there"
        )
    round_to = settings.round_to
    plans = [
        plan_group(g, s.scores, round_to, settings.max_group_ratio)
        for g, s in zip(prunable, scored, strict=True)
    ]
    counted_before = model_flops(model, shapes)
    flops_before = counted_before.total
    params_before = live_parameter_count(model)
    cost = CostModel(report, [p.group for p in plans])
    pruned, removed, indices = _remove(
        model, report, plans, cost, settings.target, settings.allocation, shapes
    )
    record.flops_before, record.params_before = flops_before, params_before
    counted_after = model_flops(pruned, shapes)
    record.flops_after = counted_after.total
    unknown = sum(counted_after.unknown_shape.values()) - sum(counted_before.unknown_shape.values())
    if unknown > 0:
        context.note(
            f"prune: warning: shapes of {unknown} more node(s) could not be inferred in the "
            "pruned model than in the original; the FLOPs reduction shown may be off"
        )
    record.params_after = live_parameter_count(pruned)
    _note_split_fills(context, report, indices)
    record.units_removed = sum(len(u) for u in removed.values())
    record.groups_pruned = sum(1 for u in removed.values() if u)
    if not record.units_removed:
        _refuse_nothing_removed(model, settings, prunable)
    # Before compensation: refits change weights on purpose, the removal must not.
    _guard(model, report, pruned, indices, fit, settings, context, record)
    achieved = record.flops_removed if settings.target.kind == "flops" else record.params_removed
    kind, asked = settings.target.kind, signed_percent(-settings.target.ratio)
    record.target_missed = size_target_missed(
        f"prune {settings.target}", kind, achieved, settings.target.ratio
    )
    if achieved + TOLERANCE < settings.target.ratio:
        context.note(
            f"prune: reached {kind} {signed_percent(-achieved)} of the asked {asked} "
            "(group limits, alignment or blocked groups)"
        )
    elif achieved > settings.target.ratio + 2 * TOLERANCE:
        # More than asked is a different model than asked for (fidelity pays for it): said,
        # with the cause, as the shortfall is.
        context.note(
            f"prune: overshot: {kind} {signed_percent(-achieved)} where {asked} was asked, "
            f"{_overshoot_cause(plans, removed, cost, achieved - settings.target.ratio, settings)}"
        )
    if held is None and not settings.check:
        # Verification measures the lossy change on generated inputs; with --no-verify nothing
        # would, and a second full-size session here would break the memory bound of a
        # multi-GB --no-verify run (tests/graphopt_tests/test_memory.py): said, not done.
        context.note(
            "prune: fidelity not measured: no held-out calibration samples (a --calib file "
            "of 2 or more samples holds some out), and --no-verify skips the measurement"
        )
    if held is not None:
        # The run's original when an earlier lossy pass (erase-blocks) changed the model:
        # the fidelity reported is the user's, end to end.
        reference = outputs_on(context.fidelity_reference(model), held, reference=True)
        names = [v.name for v in model.graph.outputs]
        record.heldout_samples = held.count
        record.fidelity_pruned = measure(
            names, reference, outputs_on(pruned, held), padding_mask(held)
        )
    if settings.compensation != "none" and fit is not None:
        touched = {gid for gid, units in removed.items() if units}
        live = [c for c in consumers if c.group in touched]
        pruned, layers, used = _compensate(model, pruned, live, fit, settings, indices, context)
        record.layers_compensated = layers
        record.compensation_kept = layers > 0
        record.compensation_used = used
        if held is not None and layers:
            record.fidelity_compensated = measure(
                names, reference, outputs_on(pruned, held), padding_mask(held)
            )
        elif held is not None:  # refit not kept: the result is the plainly pruned model
            record.fidelity_compensated = list(record.fidelity_pruned)
    strip_tags(model)
    strip_tags(pruned)
    _note_summary(context, record)
    record.seconds = time.perf_counter() - start
    return pruned, record


def _remove(
    model: ir.Model,
    report: ZigReport,
    plans,
    cost: CostModel,
    target: PruneTarget,
    allocation: str,
    shapes: dict[str, tuple[int, ...]],
) -> tuple[ir.Model, dict[int, list[int]], dict[DimKey, np.ndarray]]:
    """Allocate, remove, measure; correct the goal while the measurement falls short."""
    tag_nodes(model, find_consumers(report, [p.group for p in plans]))
    before = (
        model_flops(model, shapes).total if target.kind == "flops" else live_parameter_count(model)
    )
    goal = target.ratio
    best, best_gap = None, float("inf")
    for _ in range(MAX_CORRECTIONS + 1):
        chosen = allocate(plans, cost, target.kind, goal, allocation)
        indices = _indices(plans, chosen)
        pruned = remove_channels(model, report.graph, indices, keep_shapes=True)
        after = (
            model_flops(pruned, shapes).total
            if target.kind == "flops"
            else live_parameter_count(pruned)
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


def _guard(
    model: ir.Model,
    report: ZigReport,
    pruned: ir.Model,
    indices: dict[DimKey, np.ndarray],
    calib: CalibrationSet | None,
    settings: PruneSettings,
    context: PassContext,
    record: PruneReport,
) -> None:
    """Zeroing exactly the chosen units in the original must give what ``pruned`` gives; a
    difference is a fault in the analysis or the removal, and the result is refused."""
    if not settings.check:
        record.check = "skipped (--no-verify)"
        return
    start = time.perf_counter()
    if calib is not None:
        feeds = next(calib.batches(trim=False))  # real inputs where the user gave them
    else:
        feeds = make_inputs(model, sample_input_shapes(model, context.input_shapes), seed=1)
    result = check_chosen(model, report, indices, pruned, feeds)
    record.check_seconds = time.perf_counter() - start
    if result.ok:
        record.check = "passed" + (" (past the removed channels)" if result.boundary else "")
    elif result.inconclusive:
        record.check = f"not judged: {result.detail}"
        context.note(f"prune: zero-invariance check {record.check}")
    else:
        strip_tags(model)
        raise CheckFailedError(
            f"prune: zero-invariance check failed: the model with the {record.units_removed} "
            f"chosen units removed differs from the original with them zeroed "
            f"({result.detail}); a graphopt bug in the channel analysis or removal for this "
            "model, please report it (--no-verify skips this check)"
        )


def _refuse_nothing_removed(
    model: ir.Model, settings: PruneSettings, prunable: list[ZeroInvariantGroup]
) -> NoReturn:
    """Refuse a run whose allocation removed no unit of any prunable group (a target too
    small for the groups' steps): the model would come back unchanged."""
    strip_tags(model)  # the allocation tagged its consumers; the caller's model keeps none
    why = (
        "no unit goes at this target (alignment to --round-to, --max-group-ratio "
        f"{settings.max_group_ratio:g})"
    )
    refuse_unchanged(
        model, f"prune {settings.target}", "prune", [(g.label(), why) for g in prunable], "group"
    )


def _why_none(report: ZigReport) -> str:
    """Why no group is prunable, with counts that add up to the groups found."""
    parts = []
    if report.groups:
        combos = report.blocked_by()
        listed = ", ".join(f"{' + '.join(r)} ×{c}" for r, c in combos[:3])
        if combos[3:]:
            listed += f", other reasons ×{sum(c for _, c in combos[3:])}"
        parts.append(f"{len(report.groups)} group(s), all blocked ({listed})")
    if report.excluded:
        parts.append(describe(report.excluded))
    if not parts:
        parts.append("no float weight in the main graph that a channel can be removed from")
    return "; ".join(parts)


def _overshoot_cause(
    plans, removed: dict[int, list[int]], cost: CostModel, excess: float, settings: PruneSettings
) -> str:
    """Why the result removed ``excess`` more than asked, said only where it holds."""
    if any(plan.step > 1 and removed.get(plan.group.id) for plan in plans):
        if settings.round_to:
            return f"as --round-to {settings.round_to} keeps channel counts aligned"
        return (
            "as the default alignment keeps channel counts of groups of >= 32 channels "
            "multiples of 16 (--round-to 1 removes single channels)"
        )
    kind = settings.target.kind
    largest = [
        float(cost.unit_savings(kind, gid)[units].max())
        for gid, units in removed.items()
        if units and cost.unit_savings(kind, gid).size
    ]
    # Global allocation overshoots by at most its last unit; uniform steps every group at once.
    bound = sum(largest) if settings.allocation == "uniform" else max(largest, default=0.0)
    if excess <= bound + TOLERANCE:
        return (
            f"as units (channels, heads) go whole and one of those removed saves "
            f"{100 * max(largest):.1f}% of {kind}"
        )
    return "more than whole units explain (the cost estimate was off: please report it)"


def _note_split_fills(
    context: PassContext, report: ZigReport, indices: dict[DimKey, np.ndarray]
) -> None:
    """Say when a constant fill several layers read became several tensors (the analysis
    gives each use of a fill its own dim, so unrelated layers are not coupled through it;
    uses cut alike share one copy, as channel_removal writes them)."""
    cuts: dict[str, dict[int, list[tuple[int, np.ndarray]]]] = {}  # fill -> use -> cuts
    values: dict[str, ir.Value] = {}
    for key, idx in indices.items():
        name, use = split_key(key[0])
        dim = report.graph.dims[key]
        if use is not None and dim.is_param and dim.value.const_value is not None:
            values[name] = dim.value
            cuts.setdefault(name, {}).setdefault(use, []).append((key[1], idx))
    split = extra = 0
    for name, per_use in cuts.items():
        value = values[name]
        copies: dict[tuple, int] = {}
        for use_cuts in per_use.values():
            shape = list(value.const_value.shape)
            for axis, idx in use_cuts:
                shape[axis] -= len(idx)
            copies[tuple(sorted((a, i.tobytes()) for a, i in use_cuts))] = math.prod(shape)
        if len(per_use) < len({id(u.node) for u in value.uses()}):
            copies[()] = value.const_value.size  # uses left whole keep the original
        if len(copies) > 1:
            split += 1
            extra += sum(copies.values()) - value.const_value.size
    if split:
        context.note(
            f"prune: {split} constant fill(s) (one repeated value, e.g. zero biases) read by "
            f"several layers now have a copy per set of channels kept ({extra:+,} parameters)"
        )


def _note_summary(context: PassContext, record: PruneReport) -> None:
    line = headline(record, "prune")
    if record.fidelity_pruned:
        line += f"; held-out ({record.heldout_samples}): {summary(record.fidelity_pruned)}"
        if context.reference_model is not None:
            line += f" (against the original: includes {', '.join(context.reference_includes)})"
    if record.fidelity_compensated:
        used = record.compensation_used or "none (reverted)"
        line += f" -> after {used}: {summary(record.fidelity_compensated)}"
    # The report prints the record itself; it leaves out this note, not to say it twice.
    record.summary = line
    context.note(line)


def _indices(plans, chosen: dict[int, list[int]]) -> dict[DimKey, np.ndarray]:
    removed: dict[DimKey, list[np.ndarray]] = {}
    for plan in plans:
        units = chosen.get(plan.group.id) or []
        if not units:
            continue
        for key, idx in plan.group.unit_indices(units).items():
            removed.setdefault(key, []).append(idx)
    return {k: np.unique(np.concatenate(v)) for k, v in removed.items()}


def _compensate(model, pruned, consumers, fit, settings, indices, context):
    """Refit the consumers on most of the fitting samples; the rest (a validation slice, still
    disjoint from the held-out) picks each layer's refit and must see the outputs closer.

    When least squares leaves the outputs further on the validation slice, bias compensation
    (fewer degrees of freedom: nothing to overfit with few rows per feature) is tried before
    giving up and keeping the plainly pruned model.
    """
    fit_part, validation = fit.split(0.2)
    if validation is None:
        fit_part = fit
    plain = pruned.clone()  # refits add new tensors, so the clone stays the plain result
    methods = [settings.compensation] + (["bias"] if settings.compensation == "lsq" else [])
    names = [v.name for v in model.graph.outputs]
    reference = before = mask = None
    for attempt, method in enumerate(methods):
        candidate = pruned if attempt == 0 else plain.clone()
        notes: list[str] = []
        layers = compensate(
            model, candidate, consumers, fit_part, method, settings.ridge, notes, indices,
            validation,
        )  # fmt: skip
        for note in notes[:5]:
            context.note(f"prune: {note}")
        if validation is None or not layers:
            return candidate, layers, method if layers else ""
        if reference is None:
            reference = outputs_on(model, validation, reference=True)
            mask = padding_mask(validation)
            before = measure(names, reference, outputs_on(plain, validation), mask)
        after = measure(names, reference, outputs_on(candidate, validation), mask)
        if sum(f.mean_abs for f in after) <= sum(f.mean_abs for f in before):
            return candidate, layers, method
        context.note(
            f"prune: {method} compensation moved the outputs further on the validation samples "
            f"({validation.count})"
            + ("; trying bias compensation" if attempt + 1 < len(methods) else "")
        )
    context.note("prune: kept the uncompensated result")
    return plain, 0, ""
