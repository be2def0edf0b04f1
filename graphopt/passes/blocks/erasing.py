"""Erase one block from a graph: its output's consumers read its input (plus a replacement).

Replacements, fitted by :mod:`.fitting` on calibration data:

* none: the block's output becomes its input;
* mean: ``x + c``, ``c`` the block's mean contribution ``mean(y - x)`` per channel (one Add);
* linear: ``x·A + b``, least squares on calibration data (a MatMul and an Add; a 1×1 Conv
  with bias for NCHW blocks, the same map over the channel axis).

The nodes no longer used are removed afterwards (the whole graph is swept: side inputs that
fed only the block, such as a mask computed for it alone, go as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import NameTable, insert_before, remove_if_dead, replace_value

REPLACEMENTS = ("none", "mean", "linear")


@dataclass(frozen=True)
class Replacement:
    """What stands in for an erased block."""

    kind: str  # "none", "mean" or "linear"
    bias: np.ndarray | None = None  # [C]
    matrix: np.ndarray | None = None  # [C_in, C_out], x·A


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of ``graph`` (inputs and node outputs)."""
    values = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        values.update((o.name, o) for o in node.outputs if o.name)
    return values


def erase(
    graph: ir.Graph,
    source: ir.Value,
    output: ir.Value,
    replacement: Replacement,
    channel_axis: int,
    names: NameTable,
) -> None:
    """Reroute ``output``'s consumers to ``source`` (plus the replacement); no dead-code sweep.

    Several blocks are erased last first (see :func:`erase_all`): a block's input may be the
    output of the block before it, which must still exist when the later one is rerouted.
    """
    anchor = output.producer()
    assert anchor is not None
    new_nodes, new = _replacement_nodes(graph, source, replacement, channel_axis, names)
    if new_nodes:
        insert_before(_first_user(source, anchor), new_nodes)
    if not replace_value(output, new):
        # A graph output cannot take the name of a graph input or another output: an Identity
        # carries the output's name instead.
        identity = ir.node("Identity", [new], name=names.take("erased_block_identity"))
        identity.outputs[0].name = names.take("erased_block_out")
        insert_before(anchor, [identity])
        replaced = replace_value(output, identity.outputs[0])
        assert replaced
    for node in new_nodes:
        for value in node.outputs:
            if value.shape is None:
                value.shape = source.shape
                value.type = source.type


def sweep(graph: ir.Graph) -> int:
    """Remove every node none of whose outputs is used; how many went."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if remove_if_dead(node):
                removed += 1
                changed = True
    return removed


def _first_user(source: ir.Value, fallback: ir.Node) -> ir.Node:
    """A node after ``source``'s producer to insert the replacement before."""
    users = [use.node for use in source.uses()]
    if not users:
        return fallback
    order = {id(n): i for i, n in enumerate(fallback.graph)}
    return min(users, key=lambda n: order.get(id(n), len(order)))


def _replacement_nodes(
    graph: ir.Graph,
    source: ir.Value,
    replacement: Replacement,
    channel_axis: int,
    names: NameTable,
) -> tuple[list[ir.Node], ir.Value]:
    if replacement.kind == "none":
        return [], source
    assert replacement.bias is not None
    rank = len(source.shape) if source.shape is not None else 0
    bias = replacement.bias.astype(np.float32)
    nodes: list[ir.Node] = []
    if channel_axis == 1 and rank > 2:
        # NCHW: the bias broadcasts over the spatial axes.
        bias = bias.reshape(-1, *([1] * (rank - 2)))
    x = source
    if replacement.kind == "linear":
        assert replacement.matrix is not None
        if channel_axis == 1 and rank > 2:
            weight = replacement.matrix.T.astype(np.float32).reshape(
                *replacement.matrix.T.shape, *([1] * (rank - 2))
            )
            w = names.add_initializer(graph, "erased_block_weight", weight)
            b = names.add_initializer(
                graph, "erased_block_bias", replacement.bias.astype(np.float32)
            )
            conv = ir.node("Conv", [source, w, b], name=names.take("erased_block_linear"))
            conv.outputs[0].name = names.take("erased_block_linear_out")
            return [conv], conv.outputs[0]
        w = names.add_initializer(
            graph, "erased_block_weight", replacement.matrix.astype(np.float32)
        )
        matmul = ir.node("MatMul", [source, w], name=names.take("erased_block_matmul"))
        matmul.outputs[0].name = names.take("erased_block_matmul_out")
        nodes.append(matmul)
        x = matmul.outputs[0]
    c = names.add_initializer(graph, "erased_block_bias", bias)
    add = ir.node("Add", [x, c], name=names.take(f"erased_block_{replacement.kind}"))
    add.outputs[0].name = names.take(f"erased_block_{replacement.kind}_out")
    nodes.append(add)
    return nodes, add.outputs[0]
