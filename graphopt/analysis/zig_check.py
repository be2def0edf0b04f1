"""Zero-invariance self-check: zeroing a group's units equals removing them.

For the chosen units, two models are built from the original: one with the units' parameter
slices set to zero, one with the channels physically removed
(:func:`graphopt.analysis.channel_removal.remove_channels`). Both run in ONNX Runtime on the
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

from graphopt.analysis.channel_removal import _values_by_name, edit_parameters, remove_channels
from graphopt.analysis.dependency import DimKey, split_key
from graphopt.analysis.zig import ZeroInvariantGroup, ZigReport
from graphopt.editing import INITIALIZERS_NOT_INPUTS_IR, initializers_as_constants
from graphopt.inputs import make_inputs
from graphopt.verify import compare, run_model

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
) -> CheckResult:
    """Zeroed vs removed outputs for the channels in ``removed`` (whole units).

    With ``boundary``, the tensors just past the removed channels (e.g. the outputs of the
    Convs that consume them) are compared too: on numerically sensitive models the final
    outputs amplify float rounding, while these show whether the groups themselves are exact.
    """
    if model.ir_version < INITIALIZERS_NOT_INPUTS_IR:
        # As the analysis saw it: weights are constants, not inputs (see infer_shapes).
        model = model.clone()
        initializers_as_constants(model)
    feeds = make_inputs(model, shapes or {}, seed=seed)
    zeroed = zero_units(model, report, removed)
    pruned = remove_channels(model, report.graph, removed)
    units = sum(len(v) for v in removed.values())
    if boundary:
        names = boundary_values(report, removed)
        for candidate in (zeroed, pruned):
            by_name = {o.name: o for node in candidate.graph for o in node.outputs}
            candidate.graph.outputs.extend(by_name[n] for n in names)
    try:
        ref = run_model(zeroed, feeds)
        got = run_model(pruned, feeds)
    except Exception as exc:  # an invalid pruned model is a failed check, with the reason
        return CheckResult(False, float("inf"), units, 0, f"{type(exc).__name__}: {exc}")
    if not boundary and _all_zero(ref):
        # Outputs that are zero whatever the input (a zero-initialised classifier head, as
        # torchvision's ViTs have) agree whatever the groups do: judge the tensors just past
        # the removed channels instead.
        if not boundary_values(report, removed):
            return CheckResult(
                False, float("inf"), units, 0,
                "the outputs are all zero and no tensor past the removed channels keeps its "
                "shape: nothing to compare",
            )  # fmt: skip
        return check_removal(model, report, removed, shapes, tolerance, seed, boundary=True)
    worst, per_output, detail = 0.0, {}, ""
    for value, r, g in zip(zeroed.graph.outputs, ref, got, strict=True):
        err = compare(value.name, r, g)
        rel = err.max_rel if err.shape_ok else float("inf")
        per_output[value.name] = rel
        if rel > worst:
            worst, detail = rel, err.detail
    return CheckResult(worst <= tolerance, worst, units, 0, detail, per_output, boundary)


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
