"""Reading ONNX protos for the static rule table: every graph and node (subgraphs included),
a node's input, output or attribute by position or name, and element type names."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def attribute_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return [attr.g, *attr.graphs] if attr.HasField("g") else list(attr.graphs)


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it, outermost first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in attribute_graphs(attr):
                yield from all_graphs(body)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes, each followed by those of its subgraphs: TensorRT imports both
    branches of an If and every Loop body, so a rejected node anywhere fails the parse."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for body in attribute_graphs(attr):
                yield from all_nodes(body)


def is_float_type(type_name: str) -> bool:
    return type_name in ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")


def input_at(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def output_at(node: onnx.NodeProto, index: int) -> str:
    return node.output[index] if len(node.output) > index else ""


def attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def type_id(name: str) -> int:
    return onnx.TensorProto.DataType.Value(name)
