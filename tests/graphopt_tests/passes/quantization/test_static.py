"""Static INT8 end to end: a small CNN quantizes, ORT fuses it into integer kernels, the
outputs stay close to float; refusals and determinism; the digits CNN's accuracy."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.errors import UserInputError
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.passes.quantization.ranges import SYMMETRIC_MIN_SCALE
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, run_pass, tensor_info

RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32) * np.float32(0.3)


def small_cnn(opset: int = 17):
    """Conv → Relu → MaxPool → Conv → Add (residual) → Relu → Flatten → Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    rng = np.random.default_rng(1)
    inits = {
        "w1": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
        "b1": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.15).astype(np.float32),
        "b2": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w3": (rng.standard_normal((10, 128)) * 0.1).astype(np.float32),
        "b3": np.zeros(10, np.float32),
    }
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
        opset=opset,
    )


def _data(count: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def _calib(tmp_path: Path, count: int = 48) -> str:
    path = tmp_path / "calib.npz"
    np.savez(path, x=_data(count))
    return str(path)


def _quantize(model, tmp_path, **options):
    context = PassContext(target=options.pop("target", "portable"))
    options.setdefault("calib", _calib(tmp_path))
    result, _ = run_pass(model, QuantizePass, context, mode="int8", **options)
    return result, context.details["quantize"]


def _run(model, x: np.ndarray, optimize: bool, optimized_path: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    options.log_severity_level = 3
    data = io.to_proto(model).SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(
        np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    )


@pytest.mark.parametrize(
    ("target", "activation_type", "fused"),
    # Portable s8 is symmetric (zero point 0, what TensorRT reads): ORT's x86 kernels do not
    # fuse it (its Relu cannot fold into a zero point in the middle), so no fusion check.
    [("ort", "u8", {"QLinearConv": 2, "QLinearAdd": 1, "QGemm": 1}), ("portable", "s8", None)],
)
def test_small_cnn_quantizes_fuses_and_stays_close(tmp_path, target, activation_type, fused):
    model = small_cnn()
    quantized, record = _quantize(model, tmp_path, target=target)
    assert record.settings["activation_type"] == activation_type
    ops = collections.Counter(n.op_type for n in quantized.graph)
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 5
    assert {n.op_type for n in quantized.graph} >= {"Conv", "MaxPool", "Add", "Gemm"}
    x = _data(16, seed=3)  # not the calibration samples
    reference = _run(model, x, optimize=False)
    optimized = tmp_path / "optimized.onnx"
    for optimize in (False, True):
        got = _run(quantized, x, optimize, optimized if optimize else None)
        assert _cosine(reference, got) > 0.99, optimize
    if fused is not None:
        # ORT fused the Q/DQ into integer kernels, end to end: no float Conv is left.
        fused_ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
        for op, count in fused.items():
            assert fused_ops[op] == count, fused_ops
        assert fused_ops["Conv"] == 0 and fused_ops["MaxPool"] == 0
    # The record: every node has a precision, each float one a reason.
    by_node = {layer.node: layer for layer in record.layers}
    assert set(by_node) == {n.name for n in model.graph}
    assert by_node["conv1"].precision == by_node["add"].precision == "int8"
    assert by_node["fc"].precision == by_node["pool"].precision == "int8"
    assert all(layer.reason for layer in record.layers)
    assert {c.tensor for c in record.type_changes} == {"w1", "w2", "w3"}
    assert record.weight_bytes_after < record.weight_bytes_before
    assert set(record.fidelity) == {
        "calibration",
        "calibration, ORT optimized",
        "held-out",
        "held-out, ORT optimized",
    }
    assert all(f.mean_cosine > 0.99 for fs in record.fidelity.values() for f in fs)


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_a_bias_too_large_for_its_input_scale_still_fits_int32(tmp_path, quant_format):
    # An input ~1e-12 on the calibration data (a dead branch) next to biases ~1: the int32
    # bias round(b / (x_scale * w_scale)) would wrap. ORT's fused run then read garbage while
    # the unfused run was right (seen on random-weight GoogLeNet's classifier).
    model = small_cnn()
    x = _data(48) * np.float32(1e-12)
    calib = tmp_path / "tiny.npz"
    np.savez(calib, x=x)
    for name in ("b1", "b2", "b3"):
        model.graph.initializers[name].const_value = ir.tensor(
            np.full(model.graph.initializers[name].shape[0], 1.5, np.float32)
        )
    quantized, record = _quantize(
        model, tmp_path, target="ort", calib=str(calib), quant_format=quant_format
    )
    int32_constants = [
        value.const_value.numpy()
        for node in quantized.graph
        for value in node.inputs
        if value is not None
        and value.const_value is not None
        and value.const_value.dtype == ir.DataType.INT32
    ]
    assert quant_format == "qdq" or int32_constants  # QOperator stores the int32 biases
    assert all(np.abs(b).max() <= 2**30 for b in int32_constants)
    sample = x[:8]
    reference = _run(model, sample, optimize=False)
    for optimize in (False, True):
        got = _run(quantized, sample, optimize)
        error = np.abs(got - reference).max() / np.abs(reference).max()
        assert error < 0.02, (optimize, error)
    assert any("int32 bias fits" in note and "conv1" in note for note in record.notes)


def test_a_clip_before_a_tiny_symmetric_scale_survives_ort_optimizations(tmp_path):
    # ORT drops a Clip before a QuantizeLinear whose domain it covers, comparing with an
    # absolute epsilon: below ~1e-9 a symmetric scale's negative half looked empty and the
    # Clip went (random-weight MobileNetV2, portable s8: cosine 0.55 with ORT's optimizations,
    # 0.9997 without). A floor on symmetric scales keeps the comparison honest.
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        {
            "w1": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
            "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32),
            "lo": np.array(0.0, np.float32),
            "hi": np.array(6.0, np.float32),
        },
    )
    # Activations ~5e-8: a symmetric scale of ~4e-10, under ORT's threshold of ~9e-10.
    x = _data(48) * np.float32(1e-8)
    calib = tmp_path / "tiny.npz"
    np.savez(calib, x=x)
    quantized, _ = _quantize(model, tmp_path, calib=str(calib))
    scales = {
        node.inputs[0].producer().op_type if node.inputs[0].producer() else "input": float(
            node.inputs[1].const_value.numpy()
        )
        for node in quantized.graph
        if node.op_type == "QuantizeLinear"
    }
    # Floored where a Clip feeds the QuantizeLinear only: elsewhere it would only cost levels.
    assert scales["Clip"] == SYMMETRIC_MIN_SCALE and scales["input"] < SYMMETRIC_MIN_SCALE
    sample = x[:8]
    reference = _run(model, sample, optimize=False)
    optimized = _run(quantized, sample, optimize=True)
    # As deployed, ORT computes what the Q/DQ graph says (it read negative values before)...
    assert _cosine(_run(quantized, sample, optimize=False), optimized) > 0.999
    # ...at the cost of fewer levels for a range this small.
    assert _cosine(reference, optimized) > 0.95


def test_weights_are_int8_per_channel_with_axis(tmp_path):
    quantized, _ = _quantize(small_cnn(), tmp_path)
    weights = {
        n.inputs[0].name: n
        for n in quantized.graph
        if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
    }
    assert len(weights) == 3
    for node in weights.values():
        values = node.inputs[0].const_value.numpy()
        assert values.dtype == np.int8 and np.abs(values.astype(int)).max() == 127
        assert node.attributes["axis"].value == 0  # output channels (Gemm: transB=1)
        scales = node.inputs[1].const_value.numpy()
        assert scales.shape == (values.shape[0],)  # one scale per channel
        assert not node.inputs[2].const_value.numpy().any()  # symmetric: zero points 0


@pytest.mark.parametrize(
    ("target", "dtype"), [("ort", ir.DataType.UINT8), ("portable", ir.DataType.INT8)]
)
def test_qoperator_form_runs_integer_operators_on_int8_tensors(tmp_path, target, dtype):
    model = small_cnn()
    quantized, record = _quantize(model, tmp_path, target=target, quant_format="qoperator")
    ops = collections.Counter(n.op_type for n in quantized.graph)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["Conv"] == 0
    # One Q at the input, int8 up to the Gemm, left in Q/DQ form (ORT fuses it into QGemm
    # when its output is quantized too, as for --target ort).
    quantized_output = target == "ort"
    assert ops["QuantizeLinear"] == 1 + quantized_output
    assert ops["DequantizeLinear"] == 2 + quantized_output
    pool = next(n for n in quantized.graph if n.op_type == "MaxPool")
    assert pool.inputs[0].dtype == dtype
    conv = next(n for n in quantized.graph if n.op_type == "QLinearConv")
    assert conv.inputs[8].const_value.numpy().dtype == np.int32  # bias requantized
    changed = {c.tensor: c.after for c in record.type_changes}
    assert changed["p1"] == ("uint8" if dtype == ir.DataType.UINT8 else "int8")
    x = _data(16, seed=3)
    reference = _run(model, x, optimize=False)
    for optimize in (False, True):
        assert _cosine(reference, _run(quantized, x, optimize)) > 0.99


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_method_gives_a_close_model(tmp_path, method):
    quantized, record = _quantize(small_cnn(), tmp_path, calib_method=method)
    x = _data(16, seed=3)
    assert _cosine(_run(small_cnn(), x, False), _run(quantized, x, True)) > 0.99
    assert f"method {method}" in " ".join(record.notes)


def test_build_quantized_keeps_the_given_layers_float(tmp_path):
    from graphopt.passes.calibration.samples import load_calibration
    from graphopt.passes.quantization.settings import QuantSettings
    from graphopt.passes.quantization.static import build_quantized, make_plan

    model = small_cnn()
    settings = QuantSettings("int8", target="ort", activation_type="u8", bias_correction=True)
    plan = make_plan(model, settings, load_calibration(_calib(tmp_path), model))
    before = io.to_proto(model).SerializeToString()
    x = _data(8, seed=3)
    reference = _run(model, x, optimize=False)
    for kept in (frozenset(), frozenset({"conv2"}), frozenset({"conv1", "conv2"})):
        quantized = build_quantized(model, plan, kept)
        convs = {n.name: n for n in quantized.graph if n.op_type == "Conv"}
        for name in ("conv1", "conv2"):
            weight = convs[name].inputs[1]
            assert (weight.const_value is not None) == (name in kept)  # float or DQ'd
        assert _cosine(reference, _run(quantized, x, optimize=True)) > 0.99
    assert io.to_proto(model).SerializeToString() == before  # the model itself is untouched


def test_mixed_precision_target_walks_the_curve(tmp_path):
    # All int8 misses 0.03 (0.036); two layers back in float meet it (0.019).
    _, record = _quantize(small_cnn(), tmp_path, target="ort", max_error=0.03)
    assert [p.kept_float for p in record.curve] == [0, 1, 2] and record.quantized
    assert any("mixed precision: target max rel error <= 0.03 met" in n for n in record.notes)
    assert not record.target_missed


def test_a_target_met_only_with_every_layer_float_is_refused(tmp_path):
    """Before, the search kept every layer float, and the float model came back as a copy
    ("0 layers quantized", exit 0). Now: the unchanged-model refusal, naming the target and
    the nearest miss."""
    with pytest.raises(UserInputError) as caught:
        _quantize(small_cnn(), tmp_path, target="ort", min_cosine=0.9999999)
    message = str(caught.value)
    assert "nothing to quantize: mixed precision keeps every layer float" in message
    assert "target mean cosine >= 0.9999999 met with all 3 layers in float" in message
    assert "with a layer quantized that the search tried met it (the closest: cosine" in message
    assert message.endswith("the model would come back unchanged")


def test_without_calibration_data_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="--calib"):
        _quantize(small_cnn(), tmp_path, calib="")


