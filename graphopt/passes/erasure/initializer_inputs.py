"""Old-IR models list their initializers as graph inputs; make them plain initializers."""

from __future__ import annotations

import onnx_ir as ir

from graphopt.editing import INITIALIZERS_NOT_INPUTS_IR, initializers_as_constants
from graphopt.registry import GraphPass, Stage, register


@register
class InitializerInputsPass(GraphPass):
    """Drop initializers from the graph inputs of IR<4 models and raise ir_version to 4."""

    name = "initializer-inputs"
    stage = Stage.PREPARE

    def rewrite(self, model: ir.Model) -> int:
        # From IR 4 on, an initializer listed as an input is an overridable default the user
        # may feed: it is not a constant and must stay an input.
        version = model.ir_version
        if version >= INITIALIZERS_NOT_INPUTS_IR:
            return 0
        removed = initializers_as_constants(model)
        self.context.note(
            f"IR version {version} listed initializers as inputs; upgraded to IR "
            f"{INITIALIZERS_NOT_INPUTS_IR} and removed {removed} initializer(s) from the graph "
            "inputs"
        )
        return max(removed, 1)
