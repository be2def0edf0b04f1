"""The per-op rule table: for each node, the limits of TensorRT's importer for its op (opset,
types, attributes, constant inputs, static shapes), each measured against the real parser.

A rule takes a node and the :class:`.rule_context.RuleContext` and yields its reasons: errors,
unless a reason is a :class:`.findings.WarningReason`. :data:`NODE_RULES` lists the rules with
the name a finding carries; ONNX Runtime's contrib ops are in :mod:`.contrib_rules`,
quantization nodes in :mod:`.qdq_rules`, shape-tensor inputs in :mod:`.shape_tensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx

from graphopt.backends.tensorrt.contrib_rules import (
    CONTRIB_RULES,
    SAME_AS_ONNX,
    contrib_ops_rule,
    is_contrib,
    range_inputs_rule,
)
from graphopt.backends.tensorrt.findings import WarningReason
from graphopt.backends.tensorrt.onnx_nodes import (
    attribute,
    input_at,
    is_float_type,
    type_name,
)
from graphopt.backends.tensorrt.parser_data import (
    CAST_TYPES,
    CONTRIB_OPS,
    PLUGIN_OPS,
    SUPPORTED_OPS,
)
from graphopt.backends.tensorrt.qdq_rules import (
    BUILDER_REJECTS,
    builder_quantization_rule,
    quantization_rule,
)
from graphopt.backends.tensorrt.rule_context import DYNAMIC, RUNTIME, RuleContext
from graphopt.backends.tensorrt.shape_tensors import shape_inputs_rule

# Ops whose ``axes`` (input 1 from the opset noted) must be weights for TensorRT: an
# initializer or Constant, through Identity/Cast only (the importer reads the numbers; an
# Add of two constants is already refused, measured).
_AXES_INPUT = {
    "ReduceSum": 13,
    "ReduceMean": 18,
    "ReduceMax": 18,
    "ReduceMin": 18,
    "ReduceProd": 18,
    "ReduceL1": 18,
    "ReduceL2": 18,
    "ReduceLogSum": 18,
    "ReduceLogSumExp": 18,
    "ReduceSumSquare": 18,
}
# Squeeze/Unsqueeze read axes as input 1 from opset 13; TensorRT's shape analysis must fold
# them to a constant (computed from constants and static dims is fine, measured; from a
# network input's values or a dynamic dim is not).
_AXES_INPUT_13 = ("Squeeze", "Unsqueeze")
# Resize coordinate transformations TensorRT implements.
_RESIZE_MODES = (
    b"align_corners",
    b"asymmetric",
    b"half_pixel",
    b"pytorch_half_pixel",
    b"tf_half_pixel_for_nn",
)
# Elementwise arithmetic and comparison TensorRT does not run on uint8 tensors.
_NO_UINT8 = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
)
# ... and those it runs on neither 8-bit type.
_NO_8BIT = ("MaxPool", "Clip")
_8BIT = ("INT8", "UINT8")
_FOUR_BIT = ("INT4", "UINT4", "FLOAT4E2M1")
# Types a TensorRT tensor may have only between a Q/DQ (or Concat/Shuffle/Identity): a Cast
# layer neither makes nor reads one (measured: the builder's "Tensor output has datatype FP8
# but is not produced by ... IQuantizeLayer").
_QUANTIZED_ONLY = ("FLOAT8E4M3FN", "FLOAT8E5M2", "FLOAT4E2M1", "INT4", "UINT4")
_SINGLE_OUTPUT = ("BatchNormalization", "LayerNormalization", "MaxPool", "Attention")
_POOLS = ("AveragePool", "MaxPool", "LpPool")
_RANDOM = ("RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike")
# Ops whose importer goes through the numpy-style broadcast helper, which refuses any model
# below opset 7 ("Pre-opset 7 broadcasting is unsupported", measured on each, even with
# equal shapes and no broadcast attribute).
_BROADCAST_OPS = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Sum",
        "Max",
        "Min",
        "Mean",
        "And",
        "Or",
        "Xor",
        "Equal",
        "Greater",
        "Less",
        "Where",
    }
)


def _op(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    op, domain = node.op_type, node.domain
    foreign = domain not in ("", "ai.onnx")
    # The parser picks an importer by op name whatever the domain (my.ops::Relu imports as
    # Relu, measured); a name it has no importer for is looked up as a plugin.
    if op not in SUPPORTED_OPS and op not in CONTRIB_OPS:
        yield f"op {f'{domain}::' if foreign else ''}{op} has no importer in TensorRT's ONNX parser"
        return
    if op in PLUGIN_OPS:
        yield f"op {op} needs a TensorRT plugin this TensorRT does not ship"
        return
    # ORT's own versions of ONNX ops, and contrib ops with a verdict of their own, aside.
    ort_known = domain == "com.microsoft" and (
        op in SAME_AS_ONNX or op in CONTRIB_RULES or op == "Attention"
    )
    if foreign and op in SUPPORTED_OPS and not ort_known:
        yield WarningReason(
            f"op {domain}::{op} is imported as ONNX {op}: TensorRT's parser ignores the "
            "domain, so check that it computes what ONNX's op does"
        )


def _broadcast_opset(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    # Gemm goes through the helper only to bring a C of rank < 2 up to rank 2 (measured,
    # whatever its broadcast attribute says).
    bias = context.shapes.get(input_at(node, 2)) if node.op_type == "Gemm" else None
    gemm = bias is not None and len(bias) < 2
    if context.opset < 7 and (node.op_type in _BROADCAST_OPS or gemm):
        yield (
            f"{node.op_type} at opset {context.opset}: TensorRT's parser imports elementwise "
            "ops from opset 7 on (Pre-opset 7 broadcasting is unsupported)"
        )


def _cast(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    if node.op_type == "Cast":
        to = type_name(attribute(node, "to", 0))
        if to not in CAST_TYPES:
            yield f"Cast to {to}: unsupported data type for TensorRT's Cast"


def _builder_cast(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    """A Cast/CastLike to or from FP8, FP4 or INT4 of a tensor computed at run time: the
    parser makes a Cast layer of it, which the builder refuses (a cast of a constant the
    parser folds into the weights)."""
    if node.op_type not in ("Cast", "CastLike") or not node.input or not node.output:
        return
    if context.flow.is_weights(node.input[0]):
        return
    source = context.types.get(node.input[0], "")
    target = context.types.get(node.output[0], "")
    if node.op_type == "Cast":
        target = type_name(attribute(node, "to", 0)) or target
    for kind in (source, target):
        if kind in _QUANTIZED_ONLY:
            yield (
                f"{node.op_type} from {source or '?'} to {target or '?'}: {BUILDER_REJECTS}: "
                f"TensorRT holds {kind} only between QuantizeLinear and DequantizeLinear, "
                "never in a Cast"
            )
            return


def _constant_inputs(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    weights: list[tuple[int, str]] = []
    since = _AXES_INPUT.get(node.op_type)
    if since is not None and context.opset >= since:
        weights.append((1, "axes"))
    if node.op_type == "Dropout":
        weights.append((2, "training_mode"))
    if node.op_type == "STFT":
        weights.append((1, "frame_step"))
    for index, what in weights:
        name = input_at(node, index)
        if name and not context.flow.is_weights(name):
            yield (
                f"input {what} must be a constant (an initializer or Constant, through "
                "Identity/Cast only) for TensorRT"
            )
    if node.op_type in _AXES_INPUT_13 and context.opset >= 13:
        name = input_at(node, 1)
        flags = context.flow.of(name) if name else 0
        if flags & RUNTIME:
            source = "a dynamic dim" if flags & RUNTIME == DYNAMIC else "runtime values"
            yield (
                f"input axes of {node.op_type} is computed from {source}: TensorRT needs "
                "axes it can fold to a constant"
            )


def _outputs(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    if node.op_type in _SINGLE_OUTPUT and sum(bool(o) for o in node.output) > 1:
        yield f"{node.op_type} with more than one output: TensorRT produces only the first"


def _concat_axis(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    # Concat-1 made axis optional; the importer reads it unconditionally (measured).
    if node.op_type == "Concat" and attribute(node, "axis", None) is None:
        yield "Concat without an axis attribute (opset < 4 form): TensorRT needs the axis"


def _attributes(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    op = node.op_type
    if op in _POOLS and any(d != 1 for d in attribute(node, "dilations", [])):
        yield "pooling with dilations != 1 is not supported"
    if op == "LpPool" and attribute(node, "p", 2) not in (1, 2):
        yield "LpPool: only p = 1 or 2"
    if op in ("ScatterND", "ScatterElements") and attribute(node, "reduction", b"none") != b"none":
        yield f"{op} with reduction is not supported"
    if op == "BatchNormalization" and attribute(node, "training_mode", 0):
        yield "BatchNormalization training_mode is not supported"
    if op == "Resize":
        if attribute(node, "antialias", 0):
            yield "Resize antialias is not supported"
        if attribute(node, "keep_aspect_ratio_policy", b"stretch") != b"stretch":
            yield "Resize keep_aspect_ratio_policy other than stretch is not supported"
        mode = attribute(node, "coordinate_transformation_mode", b"half_pixel")
        if mode not in _RESIZE_MODES:
            yield f"Resize coordinate_transformation_mode {mode.decode()} is not supported"
        axes = attribute(node, "axes", None)
        scales = len(node.input) > 2 and bool(node.input[2])
        if axes is not None and scales and list(axes) != list(range(len(axes))):
            yield "Resize axes with scales: only the trivial axes 0..rank-1"
    if op == "TensorScatter" and attribute(node, "mode", b"linear") != b"linear":
        yield "TensorScatter: only linear mode"
    if op == "Attention" and not is_contrib(node):
        if attribute(node, "softcap", 0.0):
            yield "Attention softcap is not supported"
        if attribute(node, "softmax_precision", None) is not None:
            yield "Attention softmax_precision is not supported"
        if attribute(node, "is_causal", 0) and len(node.input) > 3 and node.input[3]:
            yield "Attention with is_causal and an attn_mask: TensorRT takes one or the other"


def _input_types(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    op = node.op_type
    first = context.types.get(node.input[0], "") if node.input else ""
    if (op in _NO_8BIT and first in _8BIT) or (op in _NO_UINT8 and first == "UINT8"):
        yield f"{op} on {first} tensors: TensorRT computes it in float, int32 or int64 only"
    if op == "Mod" and (
        first in _8BIT or (not attribute(node, "fmod", 0) and is_float_type(first))
    ):
        yield f"Mod on {first} with fmod={attribute(node, 'fmod', 0)} is not supported"
    if op == "MatMulNBits" and first and first != "FLOAT16":
        yield f"MatMulNBits with {first} activations: TensorRT needs float16 (input A)"
    if op == "Range" and first in ("FLOAT16", "BFLOAT16", "DOUBLE"):
        yield f"Range on {first}: only int32, int64 and float32"
    if op in ("RNN", "GRU", "LSTM") and first == "FLOAT16" and input_at(node, 4):
        # The importer masks the steps past each sequence's length with a Select of the
        # float16 output and a float32 zero (measured: RNN, GRU and LSTM, with or without
        # peepholes; float32 with sequence_lens and float16 without both import).
        yield (
            f"float16 {op} with a sequence_lens input: TensorRT's importer mixes float16 and "
            "float32 there (ISelectLayer must have thenInput and elseInput of same types)"
        )
    if op == "Celu" and first in ("FLOAT16", "BFLOAT16"):
        yield f"Celu on {first}: only float32"
    if op == "DequantizeLinear" and first in _FOUR_BIT:
        dims = context.shapes.get(node.input[0])
        if dims is not None and None not in dims and int(np.prod(dims)) % 2:
            yield "4-bit DequantizeLinear of an odd number of elements"
    if op in _RANDOM and _random_type(node, context) == "DOUBLE":
        yield f"{op} producing double: unsupported data type in TensorRT's random layers"
    if op == "Attention" and not is_contrib(node) and len(node.input) > 2:
        key, value = (context.shapes.get(node.input[i]) for i in (1, 2))
        if key and value and None not in key + value and key != value:
            yield f"Attention with key {key} and value {value}: TensorRT needs equal shapes"


def _shapes(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    """Limits on static shapes the parser checks (read from ONNX shape inference)."""
    op = node.op_type
    if op == "Split" and attribute(node, "num_outputs", None) is not None:
        dims = context.shapes.get(node.input[0])
        axis = attribute(node, "axis", 0)
        count = attribute(node, "num_outputs", 1)
        if dims is not None and -len(dims) <= axis < len(dims) and dims[axis] is not None:
            chunk = -(-dims[axis] // count)
            if chunk * (count - 1) > dims[axis]:
                yield (
                    f"Split of {dims[axis]} into {count} outputs leaves the last chunk negative "
                    "(onnx/onnx#5766), which TensorRT rejects"
                )
    if op == "MatMul" and len(node.input) == 2:
        first, second = (context.shapes.get(n) for n in node.input)
        if first is not None and second is not None and len(first) == 1 and len(second) >= 3:
            yield "MatMul of a 1-D vector by a batched (rank >= 3) tensor is not supported"
    if op == "TensorScatter":
        cache = context.shapes.get(node.input[0])
        if cache is not None and len(cache) != 4:
            yield f"TensorScatter past_cache of rank {len(cache)}: TensorRT needs 4-D"
    if op == "Attention" and not is_contrib(node):
        yield from _attention_mask(node, context)
    if op == "ConvTranspose":
        yield from _conv_transpose_padding(node, context)


def _conv_transpose_padding(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    """An ``output_shape`` larger than the natural output pads the front by a negative
    amount (ONNX: start = total - total // 2), which TensorRT refuses (measured; auto_pad
    SAME_* is padded its own way and passes)."""
    wanted = attribute(node, "output_shape", None)
    if not wanted or attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b""):
        return
    dims, weight = (context.shapes.get(input_at(node, i)) for i in (0, 1))
    spatial = dims[2:] if dims else ()
    kernel = attribute(node, "kernel_shape", None) or (weight[2:] if weight else ())
    if len(wanted) != len(spatial) or len(kernel) != len(spatial) or None in (*spatial, *kernel):
        return
    count = len(spatial)
    strides = attribute(node, "strides", None) or [1] * count
    dilations = attribute(node, "dilations", None) or [1] * count
    extra = attribute(node, "output_padding", None) or [0] * count
    for i in range(count):
        natural = strides[i] * (spatial[i] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1
        total = natural - wanted[i]
        if total - total // 2 < 0:
            yield (
                f"ConvTranspose output_shape {list(wanted)} exceeds its natural output by "
                "enough to pad the front negatively, which TensorRT does not support"
            )
            return


def _attention_mask(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    """4-D Attention: the mask must broadcast to [batch, q heads, q length, kv length]
    (ONNX lets a mask be shorter than the keys when ``nonpad_kv_seqlen`` is given)."""
    query, key, mask = (context.shapes.get(input_at(node, i)) for i in (0, 1, 3))
    if not (query and key and mask) or len(query) != 4 or len(key) != 4 or len(mask) > 4:
        return
    target = (query[0], query[1], query[2], key[2])
    for have, want in zip(reversed(mask), reversed(target), strict=False):
        if None not in (have, want) and have not in (1, want):
            yield f"Attention mask {mask} does not broadcast to {target}"
            return


def _random_type(node: onnx.NodeProto, context: RuleContext) -> str:
    """The element type a random op produces: ``dtype``, else (``*Like``) its input's."""
    dtype = attribute(node, "dtype", None)
    if dtype is not None:
        return type_name(dtype)
    if node.op_type.endswith("Like") and node.input:
        return context.types.get(node.input[0], "")
    return "FLOAT"


def _loop_condition(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    del context
    # ONNX allows an omitted condition (a for-loop); the parser looks the input up anyway and
    # fails ("Node input was not registered", reported against a body node).
    if node.op_type == "Loop" and (len(node.input) < 2 or not node.input[1]):
        yield (
            "Loop without a condition input: TensorRT's parser needs one (pass a constant "
            "true cond)"
        )


Rule = Callable[[onnx.NodeProto, RuleContext], Iterator[str]]
NODE_RULES: tuple[tuple[str, Rule], ...] = (
    ("op", _op),
    ("contrib", contrib_ops_rule),
    ("opset", _broadcast_opset),
    ("cast-type", _cast),
    ("constant-input", _constant_inputs),
    ("outputs", _outputs),
    ("attributes", _attributes),
    ("attributes", _concat_axis),
    ("input-type", _input_types),
    ("inputs", range_inputs_rule),
    ("quantization", quantization_rule),
    ("builder", builder_quantization_rule),
    ("builder", _builder_cast),
    ("shape-input", shape_inputs_rule),
    ("shape", _shapes),
    ("loop-condition", _loop_condition),
)
