"""MatMul with a constant 2-D B followed by BatchNormalization, folded into one Gemm.

BatchNormalization normalizes axis 1. For MatMul(A, B) with A of rank 2 ([M, K] @ [K, N])
axis 1 is N, so BN is an affine map per column: A @ (B * s) + (beta - mean * s). For any
other rank of A axis 1 is not the MatMul's N (it is a batch or row axis) and the pass
refuses; A's rank is inferred when the graph does not carry it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register

# ORT's CPU Gemm kernels; other float types keep MatMul + Add.
_GEMM_TYPES = (np.float32, np.float64)


@register
class FuseMatMulBatchNormPass(GraphPass):
    """Fold inference BN after MatMul(A [M, K], const B [K, N]) into a Gemm; refuses rank != 2.

    Also refuses training BN, a shared MatMul output and non-float or non-constant weights.
    """

    name = "fuse-matmul-bn"
    ops = frozenset(("BatchNormalization",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        pairs = [
            node
            for graph in _common.all_graphs(model)
            for node in graph
            if editing.is_op(node, "BatchNormalization") and _matmul_of(node) is not None
        ]
        if any(_common.value_rank(_matmul_of(bn).inputs[0]) is None for bn in pairs):
            editing.fill_missing_shapes(model)
        maker = _common.WeightMaker(model)
        return sum(1 for bn in pairs if self._fuse(bn, maker))

    def _fuse(self, bn: ir.Node, maker: _common.WeightMaker) -> bool:
        matmul = _matmul_of(bn)
        if matmul is None or len(matmul.inputs) != 2:
            return False
        a, b = matmul.inputs
        if _common.value_rank(a) != 2:
            return False
        weight = editing.constant_array(b)
        if not _common.is_float_array(weight) or weight.ndim != 2 or a.dtype != b.dtype:
            return False
        affine = _common.bn_scale_shift(bn, weight.shape[1], weight.dtype)
        if affine is None:
            return False
        scale, shift = affine
        graph = editing.owning_graph(bn)
        base = b.name or "matmul"
        new_b = maker.add(
            graph, f"{base}_bn", (weight.astype(np.float64) * scale).astype(weight.dtype)
        )
        new_c = maker.add(graph, f"{base}_bn_bias", shift.astype(weight.dtype))
        if weight.dtype in _GEMM_TYPES:
            nodes = [ir.Node("", "Gemm", [a, new_b, new_c], name=bn.name)]
        else:
            mm = ir.Node("", "MatMul", [a, new_b], name=matmul.name)
            nodes = [mm, ir.Node("", "Add", [mm.outputs[0], new_c], name=bn.name)]
        result = nodes[-1].outputs[0]
        result.type, result.shape = bn.outputs[0].type, bn.outputs[0].shape
        editing.insert_before(bn, nodes)
        if not editing.replace_value(bn.outputs[0], result):
            for node in reversed(nodes):
                editing.remove_node(node)
            return False
        params = list(bn.inputs[1:])
        editing.remove_node(bn)
        editing.remove_node(matmul)
        for value in [b, *params]:
            _common.drop_if_unused(value)
        return True


def _matmul_of(bn: ir.Node) -> ir.Node | None:
    """The MatMul whose only reader is ``bn`` (as its data input), in the same graph."""
    if not bn.inputs or bn.inputs[0] is None:
        return None
    matmul = bn.inputs[0].producer()
    if matmul is None or not editing.is_op(matmul, "MatMul") or matmul.graph is not bn.graph:
        return None
    return matmul if editing.single_user(matmul.outputs[0]) is bn else None
