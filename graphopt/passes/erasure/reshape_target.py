"""A Reshape target computed from shapes becomes a constant (one dynamic dim becomes -1).

Exporters spell ``x.view(*y.shape[:-2], 64, 197)`` as Shape→Slice→Concat→Reshape. Where
every element of the computed target is known from static dims and constants except at most
one, the target is a constant: the unknown element is replaced by -1. That is exact when the
known elements are all positive: Reshape then has one solution for the remaining dim (the
element count fixes it; with zero elements it is 0 both ways), and a 0 in the dynamic slot
(copy-from-input without allowzero) could only produce that same solution. The Shape,
Slice and Concat feeding it — and whatever only fed the Shape — then die.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.registry import GraphPass, Stage, register

_MAX_DEPTH = 8


def _elements(value: ir.Value | None, depth: int = 0) -> list[int | None] | None:
    """A small 1-D (or scalar) int tensor's elements: ints where known, None where dynamic."""
    if value is None or depth > _MAX_DEPTH:
        return None
    known = editing.const_ints(value, max_elements=64)
    if known is not None:
        return known
    node = value.producer()
    if node is None or len(node.outputs) != 1:
        return None
    if editing.is_op(node, "Shape"):
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
    if editing.is_op(node, "Gather") and editing.attribute(node, "axis", 0) == 0:
        data = _elements(node.inputs[0], depth + 1)
        index = editing.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if data is None or index is None or index.dtype.kind not in "iu" or index.ndim > 1:
            return None
        n = len(data)
        flat = [int(i) + n if i < 0 else int(i) for i in index.reshape(-1)]
        if any(not 0 <= i < n for i in flat):
            return None
        return [data[i] for i in flat]
    if editing.is_op(node, "Slice") and len(node.inputs) >= 3:
        data = _elements(node.inputs[0], depth + 1)
        starts = editing.const_ints(node.inputs[1])
        ends = editing.const_ints(node.inputs[2])
        axes = editing.const_ints(node.inputs[3]) if len(node.inputs) > 3 else [0]
        steps = editing.const_ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
        if data is None or None in (starts, ends, axes, steps):
            return None
        if len(starts) != 1 or len(ends) != 1 or axes not in ([0], [-1]) or steps != [1]:
            return None
        # Step-1 ONNX Slice clamps like Python slicing (INT64_MIN/MAX ends included).
        return data[slice(starts[0], ends[0])]
    if editing.is_op(node, "Unsqueeze"):
        axes = (
            editing.const_ints(node.inputs[1])
            if len(node.inputs) > 1
            else editing.attribute(node, "axes")
        )
        data = _elements(node.inputs[0], depth + 1)
        source = node.inputs[0]
        scalar = source is not None and source.shape is not None and len(source.shape) == 0
        if data is None or axes is None or list(axes) not in ([0], [-1]) or len(data) != 1:
            return None
        # Unsqueeze of a scalar gives [v]; of a 1-element vector a [1, 1] matrix (not 1-D).
        return data if scalar or _is_scalar_gather(source) else None
    if editing.is_op(node, "Concat") and editing.attribute(node, "axis", None) in (0, -1):
        result: list[int | None] = []
        for part in node.inputs:
            elements = _elements(part, depth + 1)
            if elements is None:
                return None
            result += elements
        return result
    return None


def _is_scalar_gather(value: ir.Value | None) -> bool:
    node = value.producer() if value is not None else None
    if node is None or not editing.is_op(node, "Gather") or len(node.inputs) != 2:
        return False
    index = editing.constant_array(node.inputs[1])
    return index is not None and index.ndim == 0


@register
class ReshapeTargetPass(GraphPass):
    """Computed Reshape targets known but for ≤ 1 dim → constant (-1 there); else keep.

    Refuses when a known element is 0 or -1 next to an unknown one (no unique solution).
    """

    name = "reshape-target"
    ops = frozenset(("Reshape",))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, "Reshape") or len(node.inputs) < 2 or node.graph is None:
                continue
            target = node.inputs[1]
            if target is None or editing.is_constant(target):
                continue
            elements = _elements(target)
            if elements is None or not elements:
                continue
            unknown = sum(1 for e in elements if e is None)
            if unknown > 1 or (unknown == 1 and any(e is not None and e <= 0 for e in elements)):
                continue
            array = np.array([-1 if e is None else e for e in elements], dtype=np.int64)
            base = (target.name or "reshape_target") + "_known"
            node.replace_input_with(1, editing.add_constant(node, base, array))
            producer = target.producer()
            if producer is not None:
                _remove_dead_chain(producer)
            hits += 1
        return hits


def _remove_dead_chain(node: ir.Node) -> None:
    """Remove ``node`` and, recursively, the producers only it read (when all are dead)."""
    inputs = list(node.inputs)
    if node.graph is None or not editing.remove_if_dead(node):
        return
    for value in inputs:
        producer = value.producer() if value is not None else None
        if producer is not None:
            _remove_dead_chain(producer)
