"""Old-IR models list their initializers as graph inputs; make them plain initializers."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common

from graphopt.registry import GraphPass, Stage, register

# IR version 4 is the first where an initializer need not also be a graph input.
MIN_IR_VERSION = 4


@register
class InitializerInputsPass(GraphPass):
    """Drop initializers from the graph inputs of IR<4 models and raise ir_version to 4."""

    name = "initializer-inputs"
    stage = Stage.PREPARE

    def rewrite(self, model: ir.Model) -> int:
        # From IR 4 on, an initializer listed as an input is an overridable default the user
        # may feed: it is not a constant and must stay an input.
        if model.ir_version >= MIN_IR_VERSION:
            return 0
        inputs_before = sum(len(graph.inputs) for graph in model.graphs())
        ir.passes.common.RemoveInitializersFromInputsPass()(model)
        removed = inputs_before - sum(len(graph.inputs) for graph in model.graphs())
        self.context.note(
            f"IR version {model.ir_version} listed initializers as inputs; upgraded to IR "
            f"{MIN_IR_VERSION} and removed {removed} initializer(s) from the graph inputs"
        )
        model.ir_version = MIN_IR_VERSION
        return max(removed, 1)
