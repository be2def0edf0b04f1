"""Quantization nodes: the Q/DQ forms TensorRT's parser refuses (int32 or uint8
dequantization, non-zero zero points), and why ``--requantize symmetric`` would leave a node
as it is (the context of the fix a finding suggests)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from graphopt.backends.tensorrt.findings import WarningReason
from graphopt.backends.tensorrt.onnx_nodes import attribute, input_at, output_at
from graphopt.backends.tensorrt.rule_context import RuleContext

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def quantization_rule(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    if node.op_type not in _QDQ:
        return
    quantized = input_at(node, 0) if node.op_type == "DequantizeLinear" else ""
    if context.types.get(quantized) == "INT32":
        yield "int32 DequantizeLinear (a quantized bias): TensorRT dequantizes 8-bit and smaller"
        return
    if context.types.get(quantized) == "UINT8" and (
        context.flow.is_weights(quantized) or quantized in context.inputs
    ):
        # A uint8 tensor reaches a DequantizeLinear only from a QuantizeLinear, which
        # TensorRT imports as int8; a uint8 constant or network input stays uint8.
        yield "uint8 DequantizeLinear input: TensorRT dequantizes int8 (symmetric), not uint8"
        return
    # The parser checks a zero point only where it holds its numbers (weights); a computed
    # one is not read at all (measured: an Add of two constants passes whatever its value).
    zero_point = context.weights(input_at(node, 2)) if input_at(node, 2) else None
    if zero_point is not None:
        try:
            nonzero = bool(np.any(zero_point.astype(np.float64) != 0))
        except (TypeError, ValueError):  # strings, float8 without ml_dtypes: not numbers
            nonzero = False
        if nonzero:
            yield "non-zero zero point is not supported (TensorRT quantization is symmetric)"
            return
    if node.op_type == "QuantizeLinear" and context.types.get(output_at(node, 0)) == "UINT8":
        yield WarningReason(
            "uint8 QuantizeLinear with zero point 0: TensorRT imports it as int8, so values "
            "above 127*scale saturate there (not at 255*scale) and values below 0 are no "
            "longer clamped to 0"
        )


# Element types TensorRT holds only as quantized data: a constant of one of them must go
# straight into a DequantizeLinear (measured, the builder's "Quantized constant ... is only
# allowed before DQ"); the parser accepts what the builder then refuses.
QUANTIZED_TYPES = ("INT8", "UINT8", "INT4", "UINT4", "FLOAT8E4M3FN", "FLOAT8E5M2", "FLOAT4E2M1")
# How a builder-only reason starts (the parser accepts the node, the engine build fails):
# lint adds these to the real parser's findings too.
BUILDER_REJECTS = "the engine build rejects it (TensorRT's parser accepts it)"


def builder_quantization_rule(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    """Q/DQ forms TensorRT's parser imports and its builder refuses (measured with
    TensorRT-RTX's builder without a GPU: both are API usage errors of the network, not
    tactic failures)."""
    if node.op_type not in _QDQ:
        return
    zero_point = input_at(node, 2)
    if zero_point and not context.flow.is_weights(zero_point):
        yield (
            f"{node.op_type} with a computed zero point: {BUILDER_REJECTS}: "
            '"zero_point which is not an initializer"; make it a constant'
        )
        return
    quantized = input_at(node, 0) if node.op_type == "DequantizeLinear" else ""
    kind = context.types.get(quantized, "")
    dims = context.shapes.get(quantized)
    if (
        kind in QUANTIZED_TYPES
        and kind != "UINT8"  # refused by the parser already (quantization_rule)
        and dims == ()
        and context.flow.is_weights(quantized)
    ):
        yield (
            f"DequantizeLinear of a rank-0 (scalar) {kind} constant: {BUILDER_REJECTS}: "
            '"Quantized constant ... is only allowed before DQ"; store it in float'
        )


def requantize_blocker(node: onnx.NodeProto, context: RuleContext, nested: str) -> str:
    """Why ``--requantize symmetric`` would leave this quantization node as it is, or ""
    (the same forms the pass converts: graphopt/passes/quantization/requantize.py)."""
    op = node.op_type
    if op not in (*_QDQ, "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"):
        return ""
    if nested:
        return f"it is inside {nested}, and the pass rewrites the main graph only"
    if op == "QuantizeLinear":
        readers = context.flow.consumers.get(output_at(node, 0), [])
        others = sorted({r.op_type for r in readers if r.op_type != "DequantizeLinear"})
        if others:
            return (
                f"its output feeds {', '.join(others)} (ONNX Runtime's QOperator form), not "
                "only DequantizeLinear"
            )
        scale, zero = context.weights(input_at(node, 1)), context.weights(input_at(node, 2))
        if scale is None or zero is None:
            return "its scale or zero point is computed, not a constant"
        if scale.size != 1 or zero.size != 1:
            return "per-channel activation quantization"
        return ""
    if op == "DequantizeLinear":
        source = context.flow.producers.get(input_at(node, 0))
        if source is not None and source.op_type == "QuantizeLinear":
            return requantize_blocker(source, context, nested)
        table = source is not None and source.op_type == "Gather"
        if not context.flow.is_weights(input_at(node, 0)) and not (
            table and context.flow.is_weights(input_at(source, 0))
        ):
            return "its input is neither a constant weight nor a QuantizeLinear's output"
        if attribute(node, "block_size", 0):
            return "blockwise quantization"
    return ""
