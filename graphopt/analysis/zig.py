"""Zero-invariant groups: parameter slices that can be zeroed (or removed) together.

A group is one connected set of channel dims of the dependency graph; its *units* are the
element-level components (e.g. output channel k of a Conv with its bias[k], the next BN's
params[k] and the next Conv's weight[:, k]; or one attention head with its Q/K/V rows and
output-projection columns). Every unit can be removed independently of the others. Zeroing a
unit's parameters makes the model compute exactly what it computes with the unit removed —
:mod:`graphopt.passes.pruning.zig_check` tests that claim.

A group is *blocked* when any dim in it is blocked (the reasons are kept), or when one unit
covers a whole axis (removing it would leave an empty tensor).

FLOPs share of a group: FLOPs of the nodes touching its dims over the model's total (a node
can count for two groups: a Conv for its input and its output channels). Params share: the
parameter elements the group's members hold, over all parameter elements.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.analysis.dependency import DependencyGraph, DimKey, build_on_inferred, split_key
from graphopt.analysis.excluded import not_analysed
from graphopt.analysis.flops import node_flops
from graphopt.analysis.flops_terms import UnknownShape
from graphopt.analysis.shapes import infer_shapes
from graphopt.analysis.stats import is_constant_node


@dataclass
class Member:
    """One parameter slice family: ``tensor``'s ``axis``, indices per unit."""

    tensor: str
    axis: int
    units: list[np.ndarray]  # indices along ``axis`` belonging to each unit

    def to_json(self) -> dict:
        return {
            "tensor": self.tensor,
            "axis": self.axis,
            "indices": [u.tolist() for u in self.units],
        }


@dataclass
class ZeroInvariantGroup:
    id: int
    size: int  # number of units (independently removable channels / heads / groups)
    members: list[Member]
    dims: dict[DimKey, np.ndarray]  # every dim of the group → unit label per element
    flops: int = 0
    params: int = 0
    flops_share: float = 0.0
    params_share: float = 0.0
    reasons: list[str] = field(default_factory=list)
    fixed_units: list[int] = field(default_factory=list)  # units that can never be removed

    @property
    def removable_units(self) -> list[int]:
        fixed = set(self.fixed_units)
        return [u for u in range(self.size) if u not in fixed]

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def unit_indices(self, units: list[int]) -> dict[DimKey, np.ndarray]:
        """Per dim, the element indices that removing ``units`` removes."""
        chosen = np.asarray(units)
        return {key: np.flatnonzero(np.isin(labels, chosen)) for key, labels in self.dims.items()}

    def label(self) -> str:
        first = self.members[0] if self.members else None
        return f"{first.tensor} (axis {first.axis})" if first else next(iter(self.dims))[0]

    def to_json(self, with_indices: bool = True) -> dict:
        out = {
            "id": self.id,
            "size": self.size,
            "prunable": self.prunable,
            "reasons": self.reasons,
            "fixed_units": self.fixed_units,
            "flops_share": self.flops_share,
            "params_share": self.params_share,
            "members": [m.to_json() for m in self.members]
            if with_indices
            else [{"tensor": m.tensor, "axis": m.axis} for m in self.members],
        }
        return out


