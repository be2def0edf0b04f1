"""``--target tensorrt``: the forms its lossy passes emit, and the forms and targets refused
before any work (no TensorRT needed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    weights = [
        numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, "w1"),
        numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) * 0.1, "w2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_int4_weight_for_tensorrt_computes_in_float16(tmp_path) -> None:
    source = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), source)
    out = tmp_path / "q.onnx"
    result = optimize(source, out, OptimizeOptions(target="tensorrt", quantize="int4-weight"))
    record = result.report.details["quantize"]
    assert any("activations float16" in note for note in record.notes)
    assert record.fidelity  # the float16 change is inside what fidelity measures
    model = onnx.load(out)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # no MatMulNBits
    inits = {t.name: t for t in model.graph.initializer}
    dequantized = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantized) == 2
    assert {inits[n.input[0]].data_type for n in dequantized} == {TensorProto.INT4}
    # The scales are float16, so the weights and the MatMuls they feed are float16; the
    # graph's input and output stay float32 (Casts at the boundary).
    assert {inits[n.input[1]].data_type for n in dequantized} == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert sum(n.op_type == "Cast" for n in model.graph.node) >= 2


def test_int4_for_tensorrt_keeps_a_weight_without_whole_blocks_in_float(tmp_path) -> None:
    # TensorRT's parser rejects a blockwise DequantizeLinear whose K is not whole blocks.
    proto = _mlp()
    rng = np.random.default_rng(5)
    odd = rng.standard_normal((40, 32)).astype(np.float32)
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(odd, "w2"))
    proto.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(rng.standard_normal((64, 40)).astype(np.float32), "w1")
    )
    source = tmp_path / "odd.onnx"
    onnx.save(proto, source)
    options = OptimizeOptions(target="tensorrt", quantize="int4-weight", block_size=32)
    result = optimize(source, tmp_path / "q.onnx", options)
    kept = {(layer.precision, layer.reason) for layer in result.report.details["quantize"].layers}
    assert ("float", "K 40 not a multiple of block 32 (TensorRT)") in kept
    model = onnx.load(tmp_path / "q.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 1


def test_an_ort_targeted_input_is_warned_about_not_rewritten_silently(tmp_path) -> None:
    """--target tensorrt on a model quantized for ORT (MatMulNBits) wrote what TensorRT's
    parser rejects with no word; the rule table's verdict is now in the report, and a clean
    TensorRT-form output carries no such warning."""
    source = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), source)
    for_ort = tmp_path / "ort.onnx"
    optimize(source, for_ort, OptimizeOptions(target="ort", quantize="int4-weight"))
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(for_ort).graph.node)
    result = optimize(for_ort, tmp_path / "trt.onnx", OptimizeOptions(target="tensorrt"))
    warnings = [n for n in result.report.notes if "TensorRT's parser would reject" in n]
    assert len(warnings) == 1 and "MatMulNBits" in warnings[0]
    clean = optimize(source, None, OptimizeOptions(target="tensorrt", quantize="int4-weight"))
    assert not [n for n in clean.report.notes if "would reject" in n]


def test_int4_asymmetric_is_refused_for_tensorrt_before_any_work(tmp_path, capsys) -> None:
    # graphopt wrote UINT4 weights that TensorRT's parser then rejected ("Failed to import
    # initializer"), with a fix that did not apply.
    source = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), source)
    out = tmp_path / "q.onnx"
    args = ["optimize", str(source), "-o", str(out), "--target", "tensorrt"]
    args += ["--quantize", "int4-weight", "--int4-asymmetric", "true"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--int4-asymmetric true --target tensorrt" in err and "\n" not in err, err
    assert not out.exists()
    assert main([*args[:-1], "false"]) == 0  # symmetric: the default, taken


def test_an_engine_for_target_ort_is_refused_before_any_work(no_tensorrt, tmp_path, capsys) -> None:
    # ORT's contrib ops reached TensorRT's parser after the passes, with a misleading reason.
    source = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), source)
    out, plan = tmp_path / "o.onnx", tmp_path / "e.plan"
    args = ["optimize", str(source), "-o", str(out), "--no-verify", "--engine", str(plan)]
    assert main([*args, "--target", "ort"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--target ort writes ONNX Runtime's com.microsoft ops" in err and "\n" not in err
    assert not out.exists()
    # Portable output is standard ONNX: built (here: no module, so written and exit 4).
    assert main([*args, "--target", "portable"]) == 4
    assert "engine was not built: no TensorRT Python module" in capsys.readouterr().err
    assert out.exists()
