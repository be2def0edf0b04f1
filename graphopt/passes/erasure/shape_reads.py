"""Reads of a Shape that the exporter spelled the long way round.

Two exact rewrites on the TorchScript exporter's shape arithmetic:

* ``shape-through-slice``: Shape(Slice(x)) read (Gather/Slice of the shape) at an axis the
  Slice does not touch is x's dim there; when that dim is static the read becomes a constant.
  ONNX shape inference gives up on a Slice whose ``ends`` is computed, so it records no dim at
  all (BERT's ``position_ids[:, :seq]`` then keeps a whole Expand chain alive).
* ``shape-concat``: Concat(axis 0) of the single-element reads Shape(x)[0], …, Shape(x)[r-1]
  (Gather by a constant index, optionally Unsqueezed to 1-D), in order and complete, is
  Shape(x) itself.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.analysis.shapes import reconcile_shapes
from graphopt.passes.erasure.shape_folding import _shape_slice, fold_shape_reads
from graphopt.registry import GraphPass, Stage, register


def _rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    tensor = value.const_value
    return len(tensor.shape) if tensor is not None else None


def _dims(value: ir.Value) -> list[int | None] | None:
    """The value's dims: ints where static (shape or constant), None where unknown."""
    tensor = value.const_value
    if tensor is not None:
        return [int(d) for d in tensor.shape]
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape.dims]


def _slice_output_dims(node: ir.Node) -> list[int | None] | None:
    """Dims of a Slice's output that are the input's (axes it does not slice), else None."""
    if len(node.inputs) < 3 or node.inputs[0] is None:
        return None
    dims = _dims(node.inputs[0])
    starts = editing.const_ints(node.inputs[1])
    if dims is None or starts is None:
        return None
    rank = len(dims)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = editing.const_ints(node.inputs[3])
    else:
        axes = list(range(len(starts)))  # default axes: the first len(starts)
    if axes is None or any(not -rank <= a < rank for a in axes):
        return None
    sliced = {a + rank if a < 0 else a for a in axes}
    return [None if i in sliced else d for i, d in enumerate(dims)]


@register
class ShapeThroughSlicePass(GraphPass):
    """Fold reads of Shape(Slice(x)) at axes the Slice keeps and x has static; else keep."""

    name = "shape-through-slice"
    ops = frozenset(("Shape",))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        reconcile_shapes(model)  # folds x's dims: they must be the inputs', not stale ones
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, "Shape") or node.graph is None:
                continue
            source = node.inputs[0]
            producer = source.producer() if source is not None else None
            if producer is None or not editing.is_op(producer, "Slice"):
                continue
            dims = _slice_output_dims(producer)
            if dims is None or all(d is None for d in dims):
                continue
            hits += fold_shape_reads(node, _shape_slice(node, dims))
        return hits


def _shape_element(value: ir.Value | None) -> tuple[ir.Node, int] | None:
    """(Shape node, index) when ``value`` is the 1-element tensor [Shape(x)[index]]."""
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if editing.is_op(node, "Unsqueeze"):
        axes = (
            editing.const_ints(node.inputs[1])
            if len(node.inputs) > 1
            else editing.attribute(node, "axes")
        )
        if axes is None or list(axes) not in ([0], [-1]):
            return None
        gather = node.inputs[0].producer() if node.inputs[0] is not None else None
        want_scalar = True
    else:
        gather, want_scalar = node, False
    if gather is None or not editing.is_op(gather, "Gather") or len(gather.inputs) != 2:
        return None
    if editing.attribute(gather, "axis", 0) != 0:
        return None
    index = editing.constant_array(gather.inputs[1])
    if index is None or index.dtype.kind not in "iu" or index.size != 1:
        return None
    if (index.ndim == 0) != want_scalar or index.ndim > 1:
        return None
    shape = gather.inputs[0].producer() if gather.inputs[0] is not None else None
    if shape is None or not editing.is_op(shape, "Shape"):
        return None
    return shape, int(index.reshape(-1)[0])


@register
class ShapeConcatPass(GraphPass):
    """Concat of Shape(x)[0], …, Shape(x)[r-1] (all of x's dims, in order) → Shape(x); else keep."""

    name = "shape-concat"
    ops = frozenset(("Concat",))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        reconcile_shapes(model)  # the rank of x decides; a stale one would mislead
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, "Concat") or node.graph is None:
                continue
            if editing.attribute(node, "axis", None) not in (0, -1) or not node.inputs:
                continue
            parts = [_shape_element(value) for value in node.inputs]
            if any(p is None for p in parts):
                continue
            shape = parts[0][0]
            # Shape with start/end reads a sub-range; only the whole shape is handled.
            if any(p[0] is not shape for p in parts) or shape.attributes:
                continue
            rank = _rank(shape.inputs[0])
            if rank is None or len(parts) != rank:
                continue
            indices = [i + rank if i < 0 else i for _, i in parts]
            if indices != list(range(rank)):
                continue
            inputs = list(node.inputs)
            if editing.replace_value(node.outputs[0], shape.outputs[0]):
                editing.remove_node(node)
                for value in inputs:
                    _remove_chain(value)
                hits += 1
        return hits


def _remove_chain(value: ir.Value | None) -> None:
    """Remove the now-unread Unsqueeze/Gather that produced ``value`` (never the Shape)."""
    node = value.producer() if value is not None else None
    if node is None or node.graph is None or not editing.is_op(node, ("Unsqueeze", "Gather")):
        return
    source = node.inputs[0]
    if editing.remove_if_dead(node):
        _remove_chain(source)