@dataclass
class ZigReport:
    groups: list[ZeroInvariantGroup]
    graph: DependencyGraph
    total_flops: int
    total_params: int
    prunable_flops_share: float
    seconds: float
    # Weights in no group because the analysis does not look at them: (reason, tensors).
    excluded: list[tuple[str, int]] = field(default_factory=list)

    @property
    def prunable(self) -> list[ZeroInvariantGroup]:
        return [g for g in self.groups if g.prunable]

    def top_reasons(self, n: int = 5) -> list[tuple[str, int]]:
        """Reasons by the number of groups they block (a group may have several)."""
        return Counter(r for g in self.groups for r in g.reasons).most_common(n)

    def blocked_by(self) -> list[tuple[tuple[str, ...], int]]:
        """Blocked groups counted once each, by their full set of reasons: the counts add up
        to the number of blocked groups."""
        return Counter(tuple(g.reasons) for g in self.groups if g.reasons).most_common()

    def to_json(self, with_indices: bool = True) -> dict:
        return {
            "groups": len(self.groups),
            "prunable": len(self.prunable),
            "blocked": len(self.groups) - len(self.prunable),
            "total_flops": self.total_flops,
            "total_params": self.total_params,
            "prunable_flops_share": self.prunable_flops_share,
            "top_reasons": [{"reason": r, "groups": c} for r, c in self.top_reasons(10)],
            "blocked_by": [{"reasons": list(r), "groups": c} for r, c in self.blocked_by()],
            "not_analysed": [{"reason": r, "tensors": n} for r, n in self.excluded],
            "seconds": self.seconds,
            "group_list": [g.to_json(with_indices) for g in self.groups],
        }


