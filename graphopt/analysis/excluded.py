"""Weights the channel analysis leaves out, and why.

The dependency analysis (:mod:`graphopt.analysis.dependency`) follows float parameters of
the main graph. Weights it cannot see form no group at all, so without this list a model
made of them would read "0 groups" with no reason: weights inside If/Loop/Scan bodies
(subgraphs are not analysed) and quantized weights (integer tensors behind
DequantizeLinear, QLinearConv, MatMulInteger, ...: slicing them would also need their
per-channel scales and zero points kept in step, which nothing does yet).
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.analysis.stats import node_bodies

# Ops that read quantized (integer) weights; QLinear* are matched by prefix.
QUANTIZED_OPS = frozenset(
    {
        "DequantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "MatMulNBits",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
        "GatherBlockQuantized",
    }
)
_BODY = {"If": "If branches", "Loop": "Loop bodies", "Scan": "Scan bodies"}


def not_analysed(model: ir.Model) -> list[tuple[str, int]]:
    """(reason, number of weight tensors) per kind of weight the analysis leaves out."""
    containers: set[str] = set()
    in_bodies: set[int] = set()
    quantized_ops: set[str] = set()
    quantized: set[int] = set()
    for node in model.graph:
        for body in node_bodies(node):
            for inner in ir.traversal.RecursiveGraphIterator(body):
                weights = [v for v in inner.inputs if _is_weight(v, float_only=True)]
                if weights:
                    containers.add(node.op_type)
                    in_bodies.update(id(v) for v in weights)
        if is_quantized_op(node):
            # Integer tensors of rank >= 2: the weights, not their per-channel scales or
            # zero points (rank <= 1).
            weights = [v for v in node.inputs if _is_weight(v, float_only=False)]
            weights = [
                v
                for v in weights
                if not _constant(v).dtype.is_floating_point() and len(_constant(v).shape) >= 2
            ]
            if weights:
                quantized_ops.add(node.op_type)
                quantized.update(id(v) for v in weights)
    reasons: list[tuple[str, int]] = []
    if in_bodies:
        where = " and ".join(_BODY.get(op, f"{op} subgraphs") for op in sorted(containers))
        reasons.append((f"weights inside {where} are not analysed", len(in_bodies)))
    if quantized:
        ops = "/".join(sorted(quantized_ops))
        reasons.append((f"quantized ({ops}) weights are not pruned", len(quantized)))
    return reasons


def describe(reasons: list[tuple[str, int]]) -> str:
    """``reasons`` as one clause: 'weights inside If branches are not analysed (1 tensor)'."""
    return "; ".join(f"{r} ({n} tensor{'s' if n != 1 else ''})" for r, n in reasons)


def is_quantized_op(node: ir.Node) -> bool:
    return node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear")


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value
    return None


def _is_weight(value: ir.Value | None, float_only: bool) -> bool:
    """A constant tensor of more than one element (a scalar or a shape is no weight)."""
    tensor = _constant(value)
    if tensor is None or tensor.size <= 1 or len(tensor.shape) == 0:
        return False
    # Shape vectors, axes and indices are int64 constants; float tensors are the weights.
    return tensor.dtype.is_floating_point() or not float_only
