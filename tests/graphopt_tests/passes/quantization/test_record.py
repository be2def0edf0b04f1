"""The quantization record's size accounting: the bytes a written model holds."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.passes.quantization.record import weight_bytes
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, random_calib, run_pass, tensor_info


def _constant(name: str, array: np.ndarray):
    return helper.make_node(
        "Constant", [], [name], name=f"{name}_node", value=numpy_helper.from_array(array, name)
    )


def test_weight_bytes_counts_live_initializers_and_constants_only():
    w = np.ones((4, 4), np.float32)  # 64 bytes
    nodes = [
        _constant("cw", w),  # read: counts
        _constant("dead_c", np.ones(100, np.float32)),  # read by nothing: does not
        helper.make_node("MatMul", ["x", "cw"], ["h"]),
        helper.make_node("MatMul", ["h", "iw"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [2, 4])],
        [tensor_info("y", TensorProto.FLOAT, [2, 4])],
        {"iw": w, "dead_i": np.ones(50, np.float32)},
    )
    assert weight_bytes(model) == 64 + 64


def test_static_int8_of_constant_node_weights_reports_the_bytes_written(tmp_path):
    """Weights in Constant nodes (paddle2onnx's export) are replaced by int8 initializers;
    the float Constants left dead for the final cleanup are no weight of the result."""

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)
    nodes = [
        _constant("w1", w1),
        _constant("w2", w2),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
    )
    context = PassContext(target="ort")
    run_pass(model, QuantizePass, context, mode="int8", calib=random_calib(tmp_path, (48, 3, 8, 8)))
    record = context.details["quantize"]
    assert record.weight_bytes_before == w1.nbytes + w2.nbytes
    # int8 codes (a quarter) plus per-channel scales and the padded stem's zero channel.
    assert record.weight_bytes_after < 0.4 * record.weight_bytes_before


def test_the_headline_counts_layers_and_the_ops_lowered_with_them_apart() -> None:
    """Relu, pooling and Add run in int8 between the layers; counted as layers, a ResNet-50
    of 54 Conv/Gemm layers read "122 layers quantized"."""
    from graphopt.passes.quantization.record import LayerPrecision, QuantRecord

    record = QuantRecord(mode="int8")
    record.layers = [
        LayerPrecision("c1", "Conv", "int8"),
        LayerPrecision("c2", "Conv", "float", "excluded"),
        LayerPrecision("g", "Gemm", "int8"),
        LayerPrecision("r", "Relu", "int8"),
        LayerPrecision("p", "MaxPool", "int8"),
        LayerPrecision("s", "Softmax", "float"),
    ]
    assert record.headline() == (
        "quantization int8: 2 layers quantized, 1 kept in float, 2 other ops lowered with them"
    )
