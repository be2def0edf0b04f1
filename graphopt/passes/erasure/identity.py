"""Identity removal."""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.registry import GraphPass, Stage, register


@register
class IdentityPass(GraphPass):
    """Remove Identity nodes; refuse when a graph input would have to become a graph output."""

    name = "identity"
    ops = frozenset(("Identity",))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for node in editing.all_nodes(model):
            if editing.is_op(node, "Identity") and editing.bypass(node):
                hits += 1
        return hits
