"""``--requantize symmetric`` on constants ORT quantizes that are no layer's weight (the
scalar factors of Mul/Add): TensorRT's builder rejects a rank-0 quantized constant, which its
parser accepts, so the pass stores them in float (exact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.api import OptimizeOptions, optimize
from graphopt.backends.tensorrt.findings import ERROR
from graphopt.backends.tensorrt.rules import static_findings


def _qdq_model(path: Path) -> Path:
    """x -> Q/DQ (uint8) -> MatMul(DQ(uint8 weight)) -> Mul(DQ(rank-0 uint8, shared by two
    DQs)) -> Add(DQ(uint8 vector)) -> Add(DQ(same rank-0)): ORT quantize_static's form."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(rng.integers(0, 255, (4, 4)).astype(np.uint8), "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(120, np.uint8), "w_zero"),
        numpy_helper.from_array(np.array(200, np.uint8), "k_q"),  # rank 0, shared
        numpy_helper.from_array(np.array(0.05, np.float32), "k_scale"),
        numpy_helper.from_array(np.array(100, np.uint8), "k_zero"),
        numpy_helper.from_array(np.array([3, 50, 90, 250], np.uint8), "b_q"),
        numpy_helper.from_array(np.array(0.1, np.float32), "b_scale"),
        numpy_helper.from_array(np.array(7, np.uint8), "b_zero"),
        numpy_helper.from_array(rng.integers(0, 255, (6, 4)).astype(np.uint8), "t_q"),
        numpy_helper.from_array(np.array(0.02, np.float32), "t_scale"),
        numpy_helper.from_array(np.array(130, np.uint8), "t_zero"),
        numpy_helper.from_array(np.array([1, 4], np.int64), "ids"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"]),
        helper.make_node("MatMul", ["xd", "w"], ["m"]),
        helper.make_node("DequantizeLinear", ["k_q", "k_scale", "k_zero"], ["k"]),
        helper.make_node("Mul", ["m", "k"], ["mk"]),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"]),
        helper.make_node("Add", ["mk", "b"], ["a"]),
        helper.make_node("DequantizeLinear", ["k_q", "k_scale", "k_zero"], ["k2"]),
        helper.make_node("Add", ["a", "k2"], ["a2"]),
        # An embedding table: a layer's weights, re-rounded to int8, not stored in float.
        helper.make_node("DequantizeLinear", ["t_q", "t_scale", "t_zero"], ["t"]),
        helper.make_node("Gather", ["t", "ids"], ["e"]),
        helper.make_node("Add", ["a2", "e"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        init,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_constants_that_are_no_weight_are_stored_in_float(tmp_path: Path) -> None:
    source = _qdq_model(tmp_path / "u8.onnx")
    out = tmp_path / "s8.onnx"
    result = optimize(
        source, out, OptimizeOptions(target="tensorrt", requantize="symmetric", calib="random")
    )
    model = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dequantized = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    # No rank-0 quantized constant left behind a DequantizeLinear (the builder's rejection),
    # and the vector addend is not re-rounded either: only the MatMul's weight and the
    # embedding table stay quantized (int8).
    assert not [name for name in dequantized if name in inits and inits[name].ndim == 0]
    kept = sorted((name, inits[name].dtype) for name in dequantized if name in inits)
    assert kept == [("t_q_s8", np.int8), ("w_q_s8", np.int8)]
    assert not [f for f in static_findings(model) if f.severity == ERROR]
    # Exact: the float constants are what the DequantizeLinears computed.
    floats = sorted(float(v) for v in inits.values() if v.dtype == np.float32 and v.ndim == 0)
    assert any(abs(v - (200 - 100) * 0.05) < 1e-6 for v in floats)
    record = result.report.details["requantize"]
    assert any("3 quantized constant(s)" in note and "2 scalar" in note for note in record.notes)


def test_symmetric_rank0_constant_is_stored_in_float(tmp_path: Path) -> None:
    """A rank-0 int8 constant with zero point 0 is already symmetric, and still one the
    builder rejects."""
    path = tmp_path / "s8.onnx"
    init = [
        numpy_helper.from_array(np.array(5, np.int8), "q"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        init,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out = tmp_path / "o.onnx"
    optimize(path, out, OptimizeOptions(target="tensorrt", requantize="symmetric", calib="random"))
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Mul"]
