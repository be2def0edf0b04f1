"""Zero-invariance self-check: zeroing a group's units equals removing them.

For the chosen units, two models are built from the original: one with the units' parameter
slices set to zero, one with the channels physically removed
(:func:`graphopt.passes.pruning.channel_removal.remove_channels`). Both run in ONNX Runtime on the
same generated inputs; the check passes when every output agrees within ``tolerance``
relative to the output's largest magnitude (1e-6 by default). This validates the groups
(a missed coupling shows as a difference or a shape error) and the removal routine at once.
Where the outputs are zero whatever the input, the tensors just past the removed channels
are compared instead (``boundary``): zeros agreeing would prove nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.analysis.dependency import DimKey, split_key
from graphopt.analysis.zig import ZeroInvariantGroup, ZigReport
from graphopt.editing import INITIALIZERS_NOT_INPUTS_IR, initializers_as_constants
from graphopt.inputs import make_inputs
from graphopt.output_errors import compare
from graphopt.passes.pruning.channel_removal import (
    _values_by_name,
    edit_parameters,
    remove_channels,
)
from graphopt.verify import run_model

TOLERANCE = 1e-6


@dataclass
class CheckResult:
    ok: bool
    max_rel: float
    units: int  # units removed in total
    groups: int
    detail: str = ""
    per_output: dict[str, float] = field(default_factory=dict)
    # Judged on the tensors just past the removed channels too (see check_removal).
    boundary: bool = False
    # Nothing could be judged (the original does not run on the inputs, or its outputs are
    # zero with no tensor past the removed channels to compare): not evidence of a fault.
    inconclusive: bool = False
    # The model's own outputs were all zero (they agree whatever the groups do).
    zero_outputs: bool = False


def zero_units(model: ir.Model, report: ZigReport, removed: dict[DimKey, np.ndarray]) -> ir.Model:
    """A copy of ``model`` with the parameter slices in ``removed`` set to zero."""

    def zero(array: np.ndarray, axis: int, idx: np.ndarray) -> np.ndarray:
        array = array.copy()
        index = [slice(None)] * array.ndim
        index[axis] = idx
        array[tuple(index)] = 0
        return array

    clone = model.clone()
    edit_parameters(
        clone.graph, list(clone.graph), _values_by_name(clone.graph), report.graph, removed, zero
    )
    return clone


def sample_units(
    report: ZigReport,
    groups: list[ZeroInvariantGroup] | None = None,
    per_group: int = 1,
    seed: int = 0,
) -> dict[DimKey, np.ndarray]:
    """Removal indices for ``per_group`` random removable units of each group (never all)."""
    rng = np.random.default_rng(seed)
    removed: dict[DimKey, list[np.ndarray]] = {}
    for group in groups if groups is not None else report.prunable:
        units = group_safe_units(group, rng.permutation(group.removable_units), per_group)
        if not units:
            continue
        for key, idx in group.unit_indices(units).items():
            removed.setdefault(key, []).append(idx)
    return {k: np.unique(np.concatenate(v)) for k, v in removed.items()}


def group_safe_units(group: ZeroInvariantGroup, candidates, limit: int) -> list[int]:
    """Up to ``limit`` of ``candidates`` (in order) whose removal leaves every dim non-empty."""
    left = {key: labels.size for key, labels in group.dims.items()}
    counts = {key: np.bincount(labels, minlength=group.size) for key, labels in group.dims.items()}
    chosen: list[int] = []
    for unit in candidates:
        if len(chosen) == limit:
            break
        if all(left[k] - counts[k][unit] > 0 for k in left):
            for k in left:
                left[k] -= counts[k][unit]
            chosen.append(int(unit))
    return sorted(chosen)


def check_removal(
    model: ir.Model,
    report: ZigReport,
    removed: dict[DimKey, np.ndarray],
    shapes: dict[str, tuple[int, ...]] | None = None,
    tolerance: float = TOLERANCE,
    seed: int = 1,
    boundary: bool = False,
    feeds: dict[str, np.ndarray] | None = None,
    pruned: ir.Model | None = None,
) -> CheckResult:
    """Zeroed vs removed outputs for the channels in ``removed`` (whole units).

    With ``boundary``, the tensors just past the removed channels (e.g. the outputs of the
    Convs that consume them) are compared too: on numerically sensitive models the final
    outputs amplify float rounding, while these show whether the groups themselves are exact.
    ``feeds`` replaces the generated inputs (e.g. calibration samples); ``pruned`` is a model
    already built with ``removed`` taken out (what pruning produced), checked instead of a
    fresh removal, so that the check covers the very model a run returns.
    """
    if model.ir_version < INITIALIZERS_NOT_INPUTS_IR:
        # As the analysis saw it: weights are constants, not inputs (see infer_shapes).
        model = model.clone()
        initializers_as_constants(model)
    if feeds is None:
        feeds = make_inputs(model, shapes or {}, seed=seed)
    zeroed = zero_units(model, report, removed)
    # A clone: boundary outputs are added to it below, and the caller's model must not change.
    candidate = pruned.clone() if pruned is not None else None
    if candidate is None:
        candidate = remove_channels(model, report.graph, removed, keep_shapes=True)
    units = sum(len(v) for v in removed.values())
    own_outputs = len(zeroed.graph.outputs)
    if boundary:
        names = boundary_values(report, removed)
        for edited in (zeroed, candidate):
            by_name = {o.name: o for node in edited.graph for o in node.outputs}
            edited.graph.outputs.extend(by_name[n] for n in names)
    try:
        ref = run_model(zeroed, feeds)
    except Exception as exc:  # the original itself does not run on these inputs
        return CheckResult(
            False, float("inf"), units, 0, f"the zeroed original does not run: {_line(exc)}",
            inconclusive=True,
        )  # fmt: skip
    try:
        got = run_model(candidate, feeds)
    except Exception as exc:  # an invalid pruned model is a failed check, with the reason
        return CheckResult(False, float("inf"), units, 0, _line(exc))
    zero = _all_zero(ref[:own_outputs])
    if not boundary and zero:
        # Outputs that are zero whatever the input (a zero-initialised classifier head, as
        # torchvision's ViTs have) agree whatever the groups do: judge the tensors just past
        # the removed channels instead.
        if not boundary_values(report, removed):
            return CheckResult(
                False, float("inf"), units, 0,
                "the outputs are all zero and no tensor past the removed channels keeps its "
                "shape: nothing to compare", inconclusive=True,
            )  # fmt: skip
        return check_removal(
            model, report, removed, shapes, tolerance, seed, True, feeds, pruned
        )  # fmt: skip
    worst, per_output, detail = 0.0, {}, ""
    for value, r, g in zip(zeroed.graph.outputs, ref, got, strict=True):
        err = compare(value.name, r, g)
        rel = err.max_rel if err.shape_ok else float("inf")
        per_output[value.name] = rel
        if rel > worst:
            worst, detail = rel, err.detail or f"{value.name!r} off by {rel:.3g} (rel)"
    return CheckResult(
        worst <= tolerance, worst, units, 0, detail, per_output, boundary, zero_outputs=zero
    )  # fmt: skip


def _line(exc: Exception) -> str:
    """An exception as one line (ORT's messages span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


# The runtime guard (``check_chosen``): tensors just past the removed channels may differ
# by float32 reordering when many units go at once (PP-OCR: 2.5e-6, measured), never more.
GUARD_BOUNDARY_TOLERANCE = 1e-5


def check_chosen(
    model: ir.Model,
    report: ZigReport,
    removed: dict[DimKey, np.ndarray],
    pruned: ir.Model,
    feeds: dict[str, np.ndarray],
) -> CheckResult:
    """The guard every pruning run applies to the units it chose: ``pruned`` (``model`` with
    ``removed`` taken out) computes what ``model`` computes with them zeroed, on ``feeds``.

    The outputs must agree within 1e-6 of their largest magnitude (and not be all zero, which
    proves nothing); otherwise, as deep models amplify the rounding of sums that lost terms,
    the tensors just past the removed channels must agree within
    ``GUARD_BOUNDARY_TOLERANCE``: that is where a wrong group or a wrong slice shows first,
    at full size. Both are fetched in one run of each model.
    """
    result = check_removal(model, report, removed, feeds=feeds, pruned=pruned, boundary=True)
    if result.inconclusive or not np.isfinite(result.max_rel):
        return result
    outputs = {v.name for v in model.graph.outputs}
    final = {k: v for k, v in result.per_output.items() if k in outputs}
    past = {k: v for k, v in result.per_output.items() if k not in outputs}
    worst_final = max(final.values(), default=0.0)
    if not result.zero_outputs and worst_final <= TOLERANCE:
        return CheckResult(True, worst_final, result.units, 0, "", result.per_output)
    if not past:
        if result.zero_outputs:
            result.ok, result.inconclusive = False, True
            result.detail = (
                "the outputs are all zero and no tensor past the removed channels keeps its "
                "shape: nothing to compare"
            )
            return result
        # No tensor lies between the removed channels and the outputs (a classifier's hidden
        # units feeding the last Gemm): the outputs are the tensors just past them, and are
        # held to the same tolerance as those would be.
        ok = worst_final <= GUARD_BOUNDARY_TOLERANCE
        return CheckResult(ok, worst_final, result.units, 0, result.detail, result.per_output, True)
    worst = max(past, key=past.__getitem__)
    ok = past[worst] <= GUARD_BOUNDARY_TOLERANCE
    detail = f"{worst!r} off by {past[worst]:.3g} (rel), just past the removed channels"
    return CheckResult(ok, past[worst], result.units, 0, detail, result.per_output, True)


def _all_zero(outputs: list) -> bool:
    arrays = [o for o in outputs if isinstance(o, np.ndarray) and o.dtype.kind == "f"]
    return bool(arrays) and not any(np.any(a) for a in arrays)


def boundary_values(report: ZigReport, removed: dict[DimKey, np.ndarray]) -> list[str]:
    """Float outputs of nodes touching removed dims whose shapes removal does not change."""
    changed = {split_key(name)[0] for name, _ in removed}
    names: list[str] = []
    for key in removed:
        for node in report.graph.nodes.get(key, ()):
            for out in node.outputs:
                if out.name in changed or out.name in names or out.is_graph_output():
                    continue
                if out.type is not None and out.type.dtype.is_floating_point():
                    names.append(out.name)
    return names


def check_groups(
    model: ir.Model,
    report: ZigReport,
    groups: list[ZeroInvariantGroup] | None = None,
    per_group: int = 1,
    shapes: dict[str, tuple[int, ...]] | None = None,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    boundary: bool = False,
) -> CheckResult:
    """Remove ``per_group`` random units from each group (all prunable ones by default) at
    once and compare with zeroing them."""
    chosen = groups if groups is not None else report.prunable
    removed = sample_units(report, chosen, per_group, seed)
    result = check_removal(model, report, removed, shapes, tolerance, boundary=boundary)
    result.groups = len(chosen)
    return result
