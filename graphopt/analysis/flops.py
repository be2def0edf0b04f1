"""FLOPs per node at concrete shapes.

Conventions (the numbers are only comparable under the same ones):

- a multiply-add counts as **2 FLOPs** (so GMACs = GFLOPs / 2);
- Conv / ConvTranspose / MatMul / Gemm: 2 per multiply-add, plus 1 per output element for a
  bias or ``C`` term; groups and batch broadcasting are taken into account;
- elementwise ops (Add, Relu, Sigmoid, Where, ...): 1 per output element;
- normalizations and Softmax: a small constant per element (:data:`PER_ELEMENT`), as if
  BatchNormalization were folded into a scale and shift;
- pooling: 1 per window element per output; global pooling and reductions: 1 per input
  element;
- data movement (Reshape, Transpose, Gather, Concat, Cast, ...): 0;
- any other op counts 0 and is listed as *not counted*; a node whose shapes could not be
  inferred is listed as *unknown shape*. If/Loop/Scan bodies are counted once (a Loop's trip
  count is not known statically).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

from graphopt.analysis.shapes import infer_shapes, static_shape
from graphopt.analysis.stats import is_constant_node


def _op_set(names: str) -> frozenset[str]:
    return frozenset(names.split())


ELEMENTWISE = _op_set(
    """Abs Acos Acosh Add And Asin Asinh Atan Atanh BitShift BitwiseAnd BitwiseNot BitwiseOr
    BitwiseXor Ceil Celu Clip Cos Cosh Div Elu Equal Erf Exp Floor Gelu Greater
    GreaterOrEqual HardSigmoid HardSwish IsInf IsNaN LeakyRelu Less LessOrEqual Log Max Mean
    Min Mish Mod Mul Neg Not Or Pow PRelu Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin
    Sinh Softplus Softsign Sqrt Sub Sum Tan Tanh ThresholdedRelu Where Xor"""
)
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
    SpaceToDepth Split Squeeze Tile TopK Transpose Trilu Unsqueeze Upsample"""
)


@dataclass
class FlopsReport:
    """FLOPs of a model at the given shapes (multiply-add = 2 FLOPs)."""

    total: int = 0
    by_op: Counter[str] = field(default_factory=Counter)
    # Op types counted as 0 because graphopt has no formula for them: op → node count.
    not_counted: Counter[str] = field(default_factory=Counter)
    # Op types whose shapes could not be inferred: op → node count.
    unknown_shape: Counter[str] = field(default_factory=Counter)


def model_flops(
    model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> FlopsReport:
    """FLOPs of ``model`` with its inputs bound to ``input_shapes`` (or the defaults)."""
    inferred, _ = infer_shapes(model, input_shapes)
    return flops_of_inferred(inferred)


def flops_of_inferred(model: ir.Model) -> FlopsReport:
    """FLOPs of a model whose shapes are already inferred (see :func:`infer_shapes`)."""
    report = FlopsReport()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if is_constant_node(node):
            continue
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        try:
            flops = node_flops(node)
        except _UnknownShape:
            report.unknown_shape[key] += 1
            continue
        if flops is None:
            report.not_counted[key] += 1
            continue
        report.total += flops
        if flops:
            report.by_op[key] += flops
    return report


class _UnknownShape(Exception):
    pass


def node_flops(node: ir.Node) -> int | None:
    """FLOPs of one node from its inferred shapes; None when the op has no formula.

    Raises ``_UnknownShape`` (internal) when a shape the formula needs is not known.
    """
    op = node.op_type
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if op in ZERO:
        return 0
    if op == "Conv":
        return _conv(node)
    if op == "ConvTranspose":
        return _conv_transpose(node)
    if op in ("MatMul", "MatMulInteger", "FusedMatMul"):
        return _matmul(node)
    if op == "Gemm":
        return _gemm(node)
    if op in ELEMENTWISE:
        return _numel(_out(node))
    if op in PER_ELEMENT:
        return PER_ELEMENT[op] * _numel(_out(node))
    if op in POOLS:
        kernel = _ints(node, "kernel_shape")
        return _numel(_out(node)) * math.prod(kernel)
    if op in REDUCTIONS:
        return _numel(_in(node, 0))
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


def _conv(node: ir.Node) -> int:
    out = _out(node)
    weight = _in(node, 1)  # [C_out, C_in / groups, k...]
    macs_per_output = math.prod(weight[1:])
    flops = 2 * _numel(out) * macs_per_output
    if _has_input(node, 2):
        flops += _numel(out)
    return flops


def _conv_transpose(node: ir.Node) -> int:
    x = _in(node, 0)
    weight = _in(node, 1)  # [C_in, C_out / groups, k...]
    # Every input element is multiplied into C_out/groups × kernel output positions.
    flops = 2 * _numel(x) * math.prod(weight[1:])
    if _has_input(node, 2):
        flops += _numel(_out(node))
    return flops


def _matmul(node: ir.Node) -> int:
    k = _in(node, 0)[-1]
    out = _out(node)
    # The output holds every (batch, m, n) once; each is a dot product of length K.
    return 2 * _numel(out) * k


def _gemm(node: ir.Node) -> int:
    a = _in(node, 0)
    trans_a = node.attributes.get("transA")
    k = a[0] if trans_a is not None and trans_a.value else a[1]
    out = _out(node)
    flops = 2 * _numel(out) * k
    if _has_input(node, 2):
        flops += _numel(out)
    return flops
