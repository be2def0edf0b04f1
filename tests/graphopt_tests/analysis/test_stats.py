"""parameter_count counts the weights a model holds, whatever their storage: packed low-bit
codes all count (one MatMulNBits byte holds two int4 weights, as two int4 DequantizeLinear
elements do), and Constant nodes count whichever attribute holds their value."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt import io
from graphopt.analysis.stats import parameter_count


def _model(nodes, initializers, opsets=(("", 21),)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10
    )
    return io.load(proto).model


def test_matmulnbits_codes_count_as_the_weights_they_pack() -> None:
    n, k, block = 16, 64, 32
    packed = np.zeros((n, k // block, block // 2), np.uint8)  # two int4 codes per byte
    scales = np.ones((n * (k // block),), np.float32)
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n,
        bits=4, block_size=block,
    )  # fmt: skip
    inits = [onnx.numpy_helper.from_array(packed, "b"), onnx.numpy_helper.from_array(scales, "s")]
    model = _model([node], inits, (("", 21), ("com.microsoft", 1)))
    elements, nbytes = parameter_count(model)
    assert elements == n * k + scales.size
    assert nbytes == packed.nbytes + scales.nbytes


def test_int4_dequantize_form_counts_the_same_weights() -> None:
    n, k = 16, 64
    codes = helper.make_tensor("b", TensorProto.INT4, [k, n], np.zeros(k * n, np.int8).tolist())
    scale = onnx.numpy_helper.from_array(np.ones((1, n), np.float32), "s")
    nodes = [
        helper.make_node("DequantizeLinear", ["b", "s"], ["w"], axis=0, block_size=k),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    elements, _ = parameter_count(_model(nodes, [codes, scale]))
    assert elements == n * k + n


def test_constant_nodes_count_every_value_attribute() -> None:
    nodes = [
        helper.make_node("Constant", [], ["a"], value_float=2.0),
        helper.make_node("Constant", [], ["b"], value_ints=[1, 2, 3]),
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("t", 1, [2], [1, 2])),
        helper.make_node("Mul", ["x", "a"], ["y"]),
    ]
    elements, nbytes = parameter_count(_model(nodes, []))
    assert elements == 1 + 3 + 2
    assert nbytes == 4 + 24 + 8