def analyze(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> ZigReport:
    """Dependency graph and zero-invariant groups of ``model`` (which is left untouched)."""
    start = time.perf_counter()
    inferred, _ = infer_shapes(model, input_shapes)
    graph = build_on_inferred(inferred)
    groups = partition(graph)
    _settle_shapes(inferred, graph)
    node_cost = _node_flops(inferred)
    total_flops = sum(node_cost.values()) or 1
    total_params = sum(
        v.const_value.size for v in inferred.graph.initializers.values() if v.const_value
    )
    covered: set[int] = set()
    for group in groups:
        touched = {id(n) for key in group.dims for n in graph.nodes.get(key, ())}
        group.flops = sum(node_cost.get(i, 0) for i in touched)
        group.flops_share = group.flops / total_flops
        group.params_share = group.params / total_params if total_params else 0.0
        if group.prunable:
            covered |= touched
    share = sum(node_cost.get(i, 0) for i in covered) / total_flops
    seconds = time.perf_counter() - start
    graph.seconds = seconds
    return ZigReport(
        groups, graph, total_flops, total_params, share, seconds, not_analysed(model)
    )  # fmt: skip


def partition(graph: DependencyGraph) -> list[ZeroInvariantGroup]:
    """Zero-invariant groups of a dependency graph, parameter-bearing ones first."""
    labels = graph.element_components()
    groups: list[ZeroInvariantGroup] = []
    for comp in graph.dim_components():
        dims = [graph.dims[k] for k in comp]
        raw = {d.key: labels[d.offset : d.offset + d.size] for d in dims}
        unit_ids = np.unique(np.concatenate(list(raw.values())))
        remap = {int(u): i for i, u in enumerate(unit_ids)}
        lookup = np.vectorize(remap.__getitem__, otypes=[np.int64])
        unit_of = {k: lookup(v) for k, v in raw.items()}
        reasons = sorted({r for d in dims for r in d.blocked})
        members, params, counted = [], 0, set()
        for d in dims:
            if not d.is_param:
                continue
            per_unit = _indices_per_unit(unit_of[d.key], len(unit_ids))
            members.append(Member(d.key[0], d.key[1], per_unit))
            base = split_key(d.key[0])[0]
            if base not in counted:  # a weight with both axes (or several uses) counts once
                counted.add(base)
                params += d.value.const_value.size if d.value.const_value is not None else 0
        if not members:
            continue  # no parameter involved: nothing to prune
        # A unit holding every channel of some tensor axis cannot go (it would empty it).
        fixed = sorted({int(v[0]) for v in unit_of.values() if v.size and (v == v[0]).all()})
        if len(fixed) == len(unit_ids):
            reasons.append("all channels are coupled into one unit")
        group = ZeroInvariantGroup(0, len(unit_ids), members, unit_of, params=params)
        group.reasons, group.fixed_units = reasons, fixed
        groups.append(group)
    groups.sort(key=lambda g: (not g.prunable,))
    for i, g in enumerate(groups):
        g.id = i
    return groups


def _indices_per_unit(labels: np.ndarray, units: int) -> list[np.ndarray]:
    """Element indices of each unit label, in one sort (not one scan per unit)."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=units)
    if labels.size == units and (counts == 1).all():
        # One element per unit, the usual case: rows of a reshape are views made in C, where
        # np.split costs ~5 µs a piece (half of BERT-base's analysis time went there).
        return list(order.reshape(units, 1))
    ends = np.cumsum(counts).tolist()
    starts = [0, *ends[:-1]]
    return [order[a:b] for a, b in zip(starts, ends, strict=True)]


def _settle_shapes(inferred: ir.Model, graph: DependencyGraph) -> None:
    """Give the analysis clone the shapes the channel rules worked out past where onnx
    inference stopped (GroupNormalization), so the FLOPs after it count at their size."""
    ctx = graph.context
    for node in inferred.graph:
        for out in node.outputs:
            if out.shape is None and ctx is not None:
                shape = ctx.shape(out)
                if shape is not None and all(isinstance(d, int) for d in shape):
                    out.shape = ir.Shape(shape)


def _node_flops(model: ir.Model) -> dict[int, int]:
    """FLOPs per node id; unknown dims left by inference count as 1 (shares are ratios)."""
    cost: dict[int, int] = {}
    for node in model.graph:
        if is_constant_node(node):
            continue
        try:
            flops = node_flops(node)
        except UnknownShape:
            flops = _with_unknown_as_one(node)
        if flops:
            cost[id(node)] = flops
    return cost


def _with_unknown_as_one(node: ir.Node) -> int:
    saved = {}
    for v in (*node.inputs, *node.outputs):
        if v is not None and v.shape is not None and id(v) not in saved:
            saved[id(v)] = (v, v.shape)
            v.shape = ir.Shape([d if isinstance(d, int) else 1 for d in v.shape])
    try:
        return node_flops(node) or 0
    except UnknownShape:
        return 0
    finally:
        for v, shape in saved.values():
            v.shape = shape


def report_json(report: ZigReport, with_indices: bool = True) -> str:
    return json.dumps(report.to_json(with_indices), indent=1)


def render_report(report: ZigReport, console, limit: int = 40) -> None:
    """A rich table of groups (prunable first) and a summary line."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Zero-invariant groups", show_lines=False)
    for col in ("id", "first member", "units", "members", "FLOPs %", "params %", "status"):
        table.add_column(col, justify="right" if col in ("id", "units") else "left")
    for group in report.groups[:limit]:
        status = "prunable" if group.prunable else "blocked: " + "; ".join(group.reasons[:2])
        status = escape(status)
        table.add_row(
            str(group.id),
            escape(group.label()),
            str(group.size),
            str(len(group.members)),
            f"{100 * group.flops_share:.1f}",
            f"{100 * group.params_share:.1f}",
            status,
        )
    console.print(table)
    if len(report.groups) > limit:
        console.print(f"... {len(report.groups) - limit} more groups (use --json for all)")
    blocked = len(report.groups) - len(report.prunable)
    console.print(
        f"{len(report.groups)} groups: {len(report.prunable)} prunable, {blocked} blocked; "
        f"prunable groups cover {100 * report.prunable_flops_share:.1f}% of FLOPs; "
        f"analysis {report.seconds:.2f} s",
        markup=False,
    )
    combos = report.blocked_by()
    shown = combos[:BLOCKED_LINES] if len(combos) > BLOCKED_LINES + 1 else combos
    for reasons, count in shown:
        console.print(f"  blocked ×{count}: {'; '.join(reasons)}", markup=False)
    rest = combos[len(shown) :]
    if rest:
        console.print(
            f"  blocked ×{sum(c for _, c in rest)}: {len(rest)} other sets of reasons (use --json)",
            markup=False,
        )
    for reason, tensors in report.excluded:
        console.print(
            f"  in no group: {reason} ({tensors} tensor{'s' if tensors != 1 else ''})",
            markup=False,
        )


# Sets of reasons listed under the summary line; the rest are counted in one more line.
BLOCKED_LINES = 8
