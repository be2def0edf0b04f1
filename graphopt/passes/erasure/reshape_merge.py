"""Reshape→Reshape and Flatten→Reshape chains collapsed into the last Reshape."""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.registry import GraphPass, Stage, register


@register
class ReshapeMergePass(GraphPass):
    """Feed Reshape from the source of a Reshape/Flatten before it; refuse when its shape has 0s.

    A 0 in the last shape (without allowzero) copies a dim of the intermediate tensor, which
    the source may not have, and a non-constant shape may hold 0s at run time.
    """

    name = "reshape-merge"
    ops = frozenset(("Reshape",))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, "Reshape") or len(node.inputs) < 2 or node.graph is None:
                continue
            middle = node.inputs[0]
            first = middle.producer() if middle is not None else None
            if first is None or not editing.is_op(first, ("Reshape", "Flatten")):
                continue
            target = editing.const_ints(node.inputs[1])
            if target is None:
                continue
            if 0 in target and not editing.attribute(node, "allowzero", 0):
                continue
            node.replace_input_with(0, first.inputs[0])
            editing.remove_if_dead(first)
            hits += 1
        return hits
