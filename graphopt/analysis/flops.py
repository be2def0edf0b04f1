"""FLOPs per node at concrete shapes.

Conventions (the numbers are only comparable under the same ones):

- a multiply-add counts as **2 FLOPs**; :attr:`FlopsReport.macs` counts the multiply-adds
  alone (those of Conv, MatMul, Gemm, attention): elementwise ops have none, so MACs are not
  FLOPs / 2 (a Relu's FLOPs are not half a multiply-add);
- Conv / ConvTranspose / MatMul / Gemm: 2 per multiply-add, plus 1 per output element for a
  bias or ``C`` term; groups and batch broadcasting are taken into account;
- elementwise ops (Add, Relu, Sigmoid, Where, ...): 1 per output element; an activation that
  is a formula of several ops (:data:`ACTIVATIONS`: Gelu, Swish, HardSwish, Mish and the
  ``com.microsoft`` Gelu family) counts one per op of that formula, per element, so that the
  fused op counts what the ops it replaces counted;
- normalizations and Softmax: a small constant per element (:data:`PER_ELEMENT`), as if
  BatchNormalization were folded into a scale and shift;
- pooling: 1 per window element per output; global pooling and reductions: 1 per input
  element;
- data movement (Reshape, Transpose, Gather, Concat, Cast, sequence and optional ops, ...): 0;
- fused ops count as the unfused pattern they replace (graphopt's fusions and ORT's contrib
  ops): SkipLayerNormalization as Add + LayerNormalization, opset-23 Attention and the
  ``com.microsoft`` Attention / MultiHeadAttention / GroupQueryAttention as their MatMuls
  (and the packed QKV projection), scale, mask Add and Softmax, RotaryEmbedding as
  x·cos + rotate_half(x)·sin, FusedMatMul and MatMulNBits as MatMul;
- integer and quantized ops count as their float counterparts (an integer multiply-add is
  2 FLOPs too; zero-point and scale arithmetic is not counted): ConvInteger and QLinearConv
  as Conv, MatMulInteger, QLinearMatMul, MatMulIntegerToFloat as MatMul, QGemm as Gemm,
  DynamicQuantizeMatMul as MatMul plus quantizing A (as DynamicQuantizeLinear), the
  ``com.microsoft`` QLinear elementwise ops, global pooling, ReduceMean and Softmax as their
  float versions (QLinearConcat as Concat, GatherBlockQuantized as Gather, 0), QAttention as
  Attention;
- control flow counts what one run executes: an If counts its larger branch (both are
  listed in :attr:`FlopsReport.control_flow`); a Loop counts its body × the trip count when
  that is a constant (an upper bound when the loop condition can end it earlier), a Scan ×
  its sequence length when known; otherwise one iteration, with a note;
- any other op counts 0 and is listed as *not counted*; a node whose shapes could not be
  inferred is listed as *unknown shape*.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from graphopt.analysis.shapes import infer_shapes, static_shape
from graphopt.analysis.stats import is_constant_node
from graphopt.editing import attribute, const_ints


def _op_set(names: str) -> frozenset[str]:
    return frozenset(names.split())


ELEMENTWISE = _op_set(
    """Abs Acos Acosh Add And Asin Asinh Atan Atanh BitShift BitwiseAnd BitwiseNot BitwiseOr
    BitwiseXor Ceil Celu Clip Cos Cosh Div Elu Equal Erf Exp Floor Greater GreaterOrEqual
    HardSigmoid IsInf IsNaN LeakyRelu Less LessOrEqual Log Max Mean Min Mod Mul Neg Not Or Pow
    PRelu Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Sub
    Sum Tan Tanh ThresholdedRelu Where Xor"""
)
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
# FLOPs per output element.
PER_ELEMENT = {
    "BatchNormalization": 2,
    "InstanceNormalization": 5,
    "LayerNormalization": 5,
    "GroupNormalization": 5,
    "RMSNormalization": 4,
    "SimplifiedLayerNormalization": 4,
    "LpNormalization": 3,
    "Softmax": 3,
    "LogSoftmax": 4,
    "Hardmax": 1,
    "QuantizeLinear": 2,
    "DequantizeLinear": 2,
    "DynamicQuantizeLinear": 3,
}
# com.microsoft quantized ops that count as their float counterparts, by kind. onnx infers
# no shapes for them, so their output shapes are derived from the inputs here.
QLINEAR_ELEMENTWISE = _op_set("QLinearAdd QLinearMul QLinearSigmoid QLinearLeakyRelu QLinearWhere")
QLINEAR_ZERO = _op_set("QLinearConcat GatherBlockQuantized")
REDUCTIONS = _op_set(
    """ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare ArgMax ArgMin CumSum GlobalAveragePool GlobalMaxPool
    GlobalLpPool"""
)
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
ZERO = _op_set(
    """Cast CastLike Concat Constant ConstantOfShape DepthToSpace Dropout Expand EyeLike
    Flatten Gather GatherElements GatherND Identity If Loop NonZero OneHot Pad Range Reshape
    Resize ReverseSequence Scan Scatter ScatterElements ScatterND Shape Size Slice
    SpaceToDepth Split Squeeze Tile TopK Transpose Trilu Unsqueeze Upsample
    Optional OptionalGetElement OptionalHasElement ConcatFromSequence SequenceAt
    SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
    SplitToSequence"""
)


@dataclass
class FlopsReport:
    """FLOPs of a model at the given shapes (multiply-add = 2 FLOPs)."""

    total: int = 0
    # The multiply-adds among ``total`` (each 2 FLOPs of it): Conv, MatMul, Gemm, attention.
    macs: int = 0
    by_op: Counter[str] = field(default_factory=Counter)
    # Op types counted as 0 because graphopt has no formula for them: op → node count.
    not_counted: Counter[str] = field(default_factory=Counter)
    # Op types whose shapes could not be inferred: op → node count.
    unknown_shape: Counter[str] = field(default_factory=Counter)
    # How each If/Loop/Scan (outermost first, nested ones too) entered the total.
    control_flow: list[ControlFlow] = field(default_factory=list)

    def add(self, other: FlopsReport, times: int = 1) -> None:
        """Count ``other`` (a subgraph's report) ``times`` over; listings are node counts and
        control-flow records, so they are taken once."""
        self.total += other.total * times
        self.macs += other.macs * times
        for op, flops in other.by_op.items():
            if flops * times:
                self.by_op[op] += flops * times
        self.not_counted.update(other.not_counted)
        self.unknown_shape.update(other.unknown_shape)
        self.control_flow.extend(other.control_flow)

    @property
    def notes(self) -> list[str]:
        return [c.note for c in self.control_flow if c.note]


@dataclass
class ControlFlow:
    """FLOPs of one If/Loop/Scan node: each body once, and what entered the total."""

    node: str
    op: str
    bodies: dict[str, int]  # body attribute (then_branch, else_branch, body) → FLOPs of one run
    counted: int  # what the node added to the total
    iterations: int | None = None  # Loop/Scan: iterations counted (None: not known)
    note: str = ""


def model_flops(
    model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> FlopsReport:
    """FLOPs of ``model`` with its inputs bound to ``input_shapes`` (or the defaults)."""
    inferred, _ = infer_shapes(model, input_shapes)
    return flops_of_inferred(inferred)


def flops_of_inferred(model: ir.Model) -> FlopsReport:
    """FLOPs of a model whose shapes are already inferred (see :func:`infer_shapes`)."""
    imports = model.opset_imports
    return _graph_flops(model.graph, imports.get("", imports.get("ai.onnx", 0)))


def _graph_flops(graph: ir.Graph, opset: int) -> FlopsReport:
    report = FlopsReport()
    for index, node in enumerate(graph):
        if is_constant_node(node):
            continue
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        bodies = {
            name: attr.value
            for name, attr in node.attributes.items()
            if attr.type == ir.AttributeType.GRAPH
        }
        if bodies and node.domain in ("", "ai.onnx") and node.op_type in ("If", "Loop", "Scan"):
            # Fixed order (then before else), whatever the order of the attributes.
            counts = {k: _graph_flops(bodies[k], opset) for k in sorted(bodies, reverse=True)}
            _control_flow(report, node, index, counts, opset)
            continue
        for body in bodies.values():  # another op's graph attribute: counted once
            report.add(_graph_flops(body, opset))
        try:
            cost = node_cost(node)
        except _UnknownShape:
            report.unknown_shape[key] += 1
            continue
        if cost is None:
            report.not_counted[key] += 1
            continue
        report.total += cost.flops
        report.macs += cost.macs
        if cost.flops:
            report.by_op[key] += cost.flops
    return report


def _control_flow(
    report: FlopsReport, node: ir.Node, index: int, bodies: dict[str, FlopsReport], opset: int
) -> None:
    """Add what one run of If/Loop/Scan ``node`` executes to ``report`` and record how."""
    name = node.name or f"{node.op_type}#{index}"
    totals = {k: r.total for k, r in bodies.items()}
    record = ControlFlow(name, node.op_type, totals, 0)
    report.control_flow.append(record)  # before the records of control flow nested in it
    if node.op_type == "If":
        # One branch runs, which one is known only at run time: count the larger (an upper
        # bound) and list both. Listings (not counted, unknown shape) cover both branches.
        taken = max(bodies, key=lambda k: bodies[k].total)
        for key, body in bodies.items():
            report.add(body, times=1 if key == taken else 0)
        record.counted = bodies[taken].total
        if len(set(totals.values())) > 1:
            record.note = (
                f"If {name}: "
                + ", ".join(f"{k.removesuffix('_branch')} {v}" for k, v in totals.items())
                + f" FLOPs; the larger ({taken.removesuffix('_branch')}) is counted"
            )
        return
    body = bodies["body"]
    trips, why = _iterations(node, opset)
    record.iterations = trips
    times = 1 if trips is None else trips
    report.add(body, times=times)
    record.counted = body.total * times
    if trips is None:
        record.note = f"{node.op_type} {name}: {why}; one iteration counted ({body.total} FLOPs)"
    else:
        record.note = f"{node.op_type} {name}: body {body.total} FLOPs × {trips} iterations{why}"


def _iterations(node: ir.Node, opset: int) -> tuple[int | None, str]:
    """Iterations of a Loop/Scan when known statically, and a note (why not, or a caveat)."""
    if node.op_type == "Loop":
        trip = node.inputs[0] if node.inputs else None
        count = const_ints(trip) if trip is not None else None
        if count is None or len(count) != 1:
            return None, "trip count not known statically"
        trips = max(count[0], 0)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            # The condition may end the loop before the trip count (it stays true in exports
            # of Python for-loops, but that is not visible without running the body).
            return trips, " at most (the loop condition may end it earlier)"
        return trips, ""
    # Scan: every scan input is consumed along its axis, one slice per iteration.
    scans = attribute(node, "num_scan_inputs", 0)
    first = node.inputs[len(node.inputs) - scans] if scans else None
    shape = static_shape(first)
    if opset == 8:
        # Scan-8's inputs carry a batch axis first: the body runs per item and time step.
        if shape is None or len(shape) < 2:
            return None, "sequence length not known statically"
        return shape[0] * shape[1], ""
    axis = (attribute(node, "scan_input_axes") or [0])[0]
    if shape is None or not -len(shape) <= axis < len(shape):
        return None, "sequence length not known statically"
    return shape[axis], ""


class _UnknownShape(Exception):
    pass


class Cost(NamedTuple):
    """FLOPs of one node, and the multiply-adds among them (2 FLOPs each)."""

    flops: int
    macs: int = 0


def node_flops(node: ir.Node) -> int | None:
    """FLOPs of one node from its inferred shapes; None when the op has no formula.

    Raises ``_UnknownShape`` (internal) when a shape the formula needs is not known.
    """
    cost = node_cost(node)
    return None if cost is None else cost.flops


def node_cost(node: ir.Node) -> Cost | None:
    """:func:`node_flops` with the multiply-adds counted apart (see :class:`Cost`)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if op in ZERO or op in QLINEAR_ZERO:
        return Cost(0)
    if op in ("Conv", "ConvInteger"):
        # ConvInteger's inputs 2 and 3 are zero points, not a bias.
        return _conv(node, bias=2 if op == "Conv" else None)
    if op == "QLinearConv":  # x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B
        return _conv(node, weight=3, bias=8)
    if op == "ConvTranspose":
        return _conv_transpose(node)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        return _matmul(node)
    if op in ("FusedMatMul", "TransposeMatMul"):
        return _fused_matmul(node)
    if op == "MatMulNBits":
        return _matmul_nbits(node)
    if op == "MatMulIntegerToFloat":  # A, B, a_scale, b_scale, a_zp, b_zp, bias
        return _matmul(node, b=1, bias=6)
    if op == "DynamicQuantizeMatMul":  # A (float, quantized on the fly), B, b_scale, b_zp, bias
        flops, macs = _matmul(node, b=1, bias=4)
        return Cost(flops + PER_ELEMENT["DynamicQuantizeLinear"] * _numel(_in(node, 0)), macs)
    if op == "Gemm":
        return _gemm(node)
    if op == "QGemm":  # A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp
        return _gemm(node, b=3, bias=6)
    if op == "Attention" and node.domain == "com.microsoft":
        return _packed_attention(node, mask=(3, 5), past=4)
    if op == "QAttention":  # input, weight, bias, scales, mask_index, zero points, past
        return _packed_attention(node, mask=(5,), past=8)
    if op == "Attention":
        return _onnx_attention(node)
    if op == "MultiHeadAttention":
        return _multi_head_attention(node)
    if op == "GroupQueryAttention":
        return _group_query_attention(node)
    if op == "RotaryEmbedding":
        return Cost(_rotary(node, _in(node, 0)))
    if op in QLINEAR_ELEMENTWISE:
        return Cost(_numel(_broadcast_out(node)))
    if op == "QLinearSoftmax":  # X, X_scale, X_zp, Y_scale, Y_zp; as Softmax
        return Cost(PER_ELEMENT["Softmax"] * _numel(_in(node, 0)))
    if op in ("QLinearGlobalAveragePool", "QLinearReduceMean"):
        return Cost(_numel(_in(node, 0)))
    per_element = _fused_per_element(node)
    if per_element is not None:
        return Cost(per_element * _numel(_in(node, 0)))
    if op in ELEMENTWISE:
        return Cost(_numel(_out(node)))
    if op in PER_ELEMENT:
        return Cost(PER_ELEMENT[op] * _numel(_out(node)))
    if op in POOLS:
        kernel = _ints(node, "kernel_shape")
        return Cost(_numel(_out(node)) * math.prod(kernel))
    if op in REDUCTIONS:
        return Cost(_numel(_in(node, 0)))
    return None


def _fused_per_element(node: ir.Node) -> int | None:
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
        return GELU_TANH + _has_input(node, 1)
    if op == "BiasGelu":
        return 1 + GELU_ERF
    if op == "SkipLayerNormalization":  # input, skip, gamma, beta, bias
        return 1 + PER_ELEMENT["LayerNormalization"] + _has_input(node, 4)
    if op == "SkipSimplifiedLayerNormalization":  # input, skip, gamma, bias
        return 1 + PER_ELEMENT["SimplifiedLayerNormalization"] + _has_input(node, 3)
    if op == "SimplifiedLayerNormalization":
        return PER_ELEMENT[op]
    return None


def _shape(value: ir.Value | None) -> tuple[int, ...]:
    shape = static_shape(value)
    if shape is None:
        raise _UnknownShape
    return shape


def _in(node: ir.Node, index: int) -> tuple[int, ...]:
    return _shape(node.inputs[index] if index < len(node.inputs) else None)


def _out(node: ir.Node) -> tuple[int, ...]:
    return _shape(node.outputs[0])


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _ints(node: ir.Node, name: str) -> list[int]:
    attr = node.attributes.get(name)
    return list(attr.value) if attr is not None else []


def _has_input(node: ir.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index] is not None


def _broadcast_out(node: ir.Node) -> tuple[int, ...]:
    """Output shape of a QLinear elementwise op (onnx infers no contrib shapes): inferred,
    or else the broadcast of its data inputs, which sit between scales and zero points."""
    shape = static_shape(node.outputs[0])
    if shape is not None:
        return shape
    data = {"QLinearAdd": (0, 3), "QLinearMul": (0, 3), "QLinearWhere": (0, 1, 4)}
    try:
        return tuple(np.broadcast_shapes(*(_in(node, i) for i in data.get(node.op_type, (0,)))))
    except ValueError:
        raise _UnknownShape from None


def _conv(node: ir.Node, weight: int = 1, bias: int | None = 2) -> Cost:
    out = _out(node)
    w = _in(node, weight)  # [C_out, C_in / groups, k...]
    macs = _numel(out) * math.prod(w[1:])
    flops = 2 * macs
    if bias is not None and _has_input(node, bias):
        flops += _numel(out)
    return Cost(flops, macs)


def _conv_transpose(node: ir.Node) -> Cost:
    x = _in(node, 0)
    weight = _in(node, 1)  # [C_in, C_out / groups, k...]
    # Every input element is multiplied into C_out/groups × kernel output positions.
    macs = _numel(x) * math.prod(weight[1:])
    flops = 2 * macs
    if _has_input(node, 2):
        flops += _numel(_out(node))
    return Cost(flops, macs)


def _matmul(node: ir.Node, b: int | None = None, bias: int | None = None) -> Cost:
    a = _in(node, 0)
    k = a[-1]
    out = static_shape(node.outputs[0])
    if out is None and b is not None:
        # A contrib op onnx does not infer: A [..., M, K] × B [..., K, N].
        b_shape = _in(node, b)
        if len(a) < 2 or len(b_shape) < 2:
            raise _UnknownShape
        try:
            batch = np.broadcast_shapes(a[:-2], b_shape[:-2])
        except ValueError:
            raise _UnknownShape from None
        out = (*batch, a[-2], b_shape[-1])
    if out is None:
        raise _UnknownShape
    # The output holds every (batch, m, n) once; each is a dot product of length K.
    macs = _numel(out) * k
    flops = 2 * macs
    if bias is not None and _has_input(node, bias):
        flops += _numel(out)
    return Cost(flops, macs)


def _fused_matmul(node: ir.Node) -> Cost:
    """com.microsoft FusedMatMul: alpha · op(A) @ op(B), op a transpose of the last two axes
    (transA / transB); as Transpose + MatMul (+ Mul by alpha when not 1)."""
    a, b = _in(node, 0), _in(node, 1)
    if (
        len(a) < 2
        or len(b) < 2
        or attribute(node, "transBatchA", 0)
        or attribute(node, "transBatchB", 0)
    ):
        raise _UnknownShape  # batch-transposed layouts: not what graphopt emits
    m, k = (a[-1], a[-2]) if attribute(node, "transA", 0) else (a[-2], a[-1])
    n = b[-2] if attribute(node, "transB", 0) else b[-1]
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError:
        raise _UnknownShape from None
    outputs = _numel(batch) * m * n
    macs = outputs * k
    return Cost(2 * macs + (outputs if attribute(node, "alpha", 1.0) != 1.0 else 0), macs)


def _matmul_nbits(node: ir.Node) -> Cost:
    """com.microsoft MatMulNBits: A [..., K] @ dequantized B [K, N] (+ bias, input 5); as
    MatMul (+ Add), the dequantization not counted (as for other quantized ops)."""
    a = _in(node, 0)
    k, n = attribute(node, "K", None), attribute(node, "N", None)
    if not isinstance(k, int) or not isinstance(n, int):
        raise _UnknownShape
    outputs = _numel(a[:-1]) * n
    return Cost(2 * outputs * k + (outputs if _has_input(node, 5) else 0), outputs * k)


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


def _onnx_attention(node: ir.Node) -> Cost:
    """ONNX Attention (opset 23): Q [B, Hq, S, D] or [B, S, Hq·D], K [B, Hkv, L, D] or
    [B, L, Hkv·D], V likewise with its own head size; past_key (input 4) [B, Hkv, P, D]."""
    q, k, v = _in(node, 0), _in(node, 1), _in(node, 2)
    heads = attribute(node, "q_num_heads", 0)
    kv_heads = attribute(node, "kv_num_heads", 0)
    if len(q) == 4:
        batch, heads, queries, head = q
    elif len(q) == 3 and heads:
        batch, queries, head = q[0], q[1], q[2] // heads
    else:
        raise _UnknownShape
    if len(k) == 4 and len(v) == 4:
        keys, head_v = k[2], v[3]
    elif len(k) == 3 and len(v) == 3 and kv_heads:
        keys, head_v = k[1], v[2] // kv_heads
    else:
        raise _UnknownShape
    if _has_input(node, 4):
        keys += _in(node, 4)[2]
    masked = _has_input(node, 3) or bool(attribute(node, "is_causal", 0))
    extra = _scaled(node) + masked + _softcapped(node)
    return _attention_core(batch, heads, queries, keys, head, head_v, extra)


def _packed_attention(node: ir.Node, mask: tuple[int, ...], past: int) -> Cost:
    """com.microsoft Attention / QAttention: input [B, S, D] @ weights [D, Dq + Dk + Dv],
    then attention over ``num_heads`` heads; past [2, B, H, P, Dh] adds P keys.

    The bias Add is not counted: the bias is a required input, and packing Q/K/V
    projections that had none gives it zeros (GPT-2's Gemms), so counting it would put
    FLOPs the unfused model never had on top."""
    x, weights = _in(node, 0), _in(node, 1)
    heads = attribute(node, "num_heads", 0)
    if len(x) != 3 or len(weights) != 2 or not heads:
        raise _UnknownShape
    batch, queries, hidden = x
    sizes = _ints(node, "qkv_hidden_sizes") or [weights[1] // 3] * 3
    macs = batch * queries * weights[1] * hidden
    projection = Cost(2 * macs, macs)
    keys = queries + (_in(node, past)[3] if _has_input(node, past) else 0)
    masked = any(_has_input(node, i) for i in mask) or bool(attribute(node, "unidirectional", 0))
    core = _attention_core(
        batch, heads, queries, keys, sizes[0] // heads, sizes[2] // heads, 1 + masked
    )
    return Cost(projection.flops + core.flops, projection.macs + core.macs)


def _multi_head_attention(node: ir.Node) -> Cost:
    """com.microsoft MultiHeadAttention: query [B, S, Dq] (or packed QKV [B, S, H, 3, Dh]),
    key/value [B, L, D] or [B, H, L, Dh] (or packed KV [B, L, H, 2, Dh]); past_key (input 6)
    adds its keys; a bias (input 3) is the Q/K/V projections' Adds."""
    q = _in(node, 0)
    heads = attribute(node, "num_heads", 0)
    if not heads:
        raise _UnknownShape
    added = 0
    if len(q) == 5:  # packed QKV
        batch, queries, _, _, head = q
        keys, head_v = queries, head
    elif len(q) == 3 and _has_input(node, 1):
        batch, queries, hidden = q
        head = hidden // heads
        k = _in(node, 1)
        if len(k) == 5:  # packed KV
            keys, head_v = k[1], k[4]
        elif len(k) == 4:  # [B, H, L, Dh]: already projected and split into heads
            keys, head_v = k[2], _in(node, 2)[3]
        elif len(k) == 3:
            v = _in(node, 2)
            keys, head_v = k[1], v[2] // heads
            if _has_input(node, 3):
                added = _numel(q) + _numel(k) + _numel(v)
            if _has_input(node, 6):
                keys += _in(node, 6)[2]
        else:
            raise _UnknownShape
    else:
        raise _UnknownShape
    masked = any(_has_input(node, i) for i in (4, 5)) or bool(attribute(node, "unidirectional", 0))
    core = _attention_core(batch, heads, queries, keys, head, head_v, _scaled(node) + masked)
    return Cost(core.flops + added, core.macs)


def _group_query_attention(node: ir.Node) -> Cost:
    """com.microsoft GroupQueryAttention: query [B, S, H·Dh] (or packed Q/K/V [B, S,
    (H + 2·Hkv)·Dh] without key), key/value [B, L, Hkv·Dh], past_key (input 3) [B, Hkv, P,
    Dh]. As the unfused attention over H heads (K/V heads repeated, which costs nothing);
    with ``do_rotary`` the rotation of Q and K too."""
    q = _in(node, 0)
    heads, kv_heads = attribute(node, "num_heads", 0), attribute(node, "kv_num_heads", 0)
    if len(q) != 3 or not heads or not kv_heads:
        raise _UnknownShape
    batch, queries, hidden = q
    if _has_input(node, 1):
        head, keys = hidden // heads, _in(node, 1)[1]
    else:
        head, keys = hidden // (heads + 2 * kv_heads), queries
    new_keys = keys
    if _has_input(node, 3):
        keys += _in(node, 3)[2]
    # Always causal; an attention_bias (input 10) is one more Add.
    extra = _scaled(node) + 1 + _has_input(node, 10) + _softcapped(node)
    core = _attention_core(batch, heads, queries, keys, head, head, extra)
    rotary = 0
    if attribute(node, "do_rotary", 0):
        rotary = ROTARY * (batch * queries * heads * head + batch * new_keys * kv_heads * head)
    return Cost(core.flops + rotary, core.macs)


def _rotary(node: ir.Node, x: tuple[int, ...]) -> int:
    """RotaryEmbedding of ``x`` ([B, S, H·Dh] or [B, H, S, Dh]): :data:`ROTARY` per rotated
    element; only ``rotary_embedding_dim`` of each head's Dh when that is set."""
    rotated = attribute(node, "rotary_embedding_dim", 0)
    heads = attribute(node, "num_heads", 0)
    head = x[-1] if len(x) == 4 else (x[-1] // heads if heads else 0)
    elements = _numel(x)
    if rotated and head and rotated < head:
        elements = elements // head * rotated
    return ROTARY * elements


def _gemm(node: ir.Node, b: int = 1, bias: int = 2) -> Cost:
    a = _in(node, 0)
    trans_a, trans_b = attribute(node, "transA", 0), attribute(node, "transB", 0)
    k = a[0] if trans_a else a[1]
    out = static_shape(node.outputs[0])
    if out is None:  # QGemm: onnx infers no contrib shapes
        b_shape = _in(node, b)
        out = (a[1] if trans_a else a[0], b_shape[0] if trans_b else b_shape[1])
    macs = _numel(out) * k
    flops = 2 * macs
    if _has_input(node, bias):
        flops += _numel(out)
    return Cost(flops, macs)
