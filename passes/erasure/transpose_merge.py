"""Consecutive Transposes composed into one."""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.registry import GraphPass, Stage, register


def _perm(node: ir.Node, rank: int | None) -> list[int] | None:
    perm = editing.attribute(node, "perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(reversed(range(rank)))


@register
class TransposeMergePass(GraphPass):
    """Compose Transpose→Transpose into one Transpose, or remove both when it is the identity."""

    name = "transpose-merge"
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, "Transpose") or node.graph is None:
                continue
            middle = node.inputs[0]
            first = middle.producer() if middle is not None else None
            if first is None or not editing.is_op(first, "Transpose"):
                continue
            source = first.inputs[0]
            rank = None
            for known in (editing.attribute(first, "perm"), editing.attribute(node, "perm")):
                if known is not None:
                    rank = len(known)
            if rank is None and source is not None and source.shape is not None:
                rank = len(source.shape)
            outer, inner = _perm(first, rank), _perm(node, rank)
            if outer is None or inner is None or len(outer) != len(inner):
                continue
            # out[j] = middle[inner[j]] = source[outer[inner[j]]]
            composed = [outer[j] for j in inner]
            if composed == list(range(len(composed))):
                if editing.replace_value(node.outputs[0], source):
                    editing.remove_node(node)
                    editing.remove_if_dead(first)
                    hits += 1
                continue
            node.replace_input_with(0, source)
            node.attributes["perm"] = ir.AttrInt64s("perm", composed)
            editing.remove_if_dead(first)
            hits += 1
        return hits
