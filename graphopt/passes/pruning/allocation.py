"""How many units each group loses, so that the model sheds the asked share of FLOPs/params.

A cost model predicts the pruned model's cost from the units removed: a node's FLOPs
scale, per group it touches, by the kept share of its widest dim in that group (a Conv
between two groups shrinks quadratically, a depthwise Conv whose input and output are one
group linearly, one branch of a Concat only with its own channels), a parameter's size by
the kept share of each of its axes. ``uniform`` removes the same share of every prunable
group; ``global`` removes every unit whose normalized importance per cost saved is under
one threshold. Either way one scalar is bisected until the prediction meets the target;
the caller measures the real FLOPs of the result and corrects the goal if they fall short.

Kept channel counts are rounded to multiples of ``round_to`` (SIMD width: unaligned
channel counts waste FLOPs, see BENCHMARKS.md). No group loses more than
``max_group_ratio`` of its units, fixed units stay, and no dim is ever emptied.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from graphopt.analysis.dependency import DimKey, split_key
from graphopt.analysis.zig import ZeroInvariantGroup, ZigReport, _node_flops
from graphopt.passes.pruning.zig_check import group_safe_units

BISECTION_STEPS = 40


def default_round_to(channels: int) -> int:
    """Alignment used when ``--round-to`` is not given (see BENCHMARKS.md, pruning speed).

    16 is ORT's NCHWc block on AVX-512 (8 on AVX2 divides it): a Conv whose channel count is
    not a multiple of the block loses the blocked layout and can run slower than the unpruned
    original (measured on the digits CNN: 11/22/22 channels 0.6x, 16/16/16 1.45x).
    """
    return 16 if channels >= 32 else 1


@dataclass
class GroupPlan:
    group: ZeroInvariantGroup
    order: list[int]  # removable units, least important first (removal keeps dims non-empty)
    scores: np.ndarray
    step: int  # kept units must be a multiple of this (from round_to)
    limit: int  # most units this group may lose

    def removed_for(self, count: int) -> list[int]:
        """The ``count`` least important units, rounded so the kept count is aligned."""
        size = self.group.size
        count = min(max(count, 0), self.limit)
        kept = size - count
        if self.step > 1:
            kept = max(self.step, round(kept / self.step) * self.step)
            kept = min(kept, size)
            while size - kept > self.limit:
                kept += self.step
            if kept > size:
                return []
        return sorted(self.order[: size - kept])


class CostModel:
    """Predicted FLOPs and parameter counts when given units of each group go.

    Costs follow dims, not groups: a group joined by a Concat holds dims that cover only
    some of its units (each branch's Conv), and removing a unit of one branch leaves the
    other branch's Conv as it was. So a node's FLOPs scale, per group it touches, by the
    kept share of the widest of its dims in that group (a Concat's output, not one input),
    and a parameter's size by the kept share of each of its axes.
    """

    def __init__(self, report: ZigReport, groups: list[ZeroInvariantGroup]) -> None:
        graph = report.graph
        costs = _node_flops(graph.model)
        by_id = {g.id: g for g in groups}
        # One row per (group, dim) used: each unit's share of the dim's elements.
        self._rows: dict[DimKey, int] = {}
        self._group_rows: dict[int, list[int]] = defaultdict(list)
        self._shares: dict[int, list[np.ndarray]] = defaultdict(list)
        widest: dict[tuple[int, int], DimKey] = {}  # (node id, group id) -> dim
        axes: dict[str, dict[int, DimKey]] = defaultdict(dict)  # tensor -> axis -> dim
        for group in groups:
            for key, labels in group.dims.items():
                for node in graph.nodes.get(key, ()):
                    slot = (id(node), group.id)
                    if slot not in widest or labels.size > group.dims[widest[slot]].size:
                        widest[slot] = key
                if graph.dims[key].is_param:
                    axes[split_key(key[0])[0]].setdefault(key[1], key)
        group_of = {key: g.id for g in groups for key in g.dims}

        def row(key: DimKey) -> int:
            if key not in self._rows:
                gid = group_of[key]
                labels = by_id[gid].dims[key]
                self._rows[key] = len(self._rows)
                self._group_rows[gid].append(self._rows[key])
                share = np.bincount(labels, minlength=by_id[gid].size) / max(labels.size, 1)
                self._shares[gid].append(share)
            return self._rows[key]

        node_rows: dict[int, list[int]] = defaultdict(list)
        for (node_id, _), key in widest.items():
            node_rows[node_id].append(row(key))
        sizes = {
            name: v.const_value.size
            for name, v in graph.model.graph.initializers.items()
            if v.const_value is not None
        }
        self.total_flops = sum(costs.values()) or 1
        self.total_params = report.total_params or 1
        self._terms = {
            "flops": _terms([(c, node_rows.get(n, [])) for n, c in costs.items()]),
            "params": _terms(
                [(sizes.get(t, 0), [row(k) for k in per.values()]) for t, per in axes.items()]
            ),
        }
        self._matrix = {gid: np.stack(rows) for gid, rows in self._shares.items()}

    def reduction(self, kind: str, removed: dict[int, list[int]]) -> float:
        """Predicted share of FLOPs (or params) removed with ``removed`` units per group."""
        costs, index = self._terms[kind]
        kept = np.ones(len(self._rows) + 1)  # the last slot pads terms: always kept
        for gid, units in removed.items():
            if units and gid in self._matrix:
                rows = self._group_rows[gid]
                kept[rows] = 1.0 - self._matrix[gid][:, units].sum(axis=1)
        total = self.total_flops if kind == "flops" else self.total_params
        return float(costs @ (1.0 - kept[index].prod(axis=1))) / total

    def unit_savings(self, kind: str, group_id: int) -> np.ndarray:
        """Per unit of the group, the share of the model's FLOPs (params) removing it alone
        saves (first order: one unit's share of each dim is small)."""
        costs, index = self._terms[kind]
        if group_id not in self._matrix:
            return np.zeros(0)
        rows = self._group_rows[group_id]
        position = np.full(len(self._rows) + 1, -1)
        position[rows] = np.arange(len(rows))
        weight = np.zeros(len(rows))
        hits = position[index]
        for column in range(index.shape[1]):
            mask = hits[:, column] >= 0
            np.add.at(weight, hits[mask, column], costs[mask])
        total = self.total_flops if kind == "flops" else self.total_params
        return weight @ self._matrix[group_id] / total


def _terms(terms: list[tuple[int, list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Costs and their row indices, padded with the always-kept slot (-1 wraps to it)."""
    terms = [(c, rows) for c, rows in terms if rows and c]
    width = max((len(rows) for _, rows in terms), default=1)
    index = np.full((len(terms), width), -1, dtype=np.int64)
    for i, (_, rows) in enumerate(terms):
        index[i, : len(rows)] = rows
    return np.array([float(c) for c, _ in terms]), index


def plan_group(
    group: ZeroInvariantGroup, scores: np.ndarray, round_to: int | None, max_ratio: float
) -> GroupPlan:
    removable = set(group.removable_units)
    candidates = [int(u) for u in np.argsort(scores, kind="stable") if u in removable]
    order = group_safe_units(group, candidates, group.size)
    order = sorted(order, key=lambda u: (scores[u], u))
    channels = _channel_dim(group)
    counts = np.bincount(channels, minlength=group.size)
    unit_elems = int(counts.max()) if counts.min() == counts.max() else 0
    align = round_to if round_to is not None else default_round_to(len(channels))
    step = align // math.gcd(align, unit_elems) if unit_elems and align > 1 else 1
    limit = min(len(order), math.floor(max_ratio * group.size))
    return GroupPlan(group, order, scores, step, limit)


def _channel_dim(group: ZeroInvariantGroup) -> np.ndarray:
    """Unit labels of the dim whose kept count alignment is judged on: one holding every
    unit, with the fewest elements per unit (a layer's channels; a Concat's output rather
    than one branch of it, which holds only some units)."""
    dims = list(group.dims.values())
    counts = [np.bincount(labels, minlength=group.size) for labels in dims]
    whole = [i for i, c in enumerate(counts) if c.size and c.min() > 0]
    if not whole:
        return max(dims, key=len)
    return dims[min(whole, key=lambda i: (counts[i].max(), i))]


def allocate(
    plans: list[GroupPlan], cost: CostModel, kind: str, goal: float, allocation: str
) -> dict[int, list[int]]:
    """Units to remove per group id so the predicted reduction reaches ``goal``.

    ``global`` ranks units by importance per unit of cost: a unit's share of its group's
    importance over the share of FLOPs (params) removing it saves, so that an FFN channel
    (1/1536 of its layer's signal, little cost) and an attention head (1/12 of the signal,
    much cost) compete on what they carry per FLOP.
    """
    # A unit's share of its group's signal (scores are mean-normalized, so score / size)
    # over the share of the model's cost it saves.
    value = {p.group.id: p.scores / (p.group.size * _savings(p, cost, kind)) for p in plans}

    def removal(x: float) -> dict[int, list[int]]:
        out = {}
        for plan in plans:
            if allocation == "uniform":
                count = round(x * plan.group.size)
            else:
                count = int(np.count_nonzero(value[plan.group.id][plan.order] < x))
            out[plan.group.id] = plan.removed_for(count)
        return out

    def predicted(x: float) -> float:
        return cost.reduction(kind, removal(x))

    finite = [float(v[np.isfinite(v)].max()) for v in value.values() if np.isfinite(v).any()]
    high = (1.0 if allocation == "uniform" else max(finite, default=0.0)) + 1e-9
    if predicted(high) < goal:
        return removal(high)  # the most the limits allow; the caller reports the shortfall
    low = 0.0
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        if predicted(mid) >= goal:
            high = mid
        else:
            low = mid
    return removal(high)


def _savings(plan: GroupPlan, cost: CostModel, kind: str) -> np.ndarray:
    """Per unit, the share of the model's FLOPs (params) removing it saves."""
    saved = cost.unit_savings(kind, plan.group.id)
    if saved.size != plan.group.size:
        saved = np.zeros(plan.group.size)
    # A unit that saves nothing ranks last (its value becomes huge), never first.
    return np.where(saved > 0, saved, 1e-300)
