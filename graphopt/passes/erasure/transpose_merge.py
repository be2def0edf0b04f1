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
    ops = frozenset(("Transpose",))
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


def _moves_only_unit_axes(perm: list[int], shape: ir.Shape) -> bool:
    """True when the axes of size other than 1 keep their relative order under ``perm``.

    Such a Transpose does not reorder elements in memory; it is a Reshape in disguise.
    Symbolic dims count as "not 1" (they may be anything).
    """
    if len(perm) != len(shape):
        return False
    kept = [axis for axis in perm if shape[axis] != 1]
    return kept == sorted(kept)


@register
class TransposeIntoReshapePass(GraphPass):
    """Drop a Transpose that moves only size-1 axes when only Reshapes read it.

    Reshape depends on element order alone, which such a Transpose keeps. Refused when a
    Reshape's target shape is not constant or contains 0 (copy-a-dim refers to the
    transposed shape), or when the Transpose's output is a graph output.
    """

    name = "transpose-into-reshape"
    ops = frozenset(("Transpose",))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, "Transpose") or node.graph is None:
                continue
            source, result = node.inputs[0], node.outputs[0]
            if source is None or source.shape is None or result.is_graph_output():
                continue
            perm = _perm(node, len(source.shape))
            if perm is None or not _moves_only_unit_axes(perm, source.shape):
                continue
            uses = result.uses()
            if not uses or not all(_reshape_without_zero(use) for use in uses):
                continue
            for use in uses:
                use.node.replace_input_with(0, source)
            editing.remove_if_dead(node)
            hits += 1
        return hits


def _reshape_without_zero(use) -> bool:  # use: a Value.uses() entry (node, idx)
    node = use.node
    if not editing.is_op(node, "Reshape") or use.idx != 0 or len(node.inputs) < 2:
        return False
    target = editing.const_ints(node.inputs[1])
    return target is not None and 0 not in target