def test_an_already_quantized_model_is_refused(tmp_path):
    quantized, _ = _quantize(small_cnn(), tmp_path)
    with pytest.raises(UserInputError, match="already quantized"):
        _quantize(quantized, tmp_path)


def test_a_model_with_any_quantized_op_is_refused(tmp_path):
    """A QLinear* op beyond Conv/MatMul/Add (here com.microsoft's QLinearSigmoid on a side
    branch) also marks the model as quantized: the same list the analysis uses."""
    proto = io.to_proto(small_cnn())
    graph = proto.graph
    graph.node.append(
        helper.make_node(
            "QLinearSigmoid",
            ["q", "q_scale", "q_zero", "q_scale", "q_zero"],
            ["qs"],
            name="side",
            domain="com.microsoft",
        )
    )
    graph.output.append(helper.make_tensor_value_info("qs", TensorProto.UINT8, [4]))
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.arange(4, dtype=np.uint8), "q"),
            onnx.numpy_helper.from_array(np.array(0.1, np.float32), "q_scale"),
            onnx.numpy_helper.from_array(np.array(128, np.uint8), "q_zero"),
        ]
    )
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UserInputError, match=r"already quantized.*QLinearSigmoid"):
        _quantize(ir.serde.deserialize_model(proto), tmp_path)


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
@pytest.mark.parametrize("mode", ["int8-dynamic", "int4-weight", "fp16", "bf16"])
def test_the_other_modes_refuse_a_model_with_no_float_weight_left(tmp_path, mode, quant_format):
    """Every Conv/Gemm reads an int8 weight: the mode would hand the model back unchanged."""
    quantized, _ = _quantize(small_cnn(), tmp_path, target="ort", quant_format=quant_format)
    context = PassContext(target="ort")
    with pytest.raises(UserInputError, match="already quantized"):
        run_pass(quantized, QuantizePass, context, mode=mode)


