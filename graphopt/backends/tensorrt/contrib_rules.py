"""ONNX Runtime's contrib ops (com.microsoft) in TensorRT's parser: which are ORT's versions
of the ONNX op of the same name, and the limits of the importers the parser has for the rest
(measured with TensorRT-RTX 1.7)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import onnx

from graphopt.backends.tensorrt.findings import WarningReason
from graphopt.backends.tensorrt.onnx_nodes import attribute, input_at
from graphopt.backends.tensorrt.rule_context import RuleContext

# com.microsoft ops that are ORT's versions of the ONNX op of the same name: TensorRT's
# parser picks an importer by op name alone, and for these the ONNX one computes the same.
SAME_AS_ONNX = frozenset(
    {
        "DequantizeLinear",
        "GatherND",
        "Gelu",
        "GridSample",
        "Pad",
        "QuantizeLinear",
        "Range",
        "RotaryEmbedding",
        "Trilu",
    }
)


def is_contrib(node: onnx.NodeProto) -> bool:
    return node.domain == "com.microsoft"


def contrib_ops_rule(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    """ONNX Runtime's contrib ops the parser has an importer for, each with the limits that
    importer was measured to have (TensorRT-RTX 1.7)."""
    op = node.op_type
    if op == "Attention" and is_contrib(node):
        # No importer of its own: the ONNX Attention importer gets ORT's packed form
        # (input, weights, bias) and always fails on it.
        yield (
            "com.microsoft::Attention (ONNX Runtime's packed-QKV form) is imported as ONNX "
            "Attention, whose separate Q, K, V inputs it does not have"
        )
        return
    check = CONTRIB_RULES.get(op)
    if check is not None:
        yield from check(node, context)


def _multi_head_attention(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    if not all(input_at(node, i) for i in range(3)):
        yield "MultiHeadAttention: TensorRT needs explicit query, key and value inputs"
        return
    ranks = {len(d) for d in (context.shapes.get(input_at(node, i)) for i in range(3)) if d}
    if ranks - {3}:
        yield "MultiHeadAttention: TensorRT takes 3-D query, key and value only"
    for index, what in ((3, "bias"), (4, "key_padding_mask"), (6, "past_key"), (7, "past_value")):
        if input_at(node, index):
            yield f"MultiHeadAttention with a {what} input is not supported by TensorRT"
            return
    if sum(bool(o) for o in node.output) > 1:
        yield "MultiHeadAttention with more than one output: TensorRT produces only the first"


def _group_query_attention(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    if not (input_at(node, 3) and input_at(node, 4)):
        yield "GroupQueryAttention without past_key/past_value: TensorRT requires both"
    elif not attribute(node, "scale", 0.0):
        yield "GroupQueryAttention without a scale attribute: TensorRT requires one"
    else:
        yield _plugin_not_loaded(node.op_type)


def _plugin_not_loaded(op: str) -> str:
    # GroupQueryAttention and MatMulNBits: past their importer's own checks, the parser asks
    # for a plugin this TensorRT does not register ("failed to load <op> plugin", measured
    # with TensorRT-RTX 1.7.1 for every form tried).
    return f"{op} is imported through a plugin this TensorRT does not load"


def _matmul_nbits(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    first = context.types.get(input_at(node, 0), "")
    if first == "FLOAT16":  # other types are refused first (op_rules._input_types)
        yield _plugin_not_loaded(node.op_type)


def _skip_simplified_layer_norm(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    # The importer counts the named outputs (measured: two pass wherever they sit).
    if sum(bool(o) for o in node.output) > 2:
        yield (
            "SkipSimplifiedLayerNormalization with mean/inv_std_var outputs: TensorRT "
            "produces only the output and input_skip_bias_sum"
        )


def _rotary_embedding(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    dims = context.shapes.get(input_at(node, 0))
    if dims is not None and len(dims) == 3 and not attribute(node, "num_heads", 0):
        yield "RotaryEmbedding of a 3-D input without num_heads: TensorRT requires it"


def range_inputs_rule(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    # com.microsoft::Range makes delta optional; the ONNX importer it gets needs all three.
    if node.op_type == "Range" and len([i for i in node.input if i]) < 3:
        yield "Range without delta (the com.microsoft form): TensorRT needs all three inputs"


def _qmoe(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    yield WarningReason(
        "QMoE: TensorRT imports only a narrow form (required attributes, block_size 128) "
        "that this table does not check; graphopt lint with TensorRT installed does"
    )


CONTRIB_RULES: dict[str, Callable[[onnx.NodeProto, RuleContext], Iterator[str]]] = {
    "MultiHeadAttention": _multi_head_attention,
    "GroupQueryAttention": _group_query_attention,
    "MatMulNBits": _matmul_nbits,
    "SkipSimplifiedLayerNormalization": _skip_simplified_layer_norm,
    "RotaryEmbedding": _rotary_embedding,
    "QMoE": _qmoe,
}
