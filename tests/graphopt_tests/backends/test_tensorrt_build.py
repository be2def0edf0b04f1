"""``--engine``: what the build refuses is refused before the passes (nothing written); a
parser or builder failure after them still prints the report, exits non-zero, and with
``--in-place`` leaves the input as it was; 2:4 weights behind DequantizeLinear get
SPARSE_WEIGHTS; float64 I/O bound as float32 is reported.

The checks before the build run with TensorRT forced absent; the builds are skipped, saying
why, without tensorrt_rtx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.api import OptimizeOptions, optimize
from graphopt.backends.tensorrt.build import EngineBuildError
from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.backends.tensorrt.precision import graph_precisions
from graphopt.cli import main
from graphopt.errors import CheckFailedError
from graphopt_tests.backends.trt_models import line_file

OPSET = [helper.make_opsetid("", 17)]


def _conv_file(path: Path) -> Path:
    """Conv (4x3x3x3, pads 1) -> Relu on x [N, 3, 8, 8]."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=OPSET), path)
    return path


def _one_line_error(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and "internal error" not in err, err
    return captured.out, err


def test_shapes_that_do_not_fit_and_fp8_for_old_gpus_fail_before_in_place_replaces(
    no_tensorrt, tmp_path: Path, capsys
) -> None:
    # The input was replaced by its int8 Q/DQ result, then --shapes was refused.
    source = _conv_file(tmp_path / "ip.onnx")
    before = source.read_bytes()
    args = ["optimize", str(source), "--in-place", "--target", "tensorrt"]
    args += ["--engine", str(tmp_path / "ip.plan")]
    int8 = ["--quantize", "int8", "--calib", "random"]
    fp8 = ["--quantize", "fp8", "--opset", "19", "--calib", "random"]
    cases = [
        ([*int8, "--shapes", "x:min=1x3x8,opt=1x3x8,max=2x3x8"], "3 dims given, but input 'x'"),
        ([*int8, "--shapes", "x:min=1x4x8x8,opt=1x4x8x8,max=2x4x8x8"], "axis 1 of input 'x' is"),
        ([*fp8, "--compute-capability", "8.6"], "FP8 tensors, which need compute capability"),
    ]
    for extra, reason in cases:
        given = [*args, *extra]
        assert main(given) == 2, extra
        _, err = _one_line_error(capsys)
        assert reason in err, err
        assert source.read_bytes() == before


def test_a_builder_failure_prints_the_report_and_exits_1(trt, tmp_path: Path, capsys) -> None:
    source = line_file(tmp_path / "line.onnx")
    out = tmp_path / "o.onnx"
    args = ["optimize", str(source), "-o", str(out), "--no-verify", "--target", "tensorrt"]
    assert main([*args, "--engine", str(tmp_path / "l.plan")]) == 1
    printed, err = _one_line_error(capsys)
    assert "nodes 2 -> 2" in printed and f"wrote {out}" in printed  # the report, then the write
    assert err.startswith("graphopt: error: the engine was not built: TensorRT's builder failed")
    assert "profile was derived, not given" in err
    assert out.exists() and not (tmp_path / "l.plan").exists()


def test_in_place_replaces_the_input_only_once_the_engine_builds(
    trt, tmp_path: Path, capsys
) -> None:
    source = line_file(tmp_path / "line.onnx")
    before = source.read_bytes()
    args = ["optimize", str(source), "--in-place", "--no-verify", "--target", "tensorrt"]
    args += ["--engine", str(tmp_path / "l.plan")]
    assert main(args) == 1
    printed, err = _one_line_error(capsys)
    assert "left as it was" in printed and "wrote" not in printed
    assert "TensorRT's builder failed" in err
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line.onnx"]  # no trial copy left
    # Shapes it takes: built, and the input replaced (graphopt's record stamped in it).
    good = "x:min=1x3x48x160,opt=1x3x48x320,max=2x3x48x640"
    assert main([*args, "--shapes", good]) == 0, capsys.readouterr().err
    assert source.read_bytes() != before and (tmp_path / "l.plan").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.plan", "line.onnx"]


def test_in_place_without_tensorrt_is_written_as_documented(
    no_tensorrt, tmp_path: Path, capsys
) -> None:
    source = _conv_file(tmp_path / "c.onnx")
    before = source.read_bytes()
    args = ["optimize", str(source), "--in-place", "--target", "tensorrt"]
    assert main([*args, "--engine", str(tmp_path / "c.plan")]) == 4
    assert "no TensorRT Python module" in capsys.readouterr().err
    assert source.read_bytes() != before


def test_a_parser_rejection_carries_the_result_for_the_report(trt, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Unknown", ["x"], ["y"], domain="custom.ops", name="odd")],
        "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    imports = [*OPSET, helper.make_opsetid("custom.ops", 1)]
    source = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=imports), source)
    options = OptimizeOptions(verify=False, engine=EngineOptions(tmp_path / "o.plan"))
    with pytest.raises(EngineBuildError) as caught:
        optimize(source, tmp_path / "o.onnx", options)
    assert isinstance(caught.value, CheckFailedError) and caught.value.exit_code == 1
    assert "TensorRT's parser rejected the model" in str(caught.value)
    result = caught.value.result
    assert result.output_path == tmp_path / "o.onnx" and result.output_path.exists()
    assert result.report.nodes_after == 1