def test_a_float_matmul_left_beside_int8_convs_is_still_quantized(tmp_path):
    """Partly quantized (int8 convs, the Gemm excluded and kept float): int8-dynamic takes
    the float Gemm; no refusal."""
    quantized, _ = _quantize(small_cnn(), tmp_path, target="ort", exclude="Gemm")
    context = PassContext(target="ort")
    run_pass(quantized, QuantizePass, context, mode="int8-dynamic")
    record = context.details["quantize"]
    assert [layer.node for layer in record.layers if layer.precision == "int8"] == ["fc"]


def test_old_opset_is_raised_for_per_channel_scales(tmp_path):
    quantized, record = _quantize(small_cnn(opset=11), tmp_path)
    assert quantized.opset_imports[""] == 13
    assert any("opset 11 -> 13" in note for note in record.notes)


def test_same_input_gives_byte_identical_output(tmp_path):
    first, _ = _quantize(small_cnn(), tmp_path)
    second, _ = _quantize(small_cnn(), tmp_path)
    assert io.to_proto(first).SerializeToString() == io.to_proto(second).SerializeToString()


def test_bias_correction_removes_the_mean_shift_of_weight_rounding(tmp_path):
    model = small_cnn()
    x = _data(64, seed=5)
    shifts = {}
    # Round-to-nearest weights: their rounding shift is what bias correction removes (GPTQ's
    # error feedback, the default with a file, leaves little of it).
    for corrected in (False, True):
        quantized, record = _quantize(
            model, tmp_path, bias_correction=corrected, int8_weights="rtn"
        )
        diff = _run(quantized, x, False) - _run(model, x, False)
        shifts[corrected] = float(np.abs(diff.mean(axis=0)).mean())
    assert "bias correction" in " ".join(record.notes)
    assert shifts[True] < shifts[False]


