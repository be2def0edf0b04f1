"""Dead-code removal: nodes whose outputs nobody uses, and initializers nobody reads."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common

from graphopt.registry import GraphPass, Stage, register


@register
class DeadCodePass(GraphPass):
    """Remove nodes whose outputs are neither used nor graph outputs (subgraphs included)."""

    name = "dead-code"
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        before = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        ir.passes.common.RemoveUnusedNodesPass()(model)
        after = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        return before - after
