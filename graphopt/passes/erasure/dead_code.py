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


@register
class UnusedInitializersPass(GraphPass):
    """Remove initializers (subgraphs included) that no node reads; inputs/outputs are kept."""

    name = "unused-initializers"
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        removed = 0
        for graph in model.graphs():
            for name, value in list(graph.initializers.items()):
                if value.uses() or value.is_graph_input() or value.is_graph_output():
                    continue
                del graph.initializers[name]
                removed += 1
        return removed
