"""Transpose([1, 0]) feeding Gemm's A or B folded into the Gemm's transA / transB flag.

Gemm(Transpose(X), ...) equals Gemm(X, ...) with transA flipped (likewise B). The rewrite
only pays when the Transpose disappears, so a Transpose read by anything other than Gemm A/B
inputs (or that is a graph output) is left as it is, with its Gemms untouched.
onnxscript's ``transpose_*_matmul_add_to_gemm`` rules handle Transpose → MatMul → Add only,
not a Transpose in front of an existing Gemm.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register

_FLAGS = {0: "transA", 1: "transB"}


@register
class FuseTransposeGemmPass(GraphPass):
    """Fold Transpose [1, 0] feeding Gemm A/B into transA/transB; refuses one with other users."""

    name = "fuse-transpose-gemm"
    ops = frozenset(("Transpose",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                if editing.is_op(node, "Transpose"):
                    hits += self._fuse(node)
        return hits

    def _fuse(self, transpose: ir.Node) -> int:
        result = transpose.outputs[0]
        source = transpose.inputs[0] if transpose.inputs else None
        if source is None or result.is_graph_output() or not result.uses():
            return 0
        perm = editing.attribute(transpose, "perm", None)
        # Without perm, Transpose reverses the axes: [1, 0] for the 2-D inputs Gemm takes.
        if perm is not None and list(perm) != [1, 0]:
            return 0
        uses = list(result.uses())
        for use in uses:
            if not editing.is_op(use.node, "Gemm") or use.idx not in _FLAGS:
                return 0
            if use.node.graph is not transpose.graph:
                return 0
        for use in uses:
            gemm, flag = use.node, _FLAGS[use.idx]
            current = int(editing.attribute(gemm, flag, 0))
            gemm.attributes[flag] = ir.AttrInt64(flag, 1 - current)
            gemm.replace_input_with(use.idx, source)
        editing.remove_node(transpose)
        return len(uses)
