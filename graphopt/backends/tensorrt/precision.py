"""What precisions and weight patterns an ONNX graph holds, read from its tensors.

The engine build sets enterprise TensorRT's precision flags from this (TensorRT-RTX's strongly
typed network takes them from the graph itself), SPARSE_WEIGHTS when weights are 2:4 sparse,
and picks the compute capabilities FP8 needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

# ONNX element type -> the precision name reports use.
PRECISION_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.FLOAT8E4M3FN: "fp8",
    # TensorRT has no float64: the engine computes (and binds) it in float32, which the
    # build reports as a precision change.
    onnx.TensorProto.DOUBLE: "float64",
}
# Weights smaller than this are not worth a sparse kernel; TensorRT skips them too.
MIN_SPARSE_ELEMENTS = 4096
# Inputs 1 of these ops are weights read along their reduction axis (where 2:4 applies).
_WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass
class GraphPrecisions:
    """Element types of the graph's tensors and the 2:4-sparse weights found."""

    types: set[str] = field(default_factory=set)
    sparse_weights: list[str] = field(default_factory=list)
    dense_weights: int = 0

    def holds(self, name: str) -> bool:
        return name in self.types


def graph_precisions(model: onnx.ModelProto) -> GraphPrecisions:
    """Precisions held by initializers, value types and Q/DQ outputs, and 2:4 weights."""
    graph = model.graph
    found = GraphPrecisions()
    values = [*graph.input, *graph.output, *graph.value_info]
    for info in values:
        _add(found, info.type.tensor_type.elem_type)
    initializers = {t.name: t for t in graph.initializer}
    for tensor in graph.initializer:
        _add(found, tensor.data_type)
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    _add(found, attr.i)
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
            continue
        weight = _weight_pattern(node.input[1], initializers, producers)
        if weight is None:
            continue
        name, nonzero = weight
        if nonzero.size < MIN_SPARSE_ELEMENTS:
            continue
        if is_two_four(nonzero, _reduction_axis(node, nonzero.ndim)):
            found.sparse_weights.append(name)
        else:
            found.dense_weights += 1
    return found


def _weight_pattern(
    name: str,
    initializers: dict[str, onnx.TensorProto],
    producers: dict[str, onnx.NodeProto],
) -> tuple[str, np.ndarray] | None:
    """A constant weight's name and where it is non-zero, as the op reads it: a float
    initializer, or a quantized one behind DequantizeLinear (a Q/DQ int8/fp8/int4 weight: zero
    where the stored value equals its zero point), through the Cast/Transpose between them
    that keep which elements are zero. None for a weight computed at run time."""
    perms: list[list[int] | None] = []
    for _ in range(4):  # a DequantizeLinear, a Cast and a Transpose at most
        node = producers.get(name)
        if node is None or node.op_type not in ("Cast", "Transpose", "Identity"):
            break
        if node.op_type == "Transpose":
            perms.append(next((list(a.ints) for a in node.attribute if a.name == "perm"), None))
        name = node.input[0]
    if name in initializers:
        tensor = initializers[name]
        if tensor.data_type not in _FLOATS:
            return None
        nonzero = numpy_helper.to_array(tensor) != 0
    else:
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            return None
        nonzero = _dequantized_nonzero(node, initializers)
        if nonzero is None:
            return None
        name = node.input[0]
    for perm in reversed(perms):  # the Transpose nearest the op is applied last
        nonzero = np.transpose(nonzero, perm)
    return name, nonzero


def _dequantized_nonzero(
    node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]
) -> np.ndarray | None:
    """Where DequantizeLinear's output is non-zero: where the stored value differs from the
    zero point (per tensor, per axis or per block); None when the zero point is computed."""
    stored = np.asarray(numpy_helper.to_array(initializers[node.input[0]]))
    if len(node.input) < 3 or not node.input[2]:
        return _as_number(stored) != 0
    if node.input[2] not in initializers:
        return None
    zero = np.asarray(numpy_helper.to_array(initializers[node.input[2]]))
    stored, zero = _as_number(stored), _as_number(zero)
    if zero.size > 1 and stored.ndim:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % stored.ndim
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        if block:  # blockwise: zero has the weight's shape with axis divided into blocks
            zero = np.repeat(zero, block, axis=axis)[tuple(slice(0, n) for n in stored.shape)]
        else:  # per axis: a 1-D zero point along ``axis``
            shape = [1] * stored.ndim
            shape[axis] = zero.size
            zero = zero.reshape(shape)
    try:
        return stored != zero
    except ValueError:  # shapes ONNX would refuse: say nothing rather than guess
        return None


def _as_number(array: np.ndarray) -> np.ndarray:
    """int4/fp8 arrays (ml_dtypes) as numbers numpy compares."""
    return array.astype(np.float32) if array.dtype.kind not in "iub" else array.astype(np.int64)


def is_two_four(weight: np.ndarray, axis: int) -> bool:
    """Whether every group of 4 consecutive elements along ``axis`` has at most 2 non-zeros
    (the pattern TensorRT's sparse kernels use: along the input channels / reduction dim)."""
    moved = np.moveaxis(weight, axis, -1)
    if moved.shape[-1] % 4:
        return False
    groups = moved.reshape(-1, 4)
    return bool(np.all(np.count_nonzero(groups, axis=1) <= 2)) and bool(np.any(groups))


def _reduction_axis(node: onnx.NodeProto, ndim: int) -> int:
    if node.op_type == "Conv":
        return 1  # [O, I, kh, kw]: input channels
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    return ndim - 2 if ndim >= 2 else 0  # MatMul [.., K, N]


def _add(found: GraphPrecisions, elem_type: int) -> None:
    name = PRECISION_NAMES.get(elem_type)
    if name is not None:
        found.types.add(name)
