"""``graphopt lint --target tensorrt`` and ``optimize --target tensorrt --engine``: exit codes
and messages, with TensorRT forced absent (GRAPHOPT_TENSORRT=none) so they run everywhere;
the real parser's path where tensorrt_rtx is installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main


def _save(path: Path, zero_point: int | None) -> Path:
    """y = x + dequantize(w): a symmetric int8 weight, or uint8 with ``zero_point``."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    initializers = []
    output = "r"
    if zero_point is not None:
        dtype = np.uint8 if zero_point else np.int8
        initializers = [
            numpy_helper.from_array(np.arange(8, dtype=dtype).reshape(2, 4), "w"),
            numpy_helper.from_array(np.array(0.5, np.float32), "s"),
            numpy_helper.from_array(np.array(zero_point, dtype), "z"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name="weight_dq"),
            helper.make_node("Add", ["r", "wf"], ["y"], name="add"),
        ]
        output = "y"
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 4])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_static_lint_exit_codes(no_tensorrt, tmp_path: Path, capsys) -> None:
    clean = _save(tmp_path / "clean.onnx", None)
    asymmetric = _save(tmp_path / "asym.onnx", 3)
    assert main(["lint", "--target", "tensorrt", str(clean)]) == 0
    text = capsys.readouterr().out
    assert "accepted by static rule table" in text and "GRAPHOPT_TENSORRT=none" in text
    assert "dynamic dims (batch)" in text  # a warning, not an error
    assert main(["lint", str(asymmetric)]) == 1
    text = capsys.readouterr().out
    assert "node 'weight_dq' (DequantizeLinear)" in text and "--requantize symmetric" in text
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert main(["lint", str(tmp_path / "bad.onnx")]) == 2


def test_lint_json(no_tensorrt, tmp_path: Path, capsys) -> None:
    assert main(["lint", "--json", str(_save(tmp_path / "a.onnx", 3))]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["checker"] == "static rule table" and data["errors"] == 1
    (error,) = [f for f in data["findings"] if f["severity"] == "error"]
    assert error["node"] == "weight_dq" and "requantize" in error["fix"]


def test_lint_with_the_real_parser(trt, tmp_path: Path, capsys) -> None:
    assert main(["lint", str(_save(tmp_path / "a.onnx", 3))]) == 1
    text = capsys.readouterr().out
    assert "parser: 1 error(s)" in text and "uint8" in text.lower()
    assert main(["lint", str(_save(tmp_path / "b.onnx", 0))]) == 0


def test_engine_without_tensorrt_writes_the_onnx_and_exits_4(
    no_tensorrt, tmp_path: Path, capsys
) -> None:
    source = _save(tmp_path / "m.onnx", 0)
    out, plan = tmp_path / "out.onnx", tmp_path / "m.plan"
    code = main(
        ["optimize", str(source), "-o", str(out), "--target", "tensorrt", "--engine", str(plan)]
    )
    assert code == 4
    assert out.exists() and not plan.exists()
    assert "engine was not built: no TensorRT Python module imports" in capsys.readouterr().err


def test_engine_flags_need_engine(tmp_path: Path, capsys) -> None:
    source = _save(tmp_path / "m.onnx", None)
    code = main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--builder-level", "2"])
    assert code == 2
    assert "--builder-level only apply with --engine" in capsys.readouterr().err


def test_target_tensorrt_int8_is_symmetric(tmp_path: Path) -> None:
    source, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    args = ["optimize", str(source), "-o", str(out), "--target", "tensorrt"]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    assert main([*args, "--quantize", "int8", "--calib", "random"]) == 0
    model = onnx.load(out)
    zero_points = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if any(
            n.op_type.endswith("QuantizeLinear") and n.input[2:3] == [t.name]
            for n in model.graph.node
        )
    ]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
