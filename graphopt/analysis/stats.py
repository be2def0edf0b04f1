"""Counts measured the same way everywhere: nodes, ops, parameters, sizes."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir


def iter_nodes(model_or_graph: ir.Model | ir.Graph):
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    graph = model_or_graph.graph if isinstance(model_or_graph, ir.Model) else model_or_graph
    return ir.traversal.RecursiveGraphIterator(graph)


def is_constant_node(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def count_nodes(model: ir.Model | ir.Graph) -> int:
    """Node count as graphopt reports it: non-Constant nodes, subgraphs included."""
    graph = model.graph if isinstance(model, ir.Model) else model
    # A plain loop: this runs twice per pass run, and the generic traversal costs ~10x more.
    total = 0
    for node in graph:
        if not is_constant_node(node):
            total += 1
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                total += count_nodes(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                total += sum(count_nodes(g) for g in attr.value)
    return total


def op_histogram(model: ir.Model) -> Counter[str]:
    """Op type (domain-qualified when not the default domain) → count, subgraphs included."""
    counts: Counter[str] = Counter()
    for node in iter_nodes(model):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] += 1
    return counts


def has_subgraphs(model: ir.Model) -> bool:
    return any(True for _ in model.graph.subgraphs())


def parameter_count(model: ir.Model) -> tuple[int, int]:
    """(elements, bytes) of all initializers and Constant tensors, from metadata only."""
    elements = 0
    nbytes = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None:
                elements += tensor.size
                nbytes += tensor.nbytes
    for node in iter_nodes(model):
        if is_constant_node(node) and "value" in node.attributes:
            tensor = node.attributes["value"].value
            elements += tensor.size
            nbytes += tensor.nbytes
    return elements, nbytes


def live_parameter_count(model: ir.Model) -> int:
    """Parameter elements of the main graph still in use: a rewrite (pruning, decomposition)
    leaves the tensors it replaced for cleanup, which :func:`parameter_count` would count."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None and (value.uses() or value.is_graph_output()):
            total += value.const_value.size
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes and node.outputs[0].uses():
            total += node.attributes["value"].value.size
    return total
