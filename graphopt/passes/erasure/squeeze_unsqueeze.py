"""Squeeze→Unsqueeze and Unsqueeze→Squeeze pairs on the same axes cancel out; Unsqueeze→Unsqueeze
chains merge into one Unsqueeze."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.analysis.shapes import reconcile_shapes
from graphopt.registry import GraphPass, Stage, register


def _axes(node: ir.Node, rank: int | None) -> list[int] | None:
    """Sorted non-negative axes (attribute before opset 13, input after), or None."""
    if "axes" in node.attributes:
        axes = [int(a) for a in editing.attribute(node, "axes")]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = editing.const_ints(node.inputs[1])
    else:
        return None  # Squeeze without axes depends on which dims are 1
    if axes is None:
        return None
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a + rank if a < 0 else a for a in axes]
    return sorted(axes)


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _merged_unsqueeze_axes(first: list[int], second: list[int], rank: int) -> list[int]:
    """Axes of one Unsqueeze doing ``first`` then ``second`` (both non-negative, sorted).

    ``rank`` is the final rank; the intermediate tensor's dims fill, in order, the final
    positions that ``second`` does not insert, so ``first``'s axes move to those positions.
    """
    kept = [axis for axis in range(rank) if axis not in second]
    return sorted(set(second) | {kept[axis] for axis in first})


def _set_axes(node: ir.Node, axes: list[int], opset: int) -> None:
    if opset < 13:
        node.attributes["axes"] = ir.AttrInt64s("axes", axes)
        return
    graph = editing.owning_graph(node)
    array = np.array(axes, dtype=np.int64)
    if isinstance(graph, ir.Graph):
        value = editing.add_initializer(graph, "unsqueeze_axes", array)
    else:
        value = editing.add_constant(node, "unsqueeze_axes", array)
    node.replace_input_with(1, value)


@register
class SqueezeUnsqueezePass(GraphPass):
    """Cancel Squeeze→Unsqueeze / Unsqueeze→Squeeze on the same axes, merge Unsqueeze chains."""

    name = "squeeze-unsqueeze"
    ops = frozenset(("Squeeze", "Unsqueeze"))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        opset = editing.opset_version(model)
        reconcile_shapes(model)  # negative axes are read against ranks: not stale ones
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, ("Squeeze", "Unsqueeze")) or node.graph is None:
                continue
            middle = node.inputs[0]
            first = middle.producer() if middle is not None else None
            if first is None or not editing.is_op(first, ("Squeeze", "Unsqueeze")):
                continue
            if first.op_type == node.op_type:
                if node.op_type == "Unsqueeze" and self._merge_unsqueeze(first, node, opset):
                    hits += 1
                continue
            source = first.inputs[0]
            # Squeeze axes refer to its input's rank, Unsqueeze axes to its output's rank;
            # in both orders that is the rank of the outer tensors (source and result).
            rank = _rank(source)
            if rank is None:
                rank = _rank(node.outputs[0])
            first_axes = _axes(first, rank)
            second_axes = _axes(node, rank)
            if first_axes is None or first_axes != second_axes:
                continue
            if editing.replace_value(node.outputs[0], source):
                editing.remove_node(node)
                editing.remove_if_dead(first)
                hits += 1
        return hits

    @staticmethod
    def _merge_unsqueeze(first: ir.Node, node: ir.Node, opset: int) -> bool:
        """Unsqueeze(Unsqueeze(x, a), b) → Unsqueeze(x, merged) when only Unsqueezes read x.

        With several Unsqueeze readers each is merged in turn and the middle one dies after
        the last; any other reader would keep it alive and nothing would be gained.
        """
        middle = first.outputs[0]
        if middle.is_graph_output() or not all(
            use.idx == 0 and editing.is_op(use.node, "Unsqueeze") for use in middle.uses()
        ):
            return False
        rank = _rank(node.outputs[0])
        if rank is None:
            rank = _rank(first.inputs[0])
            first_axes = _axes(first, None)
            second_axes = _axes(node, None)
            if rank is None or first_axes is None or second_axes is None:
                return False
            rank += len(first_axes) + len(second_axes)
        first_axes = _axes(first, rank - len(_axes(node, rank) or []))
        second_axes = _axes(node, rank)
        if first_axes is None or second_axes is None:
            return False
        merged = _merged_unsqueeze_axes(first_axes, second_axes, rank)
        if len(merged) != len(first_axes) + len(second_axes):
            return False  # malformed (duplicate axes): leave it to ORT to complain
        node.replace_input_with(0, first.inputs[0])
        _set_axes(node, merged, opset)
        editing.remove_if_dead(first)
        return True
