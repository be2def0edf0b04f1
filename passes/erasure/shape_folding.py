"""Shape and Size of tensors whose dims are all static become constants."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
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
    """Replace Shape (with start/end) and Size of fully static tensors by constants; else keep."""

    name = "shape-folding"
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, ("Shape", "Size")) or node.graph is None:
                continue
            dims = editing.static_shape(node.inputs[0])
            if dims is None:
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
        return hits
