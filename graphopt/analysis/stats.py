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


def node_bodies(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node holds as attributes: If branches, Loop/Scan bodies."""
    bodies: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            bodies.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            bodies.extend(attr.as_graphs())
    return bodies


def parameter_count(model: ir.Model) -> tuple[int, int]:
    """(elements, bytes) of all initializers and Constant tensors, from metadata only.

    Elements are the weights the tensors hold, not their storage: a MatMulNBits or
    GatherBlockQuantized weight packs 8 / bits codes per uint8 byte and counts them all, as
    the int4 DequantizeLinear form of the same weight does (one int4 per element), so one
    quantization reads alike for every target."""
    packing = _packing(model)
    elements = 0
    nbytes = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None:
                elements += tensor.size * packing.get(id(value), 1)
                nbytes += tensor.nbytes
    for node in iter_nodes(model):
        if is_constant_node(node):
            count, size = _constant_attribute_size(node)
            elements += count
            nbytes += size
    return elements, nbytes


# Contrib ops whose uint8 weight packs several low-bit codes per byte: the input index and
# the attribute giving the bits (default 4).
_PACKED_WEIGHTS = {"MatMulNBits": 1, "GatherBlockQuantized": 0}


def _packing(model: ir.Model) -> dict[int, int]:
    """Per packed uint8 initializer (by id): how many weights each byte holds."""
    found: dict[int, int] = {}
    for node in iter_nodes(model):
        index = _PACKED_WEIGHTS.get(node.op_type)
        if index is None or node.domain != "com.microsoft" or len(node.inputs) <= index:
            continue
        value = node.inputs[index]
        tensor = value.const_value if value is not None else None
        if tensor is None or tensor.dtype != ir.DataType.UINT8:
            continue
        bits = int(node.attributes["bits"].value) if "bits" in node.attributes else 4
        if bits > 0 and 8 % bits == 0:
            found[id(value)] = 8 // bits
    return found


def _constant_attribute_size(node: ir.Node) -> tuple[int, int]:
    """(elements, bytes) a Constant node holds, whichever attribute holds it."""
    for name, attr in node.attributes.items():
        if name in ("value", "sparse_value"):
            tensor = attr.value  # a sparse one counts as onnx-ir holds it (or not at all)
            return getattr(tensor, "size", 0), getattr(tensor, "nbytes", 0)
        if name in ("value_float", "value_int"):
            return 1, 4 if name == "value_float" else 8
        if name in ("value_floats", "value_ints"):
            count = len(attr.value)
            return count, count * (4 if name == "value_floats" else 8)
        if name in ("value_string", "value_strings"):
            count = 1 if name == "value_string" else len(attr.value)
            return count, 0
    return 0, 0


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
