"""ReduceX(keepdims=0) followed by Unsqueeze of the same axes → ReduceX(keepdims=1).

keepdims=1 leaves a 1 at every reduced axis; Unsqueeze inserts a 1 at each of its axes,
counted in the *output* (which has the input's rank again). So the pair equals the kept-dims
reduce exactly when both axis sets are equal once normalized (negative axes need the rank).
The axes are read from the attribute (ReduceSum before opset 13, the others before 18) or
the constant ``axes`` input; a reduce over all axes (no axes) or with
``noop_with_empty_axes`` set is refused.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register

REDUCE_OPS = (
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)


@register
class FuseReduceUnsqueezePass(GraphPass):
    """ReduceX(keepdims=0) → Unsqueeze on the same axes becomes ReduceX(keepdims=1).

    Refuses different or non-constant axes, reduce-all, noop_with_empty_axes, shared output.
    """

    name = "fuse-reduce-unsqueeze"
    ops = frozenset(REDUCE_OPS)
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        opset = _common.default_opset(model)
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                if editing.is_op(node, REDUCE_OPS) and self._fuse(node, opset):
                    hits += 1
        return hits

    def _fuse(self, reduce: ir.Node, opset: int) -> bool:
        if editing.attribute(reduce, "keepdims", 1) != 0:
            return False
        if editing.attribute(reduce, "noop_with_empty_axes", 0):
            return False
        unsqueeze = editing.single_user(reduce.outputs[0])
        if unsqueeze is None or not editing.is_op(unsqueeze, "Unsqueeze"):
            return False
        if unsqueeze.graph is not reduce.graph or unsqueeze.inputs[0] is not reduce.outputs[0]:
            return False
        reduced = _reduce_axes(reduce, opset)
        if opset < 13:
            unsqueezed = editing.attribute(unsqueeze, "axes", None)
            unsqueezed = None if unsqueezed is None else [int(a) for a in unsqueezed]
        else:
            unsqueezed = (
                editing.const_ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
            )
        if not reduced or not unsqueezed:
            return False
        if min(reduced + unsqueezed) < 0:
            rank = _common.value_rank(reduce.inputs[0])
            if rank is None:
                return False
            reduced = [a % rank for a in reduced]
            unsqueezed = [a % rank for a in unsqueezed]
        if len(set(unsqueezed)) != len(unsqueezed) or set(reduced) != set(unsqueezed):
            return False
        reduce.attributes["keepdims"] = ir.AttrInt64("keepdims", 1)
        result = reduce.outputs[0]
        result.shape = unsqueeze.outputs[0].shape
        if not editing.replace_value(unsqueeze.outputs[0], result):
            reduce.attributes["keepdims"] = ir.AttrInt64("keepdims", 0)
            return False
        old_axes = unsqueeze.inputs[1] if len(unsqueeze.inputs) > 1 else None
        editing.remove_node(unsqueeze)
        _common.drop_if_unused(old_axes)
        return True


def _reduce_axes(reduce: ir.Node, opset: int) -> list[int] | None:
    axes_as_input = opset >= 18 or (reduce.op_type == "ReduceSum" and opset >= 13)
    if not axes_as_input:
        axes = editing.attribute(reduce, "axes", None)
        return None if axes is None else [int(a) for a in axes]
    return editing.const_ints(reduce.inputs[1]) if len(reduce.inputs) > 1 else None
