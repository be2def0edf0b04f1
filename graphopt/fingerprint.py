"""A model's state as a cheap, comparable snapshot, to tell whether anything changed.

The pass manager skips a costly pass on a model state the same pass has already left
unchanged, and fusion passes skip a shape inference on a state that inference has already
left unchanged. Both rest on the fingerprint being equal only when the model is the same
for every purpose a pass can have: the graph structure (node objects, order, names, op
types, inputs, attribute objects), every value's name, type, shape and constant tensor,
graph inputs, outputs and initializers, subgraphs, functions, opsets and IR version.

Nodes, values, graphs and tensors are compared by identity (the fingerprint holds them, so
they stay alive and distinct), attributes, types and dims by value. Tensors by identity is
enough: passes never edit a tensor's data in place (see :mod:`graphopt.registry`).
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir


class Fingerprint:
    """The state of a model when it was taken; ``==`` means nothing changed since."""

    __slots__ = ("_key", "op_types")
    __hash__ = None  # type: ignore[assignment]  (compared, never hashed)

    def __init__(self, key: tuple, op_types: frozenset[str]) -> None:
        # Holds the model's objects themselves: they compare by identity (attributes,
        # types and dims by value), and stay alive, so no id is reused meanwhile.
        self._key = key
        # Op types of all nodes (any domain), subgraphs and functions included.
        self.op_types = op_types

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and self._key == other._key


def fingerprint(model: ir.Model) -> Fingerprint:
    """Snapshot ``model`` (linear in its size, no serialization)."""
    op_types: set[str] = set()
    parts: list[Any] = [
        model.ir_version,
        tuple(sorted(model.opset_imports.items())),
        _graph_key(model.graph, op_types),
    ]
    for key, function in model.functions.items():
        parts.append(
            (
                key,
                function,
                tuple(sorted(function.opset_imports.items())),
                tuple(_value_key(v) for v in function.inputs),
                tuple(function.outputs),
                tuple(function.attributes.values()),
                tuple(_node_key(node, op_types) for node in function),
            )
        )
    return Fingerprint(tuple(parts), frozenset(op_types))


def _graph_key(graph: ir.Graph, op_types: set[str]) -> tuple:
    return (
        graph,
        tuple(sorted(graph.opset_imports.items())),
        tuple(_value_key(v) for v in graph.inputs),
        tuple(graph.outputs),
        tuple((name, _value_key(v)) for name, v in graph.initializers.items()),
        tuple(_node_key(node, op_types) for node in graph),
    )


_SUBGRAPH_TYPES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def _node_key(node: ir.Node, op_types: set[str]) -> tuple:
    op_types.add(node.op_type)
    attributes: list[Any] = []
    for attr in node.attributes.values():
        # The Attr object itself (compared by name, type and value), plus the current
        # content of any subgraph it holds.
        attributes.append(attr)
        if attr.type in _SUBGRAPH_TYPES:
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value
            attributes.append(tuple(_graph_key(g, op_types) for g in graphs))
    return (
        node,
        node.name,
        node.domain,
        node.op_type,
        node.overload,
        tuple(node.inputs),
        tuple(attributes),
        tuple(_value_key(v) for v in node.outputs),
    )


def _value_key(value: ir.Value) -> tuple:
    shape = value.shape
    return (
        value,
        value.name,
        value.type,
        None if shape is None else tuple(shape.dims),
        value.const_value,
    )
