"""FLOPs per node at concrete shapes.

Conventions (the numbers are only comparable under the same ones):

- a multiply-add counts as **2 FLOPs**; :attr:`FlopsReport.macs` counts the multiply-adds
  alone (those of the matrix products: Conv, MatMul, Gemm, attention, the gate matmuls of
  LSTM / GRU / RNN, Einsum's contractions): elementwise ops have none, so MACs are not
  FLOPs / 2 (a Relu's FLOPs are not half a multiply-add);
- Conv / ConvTranspose / MatMul / Gemm: 2 per multiply-add, plus 1 per output element for a
  bias or ``C`` term; groups and batch broadcasting are taken into account; DeformConv as
  the Conv it computes on the sampled values, plus 1 per sampled value for the mask (the
  bilinear sampling counts 0, as Resize does); ``com.microsoft`` NhwcConv as Conv, FusedConv
  and FusedGemm as Conv / Gemm plus 1 per output element for the added Z and the activation;
- LSTM / GRU / RNN: every direction's every time step (an upper bound with
  ``sequence_lens``): the gate matmuls, the bias, and 1 per element of each activation and
  elementwise update; Einsum: its equation's products and sums, a pure transpose or
  diagonal 0 (:mod:`graphopt.analysis.flops_recurrent`);
- Det: an LU factorization (about n³/3 multiply-adds per matrix); DFT / STFT as an FFT,
  5·log2(n) per complex output (5·n·log2(n) per transform of length n), plus the window;
- elementwise ops (Add, Relu, Sigmoid, Where, ...): 1 per output element; an activation that
  is a formula of several ops (:data:`~graphopt.analysis.flops_fused.ACTIVATIONS`: Gelu,
  Swish, HardSwish, Mish and the ``com.microsoft`` Gelu family) counts one per op of that
  formula, per element, so that the fused op counts what the ops it replaces counted;
- normalizations and Softmax: a small constant per element (:data:`PER_ELEMENT`), as if
  BatchNormalization were folded into a scale and shift; LRN 2 per channel of its window
  and 4 more per element; SwiGLU as Sigmoid and its Muls;
- pooling: 1 per window element per output; global pooling, reductions, CumSum and
  CumProd: 1 per input element;
- data movement (Reshape, Transpose, Gather, Concat, Cast, Col2Im, Resize, sequence and
  optional ops, ...): 0;
- fused ops count as the unfused pattern they replace (graphopt's fusions and ORT's contrib
  ops; :mod:`graphopt.analysis.flops_fused`): SkipLayerNormalization as Add +
  LayerNormalization, opset-23 Attention and the ``com.microsoft`` Attention /
  MultiHeadAttention / GroupQueryAttention as their MatMuls (and the packed QKV projection),
  scale, mask Add and Softmax, RotaryEmbedding as x·cos + rotate_half(x)·sin, FusedMatMul
  and MatMulNBits as MatMul;
- integer and quantized ops count as their float counterparts (an integer multiply-add is
  2 FLOPs too; zero-point and scale arithmetic is not counted): ConvInteger and QLinearConv
  as Conv, MatMulInteger, QLinearMatMul, MatMulIntegerToFloat as MatMul, QGemm as Gemm,
  DynamicQuantizeMatMul as MatMul plus quantizing A (as DynamicQuantizeLinear), the
  ``com.microsoft`` QLinear elementwise ops, global pooling, ReduceMean and Softmax as their
  float versions (QLinearConcat as Concat, GatherBlockQuantized as Gather, 0), QAttention as
  Attention;
- QuantizeLinear / DequantizeLinear: 2 per element on activations; 0 on a constant (an
  int8/int4/fp8 weight's DequantizeLinear, a float weight's Q→DQ, perhaps behind a
  Reshape or Transpose: :func:`is_weight_coding`), which runtimes fold or prepack once;
- graphopt's own sparse ops (domain ``graphopt``: SparseMatMul, SparseMatMul24,
  SparseQMatMul; :mod:`graphopt.analysis.sparse_ops`) count as the dense MatMul (+ bias and
  fused activation) they compute, the skipped zeros not taken off, as a fused op counts as
  its pattern: sparsifying changes no FLOPs, lowering to the sparse kernels none either;
- control flow counts what one run executes: an If counts its larger branch (both are
  listed in :attr:`FlopsReport.control_flow`); a Loop counts its body × the trip count when
  that is a constant (an upper bound when the loop condition can end it earlier), a Scan ×
  its sequence length when known; otherwise one iteration, with a note;
- any other op counts 0 and is listed as *not counted* (among the standard ops: GridSample,
  RoiAlign, MaxRoiPool, AffineGrid, NonMaxSuppression, LinearAttention, CausalConvWithState,
  the random, string and loss ops, ...): a share of FLOPs is then a share of the counted
  ones, which the size targets' verdicts say (:mod:`graphopt.size_targets`); a node whose
  shapes could not be inferred is listed as *unknown shape*.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.analysis.flops_fused import (
    fused_matmul,
    fused_per_element,
    group_query_attention,
    matmul_nbits,
    multi_head_attention,
    onnx_attention,
    packed_attention,
    rotary,
)
from graphopt.analysis.flops_recurrent import RECURRENT, einsum, recurrent
from graphopt.analysis.flops_terms import (
    PER_ELEMENT,
    Cost,
    UnknownShape,
    has_input,
    in_shape,
    int_list,
    lrn_per_element,
    numel,
    out_shape,
)
from graphopt.analysis.shapes import infer_shapes, static_shape
from graphopt.analysis.sparse_ops import is_sparse_op, sparse_matmul
from graphopt.analysis.stats import is_constant_node
from graphopt.editing import attribute, const_ints, is_constant


def _op_set(names: str) -> frozenset[str]:
    return frozenset(names.split())


ELEMENTWISE = _op_set(
    """Abs Acos Acosh Add And Asin Asinh Atan Atanh BitShift BitwiseAnd BitwiseNot BitwiseOr
    BitwiseXor Ceil Celu Clip Cos Cosh Div Elu Equal Erf Exp Floor Greater GreaterOrEqual
    HardSigmoid IsInf IsNaN LeakyRelu Less LessOrEqual Log Max Mean Min Mod Mul Neg Not Or Pow
    PRelu Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Sub
    Sum Tan Tanh ThresholdedRelu Where Xor"""
)
# com.microsoft quantized ops that count as their float counterparts, by kind. onnx infers
# no shapes for them, so their output shapes are derived from the inputs here.
QLINEAR_ELEMENTWISE = _op_set("QLinearAdd QLinearMul QLinearSigmoid QLinearLeakyRelu QLinearWhere")
QLINEAR_ZERO = _op_set("QLinearConcat GatherBlockQuantized")
REDUCTIONS = _op_set(
    """ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare ArgMax ArgMin CumSum CumProd GlobalAveragePool GlobalMaxPool
    GlobalLpPool"""
)
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
ZERO = _op_set(
    """BitCast Cast CastLike CenterCropPad Col2Im Compress Concat Constant ConstantOfShape
    DepthToSpace Dropout Expand EyeLike
    Flatten Gather GatherElements GatherND Identity If Loop NonZero OneHot Pad Range Reshape
    MaxUnpool Resize ReverseSequence Scan Scatter ScatterElements ScatterND Shape Size Slice
    SpaceToDepth Split Squeeze Tile TopK Transpose Trilu Unsqueeze Upsample
    Optional OptionalGetElement OptionalHasElement ConcatFromSequence SequenceAt
    SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
    SplitToSequence TensorScatter"""
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
        except UnknownShape:
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


def node_flops(node: ir.Node) -> int | None:
    """FLOPs of one node from its inferred shapes; None when the op has no formula.

    Raises :class:`~graphopt.analysis.flops_terms.UnknownShape` when a shape the formula needs
    is not known.
    """
    cost = node_cost(node)
    return None if cost is None else cost.flops


def node_cost(node: ir.Node) -> Cost | None:
    """:func:`node_flops` with the multiply-adds counted apart (see :class:`Cost`)."""
    op = node.op_type
    if is_sparse_op(node):
        return sparse_matmul(node)
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
        return fused_matmul(node)
    if op == "MatMulNBits":
        return matmul_nbits(node)
    if op == "MatMulIntegerToFloat":  # A, B, a_scale, b_scale, a_zp, b_zp, bias
        return _matmul(node, b=1, bias=6)
    if op == "DynamicQuantizeMatMul":  # A (float, quantized on the fly), B, b_scale, b_zp, bias
        flops, macs = _matmul(node, b=1, bias=4)
        return Cost(flops + PER_ELEMENT["DynamicQuantizeLinear"] * numel(in_shape(node, 0)), macs)
    if op == "Gemm":
        return _gemm(node)
    if op in RECURRENT:
        return recurrent(node)
    if op == "Einsum":
        return einsum(node)
    if op == "DeformConv":
        return _deform_conv(node)
    if op in ("NhwcConv", "FusedConv"):  # com.microsoft; FusedConv: + Z (input 3), activation
        flops, macs = _conv(node)
        extra = (op == "FusedConv") * (has_input(node, 3) + _has_activation(node))
        return Cost(flops + extra * numel(out_shape(node)), macs)
    if op == "FusedGemm":  # com.microsoft: Gemm and its activation
        return _gemm(node, activation=_has_activation(node))
    if op == "Det":
        return _det(node)
    if op in ("DFT", "STFT"):
        return _fourier(node)
    if op == "QGemm":  # A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp
        return _gemm(node, b=3, bias=6)
    if op == "Attention" and node.domain == "com.microsoft":
        return packed_attention(node, mask=(3, 5), past=4)
    if op == "QAttention":  # input, weight, bias, scales, mask_index, zero points, past
        return packed_attention(node, mask=(5,), past=8)
    if op == "Attention":
        return onnx_attention(node)
    if op == "MultiHeadAttention":
        return multi_head_attention(node)
    if op == "GroupQueryAttention":
        return group_query_attention(node)
    if op == "RotaryEmbedding":
        return Cost(rotary(node, in_shape(node, 0)))
    if op in QLINEAR_ELEMENTWISE:
        return Cost(numel(_broadcast_out(node)))
    if op == "QLinearSoftmax":  # X, X_scale, X_zp, Y_scale, Y_zp; as Softmax
        return Cost(PER_ELEMENT["Softmax"] * numel(in_shape(node, 0)))
    if op in ("QLinearGlobalAveragePool", "QLinearReduceMean"):
        return Cost(numel(in_shape(node, 0)))
    if op in _QDQ and is_weight_coding(node):
        return Cost(0)
    if op == "MeanVarianceNormalization":  # a function onnx does not infer: input 0's shape
        return Cost(PER_ELEMENT[op] * numel(in_shape(node, 0)))
    per_element = fused_per_element(node)
    if per_element is not None:
        return Cost(per_element * numel(in_shape(node, 0)))
    if op in ELEMENTWISE:
        return Cost(numel(out_shape(node)))
    if op in PER_ELEMENT:
        return Cost(PER_ELEMENT[op] * numel(out_shape(node)))
    if op == "LRN":
        return Cost(lrn_per_element(attribute(node, "size", 1)) * numel(out_shape(node)))
    if op == "SwiGLU":  # Swish(A) · B: Sigmoid, Mul (and Mul by alpha unless 1), Mul
        return Cost((3 + (attribute(node, "alpha", 1.0) != 1.0)) * numel(out_shape(node)))
    if op in POOLS:
        kernel = int_list(node, "kernel_shape")
        return Cost(numel(out_shape(node)) * math.prod(kernel))
    if op in REDUCTIONS:
        return Cost(numel(in_shape(node, 0)))
    return None


# Ops that only move or reshape a constant on its way to a weight's DequantizeLinear: what
# they give is still a constant the runtime folds before the first run.
_LAYOUT = _op_set("Identity Reshape Transpose Squeeze Unsqueeze Flatten")
_QDQ = _op_set("QuantizeLinear DequantizeLinear")
# Nodes followed back from a Q/DQ towards a constant: exporters put one or two in between.
_MAX_WEIGHT_CHAIN = 8


def is_weight_coding(node: ir.Node) -> bool:
    """Whether a QuantizeLinear / DequantizeLinear node works on a constant: weight decoding
    (an int8/int4/fp8 weight's DequantizeLinear), or a float weight's Q→DQ pair.

    Runtimes fold these into the weight once (ONNX Runtime's constant folding and the QDQ
    kernels' prepacking; TensorRT builds the weight into the engine), so they cost nothing
    per run. Counted 2 FLOPs per weight element they made int8 MiniLM count more FLOPs
    than the float one. Q/DQ of activations run every time and stay counted.
    """
    for _ in range(_MAX_WEIGHT_CHAIN):
        # Scales and zero points (a Reshape's target): constants too, or nothing is folded.
        if any(v is not None and not is_constant(v) for v in node.inputs[1:]):
            return False
        value = node.inputs[0] if node.inputs else None
        if value is None or value.is_graph_input():
            return False
        if is_constant(value):
            return True
        producer = value.producer()
        if (
            producer is None
            or producer.domain not in ("", "ai.onnx")
            or (producer.op_type not in _LAYOUT and producer.op_type not in _QDQ)
        ):
            return False
        node = producer
    return False


def _broadcast_out(node: ir.Node) -> tuple[int, ...]:
    """Output shape of a QLinear elementwise op (onnx infers no contrib shapes): inferred,
    or else the broadcast of its data inputs, which sit between scales and zero points."""
    shape = static_shape(node.outputs[0])
    if shape is not None:
        return shape
    data = {"QLinearAdd": (0, 3), "QLinearMul": (0, 3), "QLinearWhere": (0, 1, 4)}
    try:
        shapes = (in_shape(node, i) for i in data.get(node.op_type, (0,)))
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise UnknownShape from None


def _conv(node: ir.Node, weight: int = 1, bias: int | None = 2) -> Cost:
    out = out_shape(node)
    w = in_shape(node, weight)  # [C_out, C_in / groups, k...]
    macs = numel(out) * math.prod(w[1:])
    flops = 2 * macs
    if bias is not None and has_input(node, bias):
        flops += numel(out)
    return Cost(flops, macs)


def _conv_transpose(node: ir.Node) -> Cost:
    x = in_shape(node, 0)
    weight = in_shape(node, 1)  # [C_in, C_out / groups, k...]
    # Every input element is multiplied into C_out/groups × kernel output positions.
    macs = numel(x) * math.prod(weight[1:])
    flops = 2 * macs
    if has_input(node, 2):
        flops += numel(out_shape(node))
    return Cost(flops, macs)


def _matmul(node: ir.Node, b: int | None = None, bias: int | None = None) -> Cost:
    a = in_shape(node, 0)
    k = a[-1]
    out = static_shape(node.outputs[0])
    if out is None and b is not None:
        # A contrib op onnx does not infer: A [..., M, K] × B [..., K, N].
        b_shape = in_shape(node, b)
        if len(a) < 2 or len(b_shape) < 2:
            raise UnknownShape
        try:
            batch = np.broadcast_shapes(a[:-2], b_shape[:-2])
        except ValueError:
            raise UnknownShape from None
        out = (*batch, a[-2], b_shape[-1])
    if out is None:
        raise UnknownShape
    # The output holds every (batch, m, n) once; each is a dot product of length K.
    macs = numel(out) * k
    flops = 2 * macs
    if bias is not None and has_input(node, bias):
        flops += numel(out)
    return Cost(flops, macs)


def _gemm(node: ir.Node, b: int = 1, bias: int = 2, activation: int = 0) -> Cost:
    a = in_shape(node, 0)
    trans_a, trans_b = attribute(node, "transA", 0), attribute(node, "transB", 0)
    k = a[0] if trans_a else a[1]
    out = static_shape(node.outputs[0])
    if out is None:  # QGemm: onnx infers no contrib shapes
        b_shape = in_shape(node, b)
        out = (a[1] if trans_a else a[0], b_shape[0] if trans_b else b_shape[1])
    macs = numel(out) * k
    flops = 2 * macs + activation * numel(out)
    if has_input(node, bias):
        flops += numel(out)
    return Cost(flops, macs)


def _deform_conv(node: ir.Node) -> Cost:
    """DeformConv (X, W, offset, B, mask): the Conv it computes on the sampled values, and 1
    per sampled value for the mask; the bilinear sampling counts 0, as Resize does."""
    flops, macs = _conv(node, bias=3)
    out, x, w = out_shape(node), in_shape(node, 0), in_shape(node, 1)
    if has_input(node, 4):
        # N · C_in · output positions · kernel taps values are sampled.
        flops += numel(out) // out[1] * x[1] * math.prod(w[2:])
    return Cost(flops, macs)


def _has_activation(node: ir.Node) -> int:
    activation = attribute(node, "activation", "")
    return int(bool(activation.decode() if isinstance(activation, bytes) else activation))


def _det(node: ir.Node) -> Cost:
    """Det of [..., n, n]: an LU factorization's multiply-adds (Σ k² for k < n, about n³/3:
    2 FLOPs each), its n(n-1)/2 divisions and the n-1 products of the diagonal."""
    x = in_shape(node, 0)
    n = x[-1]
    per_matrix = 2 * ((n - 1) * n * (2 * n - 1) // 6) + n * (n - 1) // 2 + max(n - 1, 0)
    return Cost(numel(x[:-2]) * per_matrix)


def _fourier(node: ir.Node) -> Cost:
    """DFT / STFT as a fast Fourier transform: 5·n·log2(n) FLOPs per complex transform of
    length n (the count FFT benchmarks use), i.e. 5·log2(n) per complex output; a onesided
    (real-input) transform has about half the outputs and half the count. STFT adds 1 per
    framed sample for the window."""
    out = out_shape(node)  # [..., 2]: real and imaginary parts
    outputs = numel(out) // 2
    if node.op_type == "STFT":  # signal, frame_step, window, frame_length
        length = const_ints(node.inputs[3]) if has_input(node, 3) else None
        n = length[0] if length else in_shape(node, 2)[0]
        window = has_input(node, 2) * out[0] * out[1] * n  # batch · frames · frame length
    else:
        n = _dft_length(node)
        window = 0
    return Cost(math.ceil(5 * outputs * math.log2(max(n, 2))) + window)


def _dft_length(node: ir.Node) -> int:
    """DFT's transform length: dft_length when constant, else the input's dim on the axis
    (an attribute to opset 19, default 1; input 2 from opset 20, default -2)."""
    if has_input(node, 1):
        length = const_ints(node.inputs[1])
        if not length:  # set at run time
            raise UnknownShape
        return length[0]
    x = in_shape(node, 0)
    axes = const_ints(node.inputs[2]) if has_input(node, 2) else None
    if axes:
        axis = axes[0]
    elif "axis" in node.attributes:
        axis = attribute(node, "axis")
    else:
        graph = node.graph
        opset = node.version or (graph.opset_imports.get("", 0) if graph is not None else 0)
        axis = 1 if 0 < opset < 20 else -2
    if not -len(x) <= axis < len(x):
        raise UnknownShape
    return x[axis]
