"""Linear consumers of a group: the layers whose *input* channels the group removes.

Activation-aware criteria and compensation look at a layer ``y = W x (+ b)`` that reads the
group's channels: a Conv with ``group=1`` (weight axis 1), a Gemm (axis 0 of B, or 1 with
``transB``) or a MatMul by a 2-D constant (axis 0). Its data input's channel axis is then in
the group too, with the same element order as the weight axis (the coupling is an identity),
so per-channel statistics of the data line up with the weight's input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphopt.analysis.dependency import DimKey, split_key
from graphopt.analysis.zig import ZeroInvariantGroup, ZigReport
from graphopt.editing import attribute

# Metadata key tagging a consumer node so it can be found again after removal clones.
TAG = "graphopt.prune.consumer"


@dataclass(frozen=True)
class Consumer:
    """One layer reading a group's channels."""

    tag: str
    group: int
    op: str  # Conv, Gemm, MatMul
    node_index: int  # position in the analysed main graph
    weight_key: DimKey  # the weight's input-channel dim
    data_key: DimKey  # the data input's channel dim
    trans_b: bool = False

    @property
    def weight_name(self) -> str:
        return split_key(self.weight_key[0])[0]


def find_consumers(report: ZigReport, groups: list[ZeroInvariantGroup]) -> list[Consumer]:
    """Consumers of the given groups, in graph order."""
    graph = report.graph
    index = {id(n): i for i, n in enumerate(graph.model.graph)}
    found: list[Consumer] = []
    for group in groups:
        for key in group.dims:
            dim = graph.dims[key]
            if not dim.is_param:
                continue
            nodes = (
                [dim.use_node] if dim.use_node is not None else [u.node for u in dim.value.uses()]
            )
            for node in nodes:
                consumer = _as_consumer(node, dim.value, key, group)
                if consumer is not None and node.graph is graph.model.graph:
                    found.append(_with_tag(consumer, index[id(node)]))
    found.sort(key=lambda c: c.node_index)
    return found


def _as_consumer(
    node: ir.Node, weight: ir.Value, key: DimKey, group: ZeroInvariantGroup
) -> Consumer | None:
    if len(node.inputs) < 2 or node.inputs[1] is not weight or node.inputs[0] is None:
        return None
    data = node.inputs[0]
    shape = weight.shape
    if shape is None:
        return None
    axis = key[1]
    if node.op_type == "Conv" and attribute(node, "group", 1) == 1 and axis == 1:
        data_key = (data.name, 1)
        trans = False
    elif node.op_type == "Gemm" and attribute(node, "transA", 0) == 0:
        trans = bool(attribute(node, "transB", 0))
        if axis != (1 if trans else 0):
            return None
        data_key = (data.name, 1)
    elif node.op_type == "MatMul" and len(shape) == 2 and axis == 0:
        if data.shape is None:
            return None
        data_key = (data.name, len(data.shape) - 1)
        trans = False
    else:
        return None
    if data_key not in group.dims:
        return None
    return Consumer("", group.id, node.op_type, -1, key, data_key, trans)


def _with_tag(consumer: Consumer, node_index: int) -> Consumer:
    return Consumer(
        f"c{node_index}",
        consumer.group,
        consumer.op,
        node_index,
        consumer.weight_key,
        consumer.data_key,
        consumer.trans_b,
    )


def tag_nodes(model: ir.Model, consumers: list[Consumer]) -> None:
    """Mark the consumer nodes of ``model`` (same node order as the analysed graph)."""
    nodes = list(model.graph)
    for consumer in consumers:
        nodes[consumer.node_index].metadata_props[TAG] = consumer.tag


def tagged_nodes(model: ir.Model) -> dict[str, ir.Node]:
    return {n.metadata_props[TAG]: n for n in model.graph if TAG in n.metadata_props}


def strip_tags(model: ir.Model) -> None:
    for node in model.graph:
        node.metadata_props.pop(TAG, None)