def test_batchnorm_is_folded_before_the_q_dq_are_placed(tmp_path):
    from graphopt import api

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], name="bn"
        ),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    rng = np.random.default_rng(4)
    inits = {
        "w1": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
        "scale": rng.uniform(0.5, 2.0, 8).astype(np.float32),
        "shift": rng.standard_normal(8).astype(np.float32),
        "mean": rng.standard_normal(8).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, 8).astype(np.float32),
        "w2": (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32),
    }
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    source, out = tmp_path / "bn.onnx", tmp_path / "int8.onnx"
    io.save(model, source)
    options = api.OptimizeOptions(quantize="int8", calib=_calib(tmp_path), target="ort")
    result = api.optimize(source, out, options)
    record = result.report.details["quantize"]
    assert "BatchNormalization" not in {layer.op_type for layer in record.layers}
    assert all(layer.precision == "int8" for layer in record.layers)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(out).graph.node}


def _digits_accuracy(path) -> float:
    import onnxruntime as ort

    from graphopt.models import digits

    x, y = digits.data("test")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    return digits.accuracy(logits, y)


@pytest.mark.torch
def test_digits_cnn_loses_at_most_half_a_point(tmp_path):
    from graphopt_tests.models.cases import require

    require("digits")
    from graphopt import api, models
    from graphopt.models import digits

    source = models.get("digits")
    calib = digits.write_calib_npz(tmp_path / "calib.npz", "calib")
    out = tmp_path / "int8.onnx"
    api.optimize(source, out, api.OptimizeOptions(quantize="int8", calib=str(calib)))
    original, quantized = _digits_accuracy(source), _digits_accuracy(out)
    print(f"digits accuracy: float {original:.4f}, int8 {quantized:.4f}")
    assert original >= 0.95
    assert quantized >= original - 0.005
