"""How many units each group loses, so that the model sheds the asked share of FLOPs/params.

A cost model predicts the pruned model's cost from per-group keep fractions: a node's
FLOPs (a parameter's size) scale by the product of the keep fractions of the distinct
groups whose dims it touches (a Conv between two groups shrinks quadratically, a depthwise
Conv whose input and output are one group linearly). ``uniform`` removes the same share of
every prunable group; ``global`` removes every unit whose normalized importance is under
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

from graphopt.analysis.dependency import split_key
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
    unit_share: np.ndarray  # per unit, its share of the group's channels

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

    def keep_fraction(self, removed: list[int]) -> float:
        return 1.0 - float(self.unit_share[removed].sum()) if removed else 1.0


class CostModel:
    """Predicted FLOPs and parameter counts under per-group keep fractions."""

    def __init__(self, report: ZigReport, groups: list[ZeroInvariantGroup]) -> None:
        graph = report.graph
        costs = _node_flops(graph.model)
        node_groups: dict[int, set[int]] = defaultdict(set)
        tensor_groups: dict[str, set[int]] = defaultdict(set)
        for group in groups:
            for key in group.dims:
                for node in graph.nodes.get(key, ()):
                    node_groups[id(node)].add(group.id)
                if graph.dims[key].is_param:
                    tensor_groups[split_key(key[0])[0]].add(group.id)
        self.total_flops = sum(costs.values()) or 1
        self.total_params = report.total_params or 1
        self.flops_terms = [(c, tuple(node_groups.get(n, ()))) for n, c in costs.items()]
        sizes = {
            name: v.const_value.size
            for name, v in graph.model.graph.initializers.items()
            if v.const_value is not None
        }
        self.params_terms = [(sizes.get(t, 0), tuple(g)) for t, g in tensor_groups.items()]

    def reduction(self, kind: str, keep: dict[int, float]) -> float:
        """Predicted share of FLOPs (or params) removed."""
        terms, total = (
            (self.flops_terms, self.total_flops)
            if kind == "flops"
            else (self.params_terms, self.total_params)
        )
        removed = 0.0
        for cost, groups in terms:
            if groups:
                removed += cost * (1.0 - math.prod(keep.get(g, 1.0) for g in groups))
        return removed / total


def plan_group(
    group: ZeroInvariantGroup, scores: np.ndarray, round_to: int | None, max_ratio: float
) -> GroupPlan:
    removable = set(group.removable_units)
    candidates = [int(u) for u in np.argsort(scores, kind="stable") if u in removable]
    order = group_safe_units(group, candidates, group.size)
    order = sorted(order, key=lambda u: (scores[u], u))
    first = next(iter(group.dims.values()))
    counts = np.bincount(first, minlength=group.size).astype(np.float64)
    share = counts / counts.sum()
    unit_elems = int(counts.max()) if counts.min() == counts.max() else 0
    align = round_to if round_to is not None else default_round_to(len(first))
    step = align // math.gcd(align, unit_elems) if unit_elems and align > 1 else 1
    limit = min(len(order), math.floor(max_ratio * group.size))
    return GroupPlan(group, order, scores, step, limit, share)


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
    value = {p.group.id: p.scores / (p.group.size * _marginal(p, cost, kind)) for p in plans}

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
        chosen = removal(x)
        keep = {p.group.id: p.keep_fraction(chosen[p.group.id]) for p in plans}
        return cost.reduction(kind, keep)

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


def _marginal(plan: GroupPlan, cost: CostModel, kind: str) -> float:
    """Share of the model's FLOPs (params) that removing one unit of the group saves."""
    one = float(plan.unit_share.mean()) if plan.unit_share.size else 0.0
    saved = cost.reduction(kind, {plan.group.id: 1.0 - one})
    # A group whose units save nothing ranks last (its value becomes huge), never first.
    return saved if saved > 0 else 1e-300
