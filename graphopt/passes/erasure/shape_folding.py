"""Shape and Size of tensors whose dims are static become constants.

A Shape of a partly dynamic tensor (batch symbolic, channels fixed: the TorchScript
exporter's Shape→Gather→Unsqueeze→Concat→Reshape) is folded where it is read: a Gather or a
Slice of it that selects only static dims becomes a constant. So is an Equal of shape
entries that is decided whatever the symbolic dims are: the TorchScript exporter guards
every ``expand`` with ``Where(Equal(shape, -1), 1, shape)``, and a dim is never -1.

Shapes are re-inferred from the graph inputs first: a stale declared shape must not be
folded in (:func:`graphopt.analysis.shapes.reconcile_shapes`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.analysis.channel_shapes import Context
from graphopt.analysis.shape_entries import decided_entries
from graphopt.analysis.shapes import reconcile_shapes
from graphopt.registry import GraphPass, Stage, register


def _shape_slice(node: ir.Node, dims: tuple[int, ...]) -> list[int]:
    """Shape-15's start/end (negative counts from the back, clamped)."""
    rank = len(dims)
    start = editing.attribute(node, "start", 0)
    end = editing.attribute(node, "end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return list(dims[start:end])


@register
class ShapeFoldingPass(GraphPass):
    """Replace Shape (with start/end) and Size of fully static tensors by constants; else keep.

    Also: reads of a partly static Shape that select static dims, and Equals of shape
    entries decided whatever the symbolic dims are.
    """

    name = "shape-folding"
    ops = frozenset(("Shape", "Size"))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        # A stale declared shape folded here would pin the model to the stale size.
        reconcile_shapes(model)
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, ("Shape", "Size")) or node.graph is None:
                continue
            dims = editing.static_shape(node.inputs[0])
            if dims is None:
                if node.op_type == "Shape":
                    hits += _fold_static_reads(node)
                continue
            if node.op_type == "Shape":
                array = np.array(_shape_slice(node, dims), dtype=np.int64)
            else:
                array = np.array(int(np.prod(dims)), dtype=np.int64)
            base = node.outputs[0].name or f"{node.op_type.lower()}_const"
            constant = editing.add_constant(node, base + "_folded", array)
            if editing.replace_value(node.outputs[0], constant):
                editing.remove_node(node)
                hits += 1
            else:
                editing.remove_node(constant.producer())
        return hits + _fold_decided_equals(model)


def _fold_decided_equals(model: ir.Model) -> int:
    """Replace each Equal over shape entries whose every output entry is decided by a
    constant (only shape-sized vectors: shape_entries follows at most 64 entries)."""
    ctx = Context()
    hits = 0
    for node in editing.all_nodes(model):
        if not editing.is_op(node, "Equal") or node.graph is None or len(node.inputs) != 2:
            continue
        result = node.outputs[0]
        if result.shape is None or len(result.shape) > 1:
            continue
        entries = decided_entries(ctx, result)
        if entries is None or not all(isinstance(e, bool) for e in entries):
            continue
        array = np.array(entries, dtype=np.bool_)
        if len(result.shape) == 0:
            array = array.reshape(())
        base = result.name or "equal_const"
        constant = editing.add_constant(node, base + "_folded", array)
        if editing.replace_value(result, constant):
            editing.remove_node(node)
            hits += 1
        else:
            editing.remove_node(constant.producer())
    return hits


def _known_dims(node: ir.Node) -> list[int | None] | None:
    """The Shape node's output as a list: ints where static, None where symbolic."""
    source = node.inputs[0]
    if source is None or source.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in source.shape.dims]
    rank = len(dims)
    start = editing.attribute(node, "start", 0)
    end = editing.attribute(node, "end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return dims[start:end]


def _selected(reader: ir.Node, index: int, dims: list[int | None]) -> np.ndarray | None:
    """What a Gather/Slice reading the shape selects, when it is all static."""
    if index != 0:
        return None
    n = len(dims)
    if editing.is_op(reader, "Gather") and editing.attribute(reader, "axis", 0) == 0:
        indices = editing.constant_array(reader.inputs[1] if len(reader.inputs) > 1 else None)
        if indices is None or indices.dtype.kind not in "iu":
            return None
        flat = [int(i) + n if i < 0 else int(i) for i in indices.reshape(-1)]
        if any(not 0 <= i < n for i in flat):
            return None  # out of range: leave the runtime error to the runtime
        picked = [dims[i] for i in flat]
        if any(d is None for d in picked):
            return None
        return np.array(picked, dtype=np.int64).reshape(indices.shape)
    if editing.is_op(reader, "Slice") and len(reader.inputs) >= 3:
        starts = editing.const_ints(reader.inputs[1])
        ends = editing.const_ints(reader.inputs[2])
        axes = editing.const_ints(reader.inputs[3]) if len(reader.inputs) > 3 else [0]
        steps = editing.const_ints(reader.inputs[4]) if len(reader.inputs) > 4 else [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or len(ends) != 1:
            return None
        if axes not in ([0], [-1]) or steps != [1]:
            return None
        # ONNX Slice with step 1 clamps like Python slicing (large ends included).
        picked = dims[slice(starts[0], ends[0])]
        if any(d is None for d in picked):
            return None
        return np.array(picked, dtype=np.int64)
    return None


def _fold_static_reads(shape_node: ir.Node) -> int:
    """Fold the Gathers/Slices of a partly dynamic Shape that select static dims only."""
    dims = _known_dims(shape_node)
    if dims is None:
        return 0
    return fold_shape_reads(shape_node, dims)


def fold_shape_reads(shape_node: ir.Node, dims: list[int | None]) -> int:
    """Replace each Gather/Slice of ``shape_node``'s output that selects only known entries
    of ``dims`` (the Shape's output, None = unknown) by a constant."""
    hits = 0
    for use in list(shape_node.outputs[0].uses()):
        reader = use.node
        if reader.graph is None or len(reader.outputs) != 1:
            continue
        array = _selected(reader, use.idx, dims)
        if array is None:
            continue
        base = reader.outputs[0].name or f"{reader.op_type.lower()}_const"
        constant = editing.add_constant(reader, base + "_folded", array)
        if editing.replace_value(reader.outputs[0], constant):
            editing.remove_node(reader)
            hits += 1
        else:
            editing.remove_node(constant.producer())
    editing.remove_if_dead(shape_node)
    return hits
