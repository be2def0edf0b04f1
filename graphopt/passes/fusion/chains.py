"""Chains of one shape op merged into one: Concat→Concat, Slice→Slice, Squeeze→Squeeze.

Each pass needs the inner node's output to feed only the outer node (otherwise both stay
and nothing is saved) and all axes/indices as constants.

* Concat(axis=a) reading a Concat(axis=a): the inner inputs take its place, in order.
  Axes compare equal as written, or after normalizing with a known rank.
* Slice (opset >= 10) → Slice: disjoint axes simply merge; on a shared axis they compose
  when both steps are 1 and all starts/ends are non-negative (then [s1:e1][s2:e2] is
  [s1 + s2 : min(e1, s1 + e2)], clamping included). Anything else is refused.
* Squeeze → Squeeze with explicit axes: the outer axes are mapped back to the inner input's
  positions. Negative axes need a known rank; Squeeze without axes is refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register

_INT64_MAX = np.iinfo(np.int64).max


def _inner(node: ir.Node, op_type: str) -> ir.Node | None:
    """The same-graph ``op_type`` node producing ``node``'s first input, read only there."""
    if not node.inputs or node.inputs[0] is None:
        return None
    inner = node.inputs[0].producer()
    if inner is None or not editing.is_op(inner, op_type) or inner.graph is not node.graph:
        return None
    return inner if editing.single_user(inner.outputs[0]) is node else None


