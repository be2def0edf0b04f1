"""Common-subexpression elimination (subgraphs included)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from graphopt import editing
from graphopt.registry import GraphPass, Stage, register

# Ops whose two identical calls may give different results.
NONDETERMINISTIC = frozenset(
    {
        "RandomUniform",
        "RandomNormal",
        "RandomUniformLike",
        "RandomNormalLike",
        "Multinomial",
        "Bernoulli",
    }
)
# Never merged: a Q/DQ pair per consumer is how a quantized model says which tensors each
# quantized op reads (ONNX Runtime's DedicatedQDQPair, what QNN and NNAPI expect); two equal
# pairs are a format choice, not redundancy, and merging them changes the node units an
# execution provider fuses.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Constant tensors above this many elements are not compared (weights belong to dedup).
CONSTANT_SIZE_LIMIT = 1024


def _attribute_key(attr: ir.Attr) -> Any:
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise _Skip
    value = attr.value
    if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return tuple(value)
    if attr.type == ir.AttributeType.TENSOR:
        if value.size > CONSTANT_SIZE_LIMIT:
            raise _Skip
        array = value.numpy()
        return (array.shape, str(array.dtype), array.tobytes())
    if attr.type in (ir.AttributeType.TENSORS, ir.AttributeType.SPARSE_TENSOR):
        raise _Skip
    if isinstance(value, (ir.TypeProtocol, list)):
        return repr(value)
    return value


class _Skip(Exception):
    pass


def _node_key(node: ir.Node) -> tuple | None:
    # Only standard ops: another domain's op may have side effects we cannot see.
    if not editing.is_op(node, node.op_type) or node.op_type in NONDETERMINISTIC:
        return None
    if node.op_type in QDQ_OPS:
        return None
    if not node.outputs:
        return None
    try:
        attributes = tuple(sorted((k, _attribute_key(a)) for k, a in node.attributes.items()))
    except _Skip:
        return None
    inputs = tuple(id(v) if v is not None else None for v in node.inputs)
    return (node.op_type, node.overload, len(node.outputs), inputs, attributes)


@register
class CsePass(GraphPass):
    """Merge identical deterministic standard ops on the same inputs (not random, Q/DQ, If/Loop)."""

    name = "cse"
    memoize = True
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for graph in model.graphs():
            hits += self._graph(graph)
        return hits

    def _graph(self, graph: ir.Graph) -> int:
        seen: dict[tuple, ir.Node] = {}
        hits = 0
        for node in list(graph):
            key = _node_key(node)
            if key is None:
                continue
            try:
                hash(key)
            except TypeError:
                continue
            kept = seen.get(key)
            if kept is None:
                seen[key] = node
                continue
            if self._merge(node, kept):
                hits += 1
        return hits

    @staticmethod
    def _merge(node: ir.Node, kept: ir.Node) -> bool:
        # Graph outputs keep their names; when two outputs would collide, keep the node.
        pairs = list(zip(node.outputs, kept.outputs, strict=True))
        if any(old.is_graph_output() and (new.is_graph_output()) for old, new in pairs):
            return False
        if sum(old.is_graph_output() for old, _ in pairs) > 0 and len(pairs) > 1:
            return False
        for old, new in pairs:
            if not editing.replace_value(old, new):
                return False
        editing.remove_node(node)
        return True
