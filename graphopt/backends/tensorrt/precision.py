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
}
# Weights smaller than this are not worth a sparse kernel; TensorRT skips them too.
MIN_SPARSE_ELEMENTS = 4096
# Inputs 1 of these ops are weights read along their reduction axis (where 2:4 applies).
_WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


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
    for node in graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    _add(found, attr.i)
        if node.op_type in _WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                continue
            weight = numpy_helper.to_array(tensor)
            if weight.size < MIN_SPARSE_ELEMENTS:
                continue
            if is_two_four(weight, _reduction_axis(node, weight.ndim)):
                found.sparse_weights.append(tensor.name)
            else:
                found.dense_weights += 1
    return found


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
