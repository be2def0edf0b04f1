"""Relu / Clip chains merged into one node with the combined bounds.

Relu is Clip(0, +inf), and clamping twice clamps to the intersection: Clip(Clip(x, a, b),
c, d) = Clip(x, max(a, c), min(b, d)) *provided the intersection is not empty* (for
disjoint ranges the result is a constant the merged Clip would not produce): refused then.
Bounds come from Clip's attributes before opset 11 and its optional constant scalar inputs
from 11; a non-constant bound is refused. Only float tensors are merged.

onnxscript's ``successive_relu_rule`` / ``successive_clip_rule`` family (in
``rules/common/_fuse_relus_clips.py``) covers the same chains but reads only the opset >= 11
input form of Clip and merges disjoint ranges (max(a, c) > min(b, d)) into a wrong Clip;
this small pass reads both Clip forms and checks the intersection.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register

Bounds = tuple[float | None, float | None]


@register
class FuseReluClipChainsPass(GraphPass):
    """Merge Relu→Relu, Relu→Clip, Clip→Clip, Clip→Relu into one; refuses disjoint bounds.

    Also refuses non-constant bounds, non-float tensors and an inner output read elsewhere.
    """

    name = "fuse-relu-clip-chains"
    ops = frozenset(("Relu", "Clip"))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        opset = _common.default_opset(model)
        maker = _common.WeightMaker(model)
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                live = node.graph is graph  # an earlier merge may have removed it
                if (
                    live
                    and editing.is_op(node, ("Relu", "Clip"))
                    and self._merge(node, opset, maker)
                ):
                    hits += 1
        return hits

    def _merge(self, outer: ir.Node, opset: int, maker: _common.WeightMaker) -> bool:
        source = outer.inputs[0] if outer.inputs else None
        inner = source.producer() if source is not None else None
        if inner is None or not editing.is_op(inner, ("Relu", "Clip")):
            return False
        if inner.graph is not outer.graph or editing.single_user(source) is not outer:
            return False
        x = inner.inputs[0]
        if not _common.is_float(x):
            return False
        first, second = _bounds(inner, opset), _bounds(outer, opset)
        if first is None or second is None:
            return False
        low = _pick(max, first[0], second[0])
        high = _pick(min, first[1], second[1])
        if low is not None and high is not None and low > high:
            return False
        if outer.op_type == "Relu" and inner.op_type == "Relu":
            pass  # Relu(Relu(x)) keeps the outer Relu as is
        elif (low, high) == (0.0, None) and opset >= 6:
            outer.op_type = "Relu"
            _set_clip_bounds(outer, None, None, opset, maker)
            outer.resize_inputs(1)
        else:
            outer.op_type = "Clip"
            _set_clip_bounds(outer, low, high, opset, maker, x.dtype)
        old = list(inner.inputs[1:])
        outer.replace_input_with(0, x)
        editing.remove_node(inner)
        for value in old:
            _common.drop_if_unused(value)
        return True


def _pick(choose, a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else choose(a, b)


def _bounds(node: ir.Node, opset: int) -> Bounds | None:
    """(low, high) of a Relu or Clip with None for unbounded, or None when unknown."""
    if node.op_type == "Relu":
        return 0.0, None
    if opset < 11:
        low = editing.attribute(node, "min", None)
        high = editing.attribute(node, "max", None)
        return (None if low is None else float(low)), (None if high is None else float(high))
    result: list[float | None] = []
    for index in (1, 2):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            result.append(None)
            continue
        array = editing.constant_array(value)
        if array is None or array.size != 1:
            return None
        result.append(float(array.reshape(()).item()))
    return result[0], result[1]


def _set_clip_bounds(
    node: ir.Node,
    low: float | None,
    high: float | None,
    opset: int,
    maker: _common.WeightMaker,
    dtype: ir.DataType | None = None,
) -> None:
    """Write the bounds in the form the opset expects (attributes before 11, inputs from 11)."""
    old = list(node.inputs[1:])
    if opset < 11:
        for name, bound in (("min", low), ("max", high)):
            node.attributes.pop(name, None)
            if bound is not None:
                node.attributes[name] = ir.AttrFloat32(name, bound)
        return
    if dtype is None:
        for i in range(1, len(node.inputs)):
            node.replace_input_with(i, None)
    else:
        graph = editing.owning_graph(node)
        np_dtype = dtype.numpy()
        node.resize_inputs(3)
        for index, bound in ((1, low), (2, high)):
            value = None
            if bound is not None:
                value = maker.add(graph, f"{node.name or 'clip'}_bound", np.array(bound, np_dtype))
            node.replace_input_with(index, value)
    for value in old:
        _common.drop_if_unused(value)