@register
class MergeConcatsPass(GraphPass):
    """Flatten a Concat read only by a Concat on the same axis into it; refuses other axes."""

    name = "merge-concats"
    ops = frozenset(("Concat",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                if editing.is_op(node, "Concat"):
                    while self._merge_one(node):
                        hits += 1
        return hits

    def _merge_one(self, outer: ir.Node) -> bool:
        axis = editing.attribute(outer, "axis", None)
        for index, value in enumerate(outer.inputs):
            inner = value.producer() if value is not None else None
            if (
                inner is None
                or not editing.is_op(inner, "Concat")
                or inner.graph is not outer.graph
            ):
                continue
            if editing.single_user(value) is not outer:
                continue
            inner_axis = editing.attribute(inner, "axis", None)
            if not _same_axis(axis, inner_axis, [value, *inner.inputs, *outer.inputs]):
                continue
            inputs = list(outer.inputs)
            inputs[index : index + 1] = list(inner.inputs)
            outer.resize_inputs(len(inputs))
            for i, new in enumerate(inputs):
                outer.replace_input_with(i, new)
            editing.remove_node(inner)
            return True
        return False


def _same_axis(outer: int | None, inner: int | None, values: list[ir.Value | None]) -> bool:
    """The axes agree as written, or once normalized by the rank of any of ``values`` (all
    Concat inputs and outputs share one rank)."""
    if outer is None or inner is None:
        return False
    if outer == inner:
        return True
    rank = next((r for r in map(_common.value_rank, values) if r), None)
    return rank is not None and outer % rank == inner % rank


@register
class MergeSlicesPass(GraphPass):
    """Merge Slice→Slice on disjoint axes or unit-step non-negative ranges; refuses the rest.

    A Slice read by several Slices merges into each when it can into all of them. Refuses
    opset < 10 (attribute form), non-constant starts/ends/axes/steps.
    """

    name = "merge-slices"
    ops = frozenset(("Slice",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        if _common.default_opset(model) < 10:
            return 0
        maker = _common.WeightMaker(model)
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                if node.graph is graph and editing.is_op(node, "Slice"):
                    hits += self._merge_into_readers(node, maker)
        return hits

    def _merge_into_readers(self, inner: ir.Node, maker: _common.WeightMaker) -> int:
        """Merge ``inner`` into every Slice reading it (all or none); the merge count."""
        output = inner.outputs[0]
        uses = output.uses()
        if not uses or output.is_graph_output() or len(inner.outputs) != 1:
            return 0
        readers = [use.node for use in uses]
        if len({id(n) for n in readers}) != len(readers):
            return 0
        plans = []
        for use, outer in zip(uses, readers, strict=True):
            ok = use.idx == 0 and editing.is_op(outer, "Slice") and outer.graph is inner.graph
            merged = _compose(inner, outer) if ok else None
            if merged is None:
                return 0
            plans.append((outer, merged))
        graph = editing.owning_graph(inner)
        old = list(inner.inputs[1:])
        for outer, merged in plans:
            base = outer.name or "slice"
            axes = sorted(merged)
            columns = list(zip(*(merged[a] for a in axes), strict=True))
            starts, ends, steps = (
                maker.add(graph, f"{base}_{label}", np.array(col, np.int64))
                for label, col in zip(("starts", "ends", "steps"), columns, strict=True)
            )
            axes_value = maker.add(graph, f"{base}_axes", np.array(axes, np.int64))
            old += list(outer.inputs[1:])
            outer.resize_inputs(5)
            outer.replace_input_with(0, inner.inputs[0])
            for i, value in enumerate((starts, ends, axes_value, steps), start=1):
                outer.replace_input_with(i, value)
        editing.remove_node(inner)
        for value in old:
            _common.drop_if_unused(value)
        return len(plans)


def _compose(inner: ir.Node, outer: ir.Node) -> dict[int, tuple[int, int, int]] | None:
    """{axis: (start, end, step)} of one Slice equal to ``outer(inner(x))``, or None."""
    first, second = _slice_spec(inner), _slice_spec(outer)
    if first is None or second is None:
        return None
    rank = _common.value_rank(inner.inputs[0])
    merged: dict[int, tuple[int, int, int]] = {}
    for spec in (first, second):
        for axis, (start, end, step) in spec.items():
            if axis < 0:
                if rank is None:
                    return None
                axis += rank
            if axis not in merged:
                merged[axis] = (start, end, step)
                continue
            s1, e1, t1 = merged[axis]
            if t1 != 1 or step != 1 or min(s1, e1, start, end) < 0:
                return None
            merged[axis] = (min(s1 + start, _INT64_MAX), min(e1, s1 + end, _INT64_MAX), 1)
    return merged


def _slice_spec(node: ir.Node) -> dict[int, tuple[int, int, int]] | None:
    """{axis as written: (start, end, step)} of an opset >= 10 Slice, or None."""
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = editing.const_ints(inputs[1]), editing.const_ints(inputs[2])
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = list(range(len(starts))) if inputs[3] is None else editing.const_ints(inputs[3])
    steps = [1] * len(starts) if inputs[4] is None else editing.const_ints(inputs[4])
    if axes is None or steps is None or len(axes) != len(starts) or len(steps) != len(starts):
        return None
    if len(set(axes)) != len(axes) or 0 in steps:
        return None
    return {a: (s, e, t) for a, s, e, t in zip(axes, starts, ends, steps, strict=True)}


@register
class MergeSqueezesPass(GraphPass):
    """Merge Squeeze→Squeeze with explicit axes into one; refuses axes-less or unknown rank."""

    name = "merge-squeezes"
    ops = frozenset(("Squeeze",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        opset = _common.default_opset(model)
        maker = _common.WeightMaker(model)
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                if editing.is_op(node, "Squeeze") and self._merge(node, opset, maker):
                    hits += 1
        return hits

    def _merge(self, outer: ir.Node, opset: int, maker: _common.WeightMaker) -> bool:
        inner = _inner(outer, "Squeeze")
        if inner is None:
            return False
        first, second = _squeeze_axes(inner, opset), _squeeze_axes(outer, opset)
        if not first or not second:
            return False
        rank = _common.value_rank(inner.inputs[0])
        if min(first + second) < 0:
            if rank is None:
                return False
            first = [a % rank for a in first]
            second = [a % (rank - len(first)) for a in second]
        if len(set(first)) != len(first):
            return False
        kept = (i for i in range(max(first) + max(second) + 2) if i not in first)
        remaining = list(kept)
        mapped = [remaining[a] for a in second]
        axes = sorted(first + mapped)
        if opset < 13:
            outer.attributes["axes"] = ir.AttrInt64s("axes", axes)
            outer.replace_input_with(0, inner.inputs[0])
        else:
            old = outer.inputs[1]
            graph = editing.owning_graph(outer)
            value = maker.add(graph, f"{outer.name or 'squeeze'}_axes", np.array(axes, np.int64))
            outer.replace_input_with(0, inner.inputs[0])
            outer.replace_input_with(1, value)
            _common.drop_if_unused(old)
        inner_axes = inner.inputs[1] if len(inner.inputs) > 1 else None
        editing.remove_node(inner)
        _common.drop_if_unused(inner_axes)
        return True


def _squeeze_axes(node: ir.Node, opset: int) -> list[int] | None:
    if opset < 13:
        axes = editing.attribute(node, "axes", None)
        return None if axes is None else [int(a) for a in axes]
    return editing.const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
