"""FLOPs of fused and contrib ops, each counted as the unfused pattern it replaces.

graphopt's fusions and ONNX Runtime's ``com.microsoft`` ops: activations and normalizations
that stand for a formula of several ops (Gelu, Swish, SkipLayerNormalization, ...), opset-23
Attention and the contrib Attention / MultiHeadAttention / GroupQueryAttention (their
MatMuls, packed QKV projection, scale, mask Add and Softmax), RotaryEmbedding, FusedMatMul
and MatMulNBits. The conventions are :mod:`graphopt.analysis.flops`'s, which dispatches here.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.analysis.flops_terms import (
    PER_ELEMENT,
    Cost,
    UnknownShape,
    has_input,
    in_shape,
    int_list,
    numel,
)
from graphopt.editing import attribute, constant_array

# FLOPs per output element of activations that stand for a formula of several ops: one per
# op of the formula (ONNX's function body, or the pattern graphopt's fusions match), so
# that fusing the formula leaves the count as it was. erf Gelu: x/√2, Erf, +1, ·x, ·0.5;
# tanh Gelu: x³, ·0.044715, +x, ·√(2/π), Tanh, +1, ·x, ·0.5; Swish: Sigmoid, Mul (the Mul by
# alpha only when alpha is not 1); HardSwish: HardSigmoid, Mul; Mish: Softplus, Tanh, Mul.
GELU_ERF = 5
GELU_TANH = 8
ACTIVATIONS = {"HardSwish": 2, "Mish": 3}
# RotaryEmbedding per rotated element: x·cos + rotate_half(x)·sin is two Muls and an Add on
# every element and a Neg on half of them; counted 3 (the Neg rounds down: never above the
# unfused count).
ROTARY = 3


def fused_per_element(node: ir.Node) -> int | None:
    """FLOPs per element of input 0 for activations and normalizations that stand for a
    formula of several ops (the bias and skip Adds they absorb included); None for others.

    Counted on input 0 rather than the output: ORT's contrib ops have no ONNX shape
    inference, and their output has input 0's shape.
    """
    op, contrib = node.op_type, node.domain == "com.microsoft"
    if op == "Gelu":
        approximate = attribute(node, "approximate", "none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        return GELU_TANH if approximate == "tanh" and not contrib else GELU_ERF
    if op == "Swish" or (op == "QuickGelu" and contrib):  # x · Sigmoid(alpha · x)
        return 2 + (attribute(node, "alpha", 1.0) != 1.0)
    if op in ACTIVATIONS:
        return ACTIVATIONS[op]
    if not contrib:
        return None
    if op == "FastGelu":  # the tanh formula, after Add(x, bias) when there is a bias
        return GELU_TANH + has_input(node, 1)
    if op == "BiasGelu":
        return 1 + GELU_ERF
    if op == "SkipLayerNormalization":  # input, skip, gamma, beta, bias
        return 1 + PER_ELEMENT["LayerNormalization"] + has_input(node, 4)
    if op == "SkipSimplifiedLayerNormalization":  # input, skip, gamma, bias
        return 1 + PER_ELEMENT["SimplifiedLayerNormalization"] + has_input(node, 3)
    if op == "SimplifiedLayerNormalization":
        return PER_ELEMENT[op]
    return None


def fused_matmul(node: ir.Node) -> Cost:
    """com.microsoft FusedMatMul: alpha · op(A) @ op(B), op a transpose of the last two axes
    (transA / transB); as Transpose + MatMul (+ Mul by alpha when not 1)."""
    a, b = in_shape(node, 0), in_shape(node, 1)
    if (
        len(a) < 2
        or len(b) < 2
        or attribute(node, "transBatchA", 0)
        or attribute(node, "transBatchB", 0)
    ):
        raise UnknownShape  # batch-transposed layouts: not what graphopt emits
    m, k = (a[-1], a[-2]) if attribute(node, "transA", 0) else (a[-2], a[-1])
    n = b[-2] if attribute(node, "transB", 0) else b[-1]
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError:
        raise UnknownShape from None
    outputs = numel(batch) * m * n
    macs = outputs * k
    return Cost(2 * macs + (outputs if attribute(node, "alpha", 1.0) != 1.0 else 0), macs)


def matmul_nbits(node: ir.Node) -> Cost:
    """com.microsoft MatMulNBits: A [..., K] @ dequantized B [K, N] (+ bias, input 5); as
    MatMul (+ Add), the dequantization not counted (as for other quantized ops)."""
    a = in_shape(node, 0)
    k, n = attribute(node, "K", None), attribute(node, "N", None)
    if not isinstance(k, int) or not isinstance(n, int):
        raise UnknownShape
    outputs = numel(a[:-1]) * n
    return Cost(2 * outputs * k + (outputs if has_input(node, 5) else 0), outputs * k)


def _attention_core(
    batch: int, heads: int, queries: int, keys: int, head: int, head_v: int, extra: int
) -> Cost:
    """Q·Kᵀ, ``extra`` FLOPs per score (scale, mask Add, ...), Softmax, ·V: what the unfused
    attention counts, per (batch, head, query, key) score."""
    scores = batch * heads * queries * keys
    macs = scores * (head + head_v)
    return Cost(2 * macs + (PER_ELEMENT["Softmax"] + extra) * scores, macs)


def _scaled(node: ir.Node) -> int:
    """1 when the op multiplies its scores by a scale (the default 1/√D, or a given one)."""
    scale = attribute(node, "scale", None)
    return int(scale is None or scale != 1.0)


def _softcapped(node: ir.Node) -> int:
    """Per score: softcap · tanh(x / softcap) is Div, Tanh and Mul."""
    softcap = attribute(node, "softcap", 0.0)
    return 3 if softcap else 0


def onnx_attention(node: ir.Node) -> Cost:
    """ONNX Attention (opset 23): Q [B, Hq, S, D] or [B, S, Hq·D], K [B, Hkv, L, D] or
    [B, L, Hkv·D], V likewise with its own head size; past_key (input 4) [B, Hkv, P, D]."""
    q, k, v = in_shape(node, 0), in_shape(node, 1), in_shape(node, 2)
    heads = attribute(node, "q_num_heads", 0)
    kv_heads = attribute(node, "kv_num_heads", 0)
    if len(q) == 4:
        batch, heads, queries, head = q
    elif len(q) == 3 and heads:
        batch, queries, head = q[0], q[1], q[2] // heads
    else:
        raise UnknownShape
    if len(k) == 4 and len(v) == 4:
        keys, head_v = k[2], v[3]
    elif len(k) == 3 and len(v) == 3 and kv_heads:
        keys, head_v = k[1], v[2] // kv_heads
    else:
        raise UnknownShape
    if has_input(node, 4):
        keys += in_shape(node, 4)[2]
    masked = has_input(node, 3) or bool(attribute(node, "is_causal", 0))
    extra = _scaled(node) + masked + _softcapped(node)
    return _attention_core(batch, heads, queries, keys, head, head_v, extra)


def packed_attention(node: ir.Node, mask: tuple[int, ...], past: int) -> Cost:
    """com.microsoft Attention / QAttention: input [B, S, D] @ weights [D, Dq + Dk + Dv],
    then attention over ``num_heads`` heads; past [2, B, H, P, Dh] adds P keys.

    The bias Add counts unless the bias is all zeros: it is a required input, and packing
    Q/K/V projections that had none gives it zeros (GPT-2's Gemms), FLOPs the unfused model
    never had; a real bias (BERT's) is the unfused Adds', as MultiHeadAttention counts them."""
    x, weights = in_shape(node, 0), in_shape(node, 1)
    heads = attribute(node, "num_heads", 0)
    if len(x) != 3 or len(weights) != 2 or not heads:
        raise UnknownShape
    batch, queries, hidden = x
    sizes = int_list(node, "qkv_hidden_sizes") or [weights[1] // 3] * 3
    macs = batch * queries * weights[1] * hidden
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    values = constant_array(bias) if bias is not None else None
    added = (
        batch * queries * weights[1] if bias is not None and (values is None or values.any()) else 0
    )
    projection = Cost(2 * macs + added, macs)
    keys = queries + (in_shape(node, past)[3] if has_input(node, past) else 0)
    masked = any(has_input(node, i) for i in mask) or bool(attribute(node, "unidirectional", 0))
    core = _attention_core(
        batch, heads, queries, keys, sizes[0] // heads, sizes[2] // heads, 1 + masked
    )
    return Cost(projection.flops + core.flops, projection.macs + core.macs)


def multi_head_attention(node: ir.Node) -> Cost:
    """com.microsoft MultiHeadAttention: query [B, S, Dq] (or packed QKV [B, S, H, 3, Dh]),
    key/value [B, L, D] or [B, H, L, Dh] (or packed KV [B, L, H, 2, Dh]); past_key (input 6)
    adds its keys; a bias (input 3) is the Q/K/V projections' Adds."""
    q = in_shape(node, 0)
    heads = attribute(node, "num_heads", 0)
    if not heads:
        raise UnknownShape
    added = 0
    if len(q) == 5:  # packed QKV
        batch, queries, _, _, head = q
        keys, head_v = queries, head
    elif len(q) == 3 and has_input(node, 1):
        batch, queries, hidden = q
        head = hidden // heads
        k = in_shape(node, 1)
        if len(k) == 5:  # packed KV
            keys, head_v = k[1], k[4]
        elif len(k) == 4:  # [B, H, L, Dh]: already projected and split into heads
            keys, head_v = k[2], in_shape(node, 2)[3]
        elif len(k) == 3:
            v = in_shape(node, 2)
            keys, head_v = k[1], v[2] // heads
            if has_input(node, 3):
                added = numel(q) + numel(k) + numel(v)
            if has_input(node, 6):
                keys += in_shape(node, 6)[2]
        else:
            raise UnknownShape
    else:
        raise UnknownShape
    masked = any(has_input(node, i) for i in (4, 5)) or bool(attribute(node, "unidirectional", 0))
    core = _attention_core(batch, heads, queries, keys, head, head_v, _scaled(node) + masked)
    return Cost(core.flops + added, core.macs)


def group_query_attention(node: ir.Node) -> Cost:
    """com.microsoft GroupQueryAttention: query [B, S, H·Dh] (or packed Q/K/V [B, S,
    (H + 2·Hkv)·Dh] without key), key/value [B, L, Hkv·Dh], past_key (input 3) [B, Hkv, P,
    Dh]. As the unfused attention over H heads (K/V heads repeated, which costs nothing);
    with ``do_rotary`` the rotation of Q and K too."""
    q = in_shape(node, 0)
    heads, kv_heads = attribute(node, "num_heads", 0), attribute(node, "kv_num_heads", 0)
    if len(q) != 3 or not heads or not kv_heads:
        raise UnknownShape
    batch, queries, hidden = q
    if has_input(node, 1):
        head, keys = hidden // heads, in_shape(node, 1)[1]
    else:
        head, keys = hidden // (heads + 2 * kv_heads), queries
    new_keys = keys
    if has_input(node, 3):
        keys += in_shape(node, 3)[2]
    # Always causal; an attention_bias (input 10) is one more Add.
    extra = _scaled(node) + 1 + has_input(node, 10) + _softcapped(node)
    core = _attention_core(batch, heads, queries, keys, head, head, extra)
    rotary = 0
    if attribute(node, "do_rotary", 0):
        rotary = ROTARY * (batch * queries * heads * head + batch * new_keys * kv_heads * head)
    return Cost(core.flops + rotary, core.macs)


def rotary(node: ir.Node, x: tuple[int, ...]) -> int:
    """RotaryEmbedding of ``x`` ([B, S, H·Dh] or [B, H, S, Dh]): :data:`ROTARY` per rotated
    element; only ``rotary_embedding_dim`` of each head's Dh when that is set."""
    rotated = attribute(node, "rotary_embedding_dim", 0)
    heads = attribute(node, "num_heads", 0)
    head = x[-1] if len(x) == 4 else (x[-1] // heads if heads else 0)
    elements = numel(x)
    if rotated and head and rotated < head:
        elements = elements // head * rotated
    return ROTARY * elements
