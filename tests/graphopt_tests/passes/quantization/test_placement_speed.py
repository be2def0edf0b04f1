"""Placement for ONNX Runtime's speed: a SiLU on a quantized tensor is emitted as one
QuickGelu (ORT's QDQ pass otherwise splits the pair and its own fusion no longer matches);
a squeeze-excitation gate (Sigmoid of another tensor) and portable models are left alone."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.passes.quantization.placement import place
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, run_pass, tensor_info


def _w(*shape: int) -> np.ndarray:
    # Seeded by shape: building a model twice gives the same weights.
    rng = np.random.default_rng(list(shape))
    return rng.standard_normal(shape).astype(np.float32) * np.float32(0.3)


def silu_cnn():
    """x → Conv a → SiLU (Sigmoid, Mul) → GlobalAveragePool → Conv gate → Sigmoid →
    Mul(SiLU, gate) (a squeeze-excitation gate, not a SiLU) → Conv c → y."""
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["a_sig"], name="silu_sigmoid"),
        helper.make_node("Mul", ["a", "a_sig"], ["a_silu"], name="silu_mul"),
        helper.make_node("GlobalAveragePool", ["a_silu"], ["pooled"], name="pool"),
        helper.make_node("Conv", ["pooled", "wg", "bg"], ["g"], name="conv_gate"),
        helper.make_node("Sigmoid", ["g"], ["gate"], name="gate_sigmoid"),
        helper.make_node("Mul", ["a_silu", "gate"], ["scaled"], name="gate_mul"),
        helper.make_node("Conv", ["scaled", "wc", "bc"], ["y"], name="conv_c"),
    ]
    inits = {
        "wa": _w(8, 3, 3, 3),
        "ba": _w(8),
        "wg": _w(8, 8, 1, 1),
        "bg": _w(8),
        "wc": _w(4, 8, 1, 1),
        "bc": _w(4),
    }
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )


def test_ort_placement_marks_the_silu_and_not_the_gate():
    placement = place(silu_cnn(), QuantSettings("int8").excluded, target="ort")
    assert placement.silu == {"silu_mul": "silu_sigmoid"}
    assert "QuickGelu" in placement.floats["silu_sigmoid"]
    assert "QuickGelu" in placement.floats["silu_mul"]
    # The gate multiplies two different tensors: an ordinary float Mul.
    assert "QuickGelu" not in placement.floats["gate_mul"]
    assert "a" in placement.tensors  # the SiLU reads a quantized tensor


def test_target_defaults_follow_outputs_too_and_portable_is_unchanged():
    excluded = QuantSettings("int8").excluded
    assert place(silu_cnn(), excluded, outputs_too=True).silu == {"silu_mul": "silu_sigmoid"}
    assert place(silu_cnn(), excluded).silu == {}
    assert place(silu_cnn(), excluded, outputs_too=True, target="portable").silu == {}


def test_a_silu_on_a_float_tensor_is_left_to_ort():
    # Conv a excluded: its output stays float, ORT fuses the pair itself.
    placement = place(
        silu_cnn(), QuantSettings("int8").excluded, frozenset({"conv_a"}), target="ort"
    )
    assert "a" not in placement.tensors
    assert placement.silu == {}


def _data(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def _run(model, x: np.ndarray, optimized_path: Path | None = None) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    else:
        options.optimized_model_filepath = str(optimized_path)
    data = io.to_proto(model).SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(
        np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    )


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_ort_emits_quick_gelu_that_ort_keeps_next_to_its_integer_convs(tmp_path, quant_format):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_data(32, seed=1))
    model = silu_cnn()
    context = PassContext(target="ort")
    quantized, _ = run_pass(
        model, QuantizePass, context, mode="int8", calib=str(calib), quant_format=quant_format
    )
    record = context.details["quantize"]
    ops = collections.Counter((n.domain, n.op_type) for n in quantized.graph)
    assert ops[("com.microsoft", "QuickGelu")] == 1
    assert ops[("", "Sigmoid")] == 1 and ops[("", "Mul")] == 1  # the gate's
    assert quantized.opset_imports["com.microsoft"] == 1
    # The product keeps its name (the record and later passes refer to it).
    gelu = next(n for n in quantized.graph if n.op_type == "QuickGelu")
    assert gelu.outputs[0].name == "a_silu"
    assert gelu.inputs[0].producer().op_type == "DequantizeLinear"
    # Same function: as close to float as the quantization allows, optimized or not.
    x = _data(16, seed=3)
    reference = _run(model, x)
    optimized = tmp_path / "optimized.onnx"
    assert _cosine(reference, _run(quantized, x)) > 0.99
    assert _cosine(reference, _run(quantized, x, optimized)) > 0.99
    fused = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert fused["QuickGelu"] == 1 and fused["QLinearConv"] == 3 and fused["Conv"] == 0
    layers = {layer.node: layer for layer in record.layers}
    assert layers["silu_mul"].precision == "float" and "QuickGelu" in layers["silu_mul"].reason
    again, _ = run_pass(
        silu_cnn(),
        QuantizePass,
        PassContext(target="ort"),
        mode="int8",
        calib=str(calib),
        quant_format=quant_format,
    )
    assert io.to_proto(again).SerializeToString() == io.to_proto(quantized).SerializeToString()


def test_portable_keeps_sigmoid_and_mul(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_data(32, seed=1))
    quantized, _ = run_pass(
        silu_cnn(), QuantizePass, PassContext(target="portable"), mode="int8", calib=str(calib)
    )
    ops = collections.Counter(n.op_type for n in quantized.graph)
    assert ops["QuickGelu"] == 0 and ops["Sigmoid"] == 2 and ops["Mul"] == 2
    assert all(n.domain in ("", "ai.onnx") for n in quantized.graph)


def mean_cnn(opset: int):
    """x → Conv a → Relu → ReduceMean over H, W (kept) → Conv b → y; and a channel mean of
    the Relu (axis 1: not a pooling) as a second output."""
    spatial = {"axes": [2, 3]} if opset < 18 else {}
    channel = {"axes": [1]} if opset < 18 else {}
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node(
            "ReduceMean", ["r"] + (["hw"] if opset >= 18 else []), ["m"], name="mean", **spatial
        ),
        helper.make_node("Conv", ["m", "wb", "bb"], ["y"], name="conv_b"),
        helper.make_node(
            "ReduceMean", ["r"] + (["c"] if opset >= 18 else []), ["z"], name="cmean", **channel
        ),
    ]
    inits = {"wa": _w(8, 3, 3, 3), "ba": _w(8), "wb": _w(4, 8, 1, 1), "bb": _w(4)}
    if opset >= 18:
        inits |= {"hw": np.array([-2, -1], np.int64), "c": np.array([1], np.int64)}
    # With inferred shapes, as the pipeline has them: the rule needs the input's rank.
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [
            tensor_info("y", TensorProto.FLOAT, ["N", 4, 1, 1]),
            tensor_info("z", TensorProto.FLOAT, ["N", 1, 8, 8]),
        ],
        inits,
        opset=opset,
    )
    return ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(model)))


@pytest.mark.parametrize("opset", [17, 18])
def test_ort_spatial_mean_becomes_an_int8_global_average_pool(tmp_path, opset):
    model = mean_cnn(opset)
    placement = place(model, QuantSettings("int8").excluded, target="ort")
    assert placement.global_means == {"mean"}
    assert "cmean" in placement.floats
    assert place(model, QuantSettings("int8").excluded).global_means == set()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_data(32, seed=1))
    quantized, _ = run_pass(
        model, QuantizePass, PassContext(target="ort"), mode="int8", calib=str(calib)
    )
    ops = collections.Counter(n.op_type for n in quantized.graph)
    assert ops["GlobalAveragePool"] == 1 and ops["ReduceMean"] == 1  # the channel mean
    pool = next(n for n in quantized.graph if n.op_type == "GlobalAveragePool")
    assert pool.name == "mean" and pool.outputs[0].name == "m"
    x = _data(16, seed=3)
    optimized = tmp_path / "optimized.onnx"
    reference = _run(model, x)
    assert _cosine(reference, _run(quantized, x)) > 0.99
    assert _cosine(reference, _run(quantized, x, optimized)) > 0.99
    fused = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert fused["QLinearGlobalAveragePool"] == 1 and fused["GlobalAveragePool"] == 0


def lookup_cnn():
    """x → Conv a → LeakyRelu → Conv b → Sigmoid → Mul(Sigmoid, x-mean) → y: the LeakyRelu
    sits between int8 Convs, the Sigmoid feeds only a float Mul."""
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["a"], ["l"], name="lrelu", alpha=0.1),
        helper.make_node("Conv", ["l", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["b"], ["s"], name="gate"),
        helper.make_node("Mul", ["s", "scale"], ["y"], name="scale_mul"),
    ]
    inits = {
        "wa": _w(8, 3, 3, 3),
        "ba": _w(8),
        "wb": _w(4, 8, 3, 3),
        "bb": _w(4),
        "scale": np.float32(2.0) * np.ones((1, 4, 1, 1), np.float32),
    }
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )


def test_ort_lookup_op_between_int8_convs_is_int8_and_a_float_fed_one_is_not(tmp_path):
    model = lookup_cnn()
    placement = place(model, QuantSettings("int8").excluded, target="ort")
    assert "QLinearLeakyRelu" in placement.compute["lrelu"] and "l" in placement.tensors
    assert "gate" in placement.floats and "s" not in placement.tensors
    portable = place(model, QuantSettings("int8").excluded)
    assert "lrelu" in portable.floats
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_data(32, seed=1))
    quantized, _ = run_pass(
        model, QuantizePass, PassContext(target="ort"), mode="int8", calib=str(calib)
    )
    x = _data(16, seed=3)
    optimized = tmp_path / "optimized.onnx"
    assert _cosine(_run(model, x), _run(quantized, x, optimized)) > 0.99
    fused = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert fused["QLinearLeakyRelu"] == 1 and fused["LeakyRelu"] == 0
    assert fused["QLinearSigmoid"] == 0 and fused["Sigmoid"] == 1