def _dequantized_conv(sparse: bool, block: bool) -> onnx.ModelProto:
    """Conv whose int8 weight [64, 64, 1, 1] (per-channel zero points 0) or MatMul whose
    blockwise int4 weight [64, 64] sits behind DequantizeLinear, 2:4 along the reduction axis
    when ``sparse``."""
    rng = np.random.default_rng(0)
    if block:
        stored = rng.integers(-7, 8, (64, 64)).astype(np.int8)
        if sparse:
            stored.reshape(16, 4, 64)[:, :2, :] = 0  # MatMul [K, N]: along K
        weight = helper.make_tensor("w", TensorProto.INT4, stored.shape, stored.ravel())
        scale = numpy_helper.from_array(np.ones((2, 64), np.float32), "s")
        dq = helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0, block_size=32)
        op = helper.make_node("MatMul", ["x", "wf"], ["y"])
        shapes = ([1, 64], [1, 64])
        opset = 21
        extra = []
    else:
        stored = rng.integers(1, 127, (64, 64, 1, 1)).astype(np.int8)
        if sparse:
            stored.reshape(64, 16, 4)[:, :, :2] = 0  # Conv [O, I, kh, kw]: along I
        weight = numpy_helper.from_array(stored, "w")
        scale = numpy_helper.from_array(np.ones(64, np.float32), "s")
        zero = numpy_helper.from_array(np.zeros(64, np.int8), "z")
        dq = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0)
        op = helper.make_node("Conv", ["x", "wf"], ["y"])
        shapes = ([1, 64, 4, 4], [1, 64, 4, 4])
        opset = 17
        extra = [zero]
    graph = helper.make_graph(
        [dq, op],
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])],
        [weight, scale, *extra],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("block", [False, True])
def test_two_four_weights_behind_dequantize_linear_are_found(block: bool) -> None:
    # resnet18 --sparsity 2:4 --quantize int8: 19 int8 2:4 conv weights, no SPARSE_WEIGHTS.
    found = graph_precisions(_dequantized_conv(sparse=True, block=block))
    assert found.sparse_weights == ["w"]
    dense = graph_precisions(_dequantized_conv(sparse=False, block=block))
    assert dense.sparse_weights == [] and dense.dense_weights == 1


def test_a_quantized_two_four_engine_gets_sparse_weights(trt, tmp_path: Path) -> None:
    source = tmp_path / "dq.onnx"
    onnx.save(_dequantized_conv(sparse=True, block=False), source)
    options = OptimizeOptions(verify=False, engine=EngineOptions(tmp_path / "dq.plan"))
    result = optimize(source, tmp_path / "o.onnx", options)
    assert result.engine is not None and result.engine.built
    assert "SPARSE_WEIGHTS (1 2:4 weights)" in result.engine.settings


def test_float64_inputs_and_outputs_are_reported_as_bound_in_float32(
    trt, tmp_path: Path, capsys
) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])],
    )
    source = tmp_path / "d.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSET), source)
    args = ["optimize", str(source), "-o", str(tmp_path / "o.onnx")]
    assert main([*args, "--engine", str(tmp_path / "d.plan")]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    for kind in ("input x", "output y"):
        assert f"precision change: {kind}: float64 in the ONNX, float32 in the engine" in printed
