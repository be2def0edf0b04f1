"""``--int8-weights gptq``: data-aware int8 weight rounding lowers each layer's output error
on calibration data below round-to-nearest (Conv, grouped Conv, MatMul, Gemm), end to end it
is deterministic, and bad values are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.editing import constant_array, name_nodes
from graphopt.errors import UserInputError
from graphopt.passes.calibration.samples import load_calibration
from graphopt.passes.quantization import int8_rounding
from graphopt.passes.quantization.qdq import quantize_weight
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, run_model, run_pass, tensor_info


def _correlated(rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Gaussian data whose channels (along ``axis``) are strongly correlated, as a layer's
    real inputs are (independent inputs leave error feedback little to exploit)."""
    channels = shape[axis]
    mix = rng.standard_normal((channels, channels)) * 0.3 + np.eye(channels)
    mix[:, : channels // 2] += rng.standard_normal((channels, 1))
    raw = np.moveaxis(rng.standard_normal(shape), axis, -1) @ mix
    return np.moveaxis(raw, -1, axis).astype(np.float32)


def conv_model() -> ir.Model:
    """Conv (3×3) → Relu → depthwise Conv (3×3, group 8) → Conv 3×3 (group 2)."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["c2", "w3"], ["y"], name="grouped", pads=[1, 1, 1, 1], group=2),
    ]
    inits = {
        "w1": (rng.standard_normal((8, 6, 3, 3)) * 0.2).astype(np.float32),
        "b1": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32),
        "w3": (rng.standard_normal((6, 4, 3, 3)) * 0.3).astype(np.float32),
    }
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 6, 10, 10])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 6, 10, 10])],
        inits,
    )


def matmul_model() -> ir.Model:
    """MatMul [K=24 → 16] → Gelu-free Relu → Gemm (transB) [16 → 5]."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"], name="matmul"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm", transB=1),
    ]
    inits = {
        "w1": (rng.standard_normal((24, 16)) * 0.2).astype(np.float32),
        "w2": (rng.standard_normal((5, 16)) * 0.3).astype(np.float32),
        "b2": np.zeros(5, np.float32),
    }
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 24])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )


def _calib_file(tmp_path: Path, model: ir.Model, count: int = 32, seed: int = 3) -> str:
    (value,) = model.graph.inputs
    dims = [count, *[int(d) for d in value.shape.dims[1:]]]
    path = tmp_path / f"calib_{seed}.npz"
    np.savez(path, x=_correlated(np.random.default_rng(seed), tuple(dims), 1))
    return str(path)


def _layer_errors(model: ir.Model, tmp_path: Path) -> dict[str, tuple[float, float]]:
    """Per weighted node: the output error ‖(W − Ŵ)·x‖² over the calibration data of its own
    input, round-to-nearest vs gptq, computed by running the layer alone in ORT."""
    name_nodes(model.graph)
    calib = load_calibration(_calib_file(tmp_path, model), model)
    weights = {}
    for node in model.graph:
        if node.op_type == "Conv":
            weights[node.name] = (1, 0)
        elif node.op_type in ("MatMul", "Gemm"):
            weights[node.name] = (1, 0 if node.op_type == "Gemm" else 1)
    rounded = int8_rounding.round_weights(model, weights, calib)
    assert len(rounded.weights) == len(weights) and rounded.skipped == 0
    inputs = {n.name: n.inputs[0].name for n in model.graph}
    from graphopt.passes.calibration.activations import observe

    (_, observed), *_ = observe(model, sorted(set(inputs.values())), calib.first(calib.count))
    errors = {}
    for node in model.graph:
        if node.name not in weights:
            continue
        weight = node.inputs[1]
        array = constant_array(weight)
        axis = weights[node.name][1]
        outputs = {}
        for method, q in (
            ("rtn", quantize_weight(array, axis)),
            ("gptq", rounded.weights[(weight.name, axis)]),
        ):
            outputs[method] = _single_layer(
                node, array, q.dequantized(), observed[inputs[node.name]]
            )
        errors[node.name] = (outputs["rtn"], outputs["gptq"])
    return errors


def _single_layer(node: ir.Node, w: np.ndarray, approx: np.ndarray, x: np.ndarray) -> float:
    """‖layer(x; W) − layer(x; Ŵ)‖² with the node's own attributes, bias left out."""
    attrs = {a.name: a.value for a in node.attributes.values()}
    results = []
    for weight in (w, approx):
        graph = helper.make_node(node.op_type, ["x", "w"], ["y"], **attrs)
        model = make_model(
            [graph],
            [tensor_info("x", TensorProto.FLOAT, list(x.shape))],
            [tensor_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(x.ndim)])],
            {"w": weight.astype(np.float32)},
        )
        results.append(run_model(model, {"x": x})[0].astype(np.float64))
    return float(np.sum((results[0] - results[1]) ** 2))


@pytest.mark.parametrize("build", [conv_model, matmul_model])
def test_gptq_lowers_each_layers_output_error_below_round_to_nearest(tmp_path, build):
    errors = _layer_errors(build(), tmp_path)
    assert errors
    for name, (rtn, gptq) in errors.items():
        assert gptq < 0.9 * rtn, (name, rtn, gptq)


def test_codes_keep_the_round_to_nearest_scales_and_range():
    rng = np.random.default_rng(5)
    x = _correlated(rng, (400, 12), 1).astype(np.float64)
    w = rng.standard_normal((12, 7))
    nearest = quantize_weight(w, 1)
    codes = int8_rounding.round_codes(w[None], (x.T @ x / len(x))[None], nearest.scale[None])[0]
    assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= 127
    approx = codes * nearest.scale.astype(np.float64)
    # Error feedback moves codes away from the nearest ones, but only by a few steps.
    assert 0 < np.abs(codes.astype(int) - nearest.values).max() <= 8
    assert np.sum((x @ (w - approx)) ** 2) < np.sum((x @ (w - nearest.dequantized())) ** 2)


def _quantize(model: ir.Model, calib: str, **options):
    context = PassContext(target="ort")
    result, _ = run_pass(model, QuantizePass, context, mode="int8", calib=calib, **options)
    return result, context.details["quantize"]


def test_end_to_end_gptq_is_the_default_with_a_file_and_deterministic(tmp_path):
    model = conv_model()
    calib = _calib_file(tmp_path, model, count=48)
    first, record = _quantize(model, calib)
    assert (
        record.settings["int8_weights"] == "gptq" and "int8_weights" in record.settings["defaulted"]
    )
    assert any(n.startswith("int8 weights: gptq on 3 layers") for n in record.notes)
    again, _ = _quantize(model, calib)
    assert io.to_proto(first).SerializeToString() == io.to_proto(again).SerializeToString()
    nearest, rtn_record = _quantize(model, calib, int8_weights="rtn")
    assert not any(n.startswith("int8 weights") for n in rtn_record.notes)
    # The emitted int8 weights are the data-aware codes (same scales, other codes); their
    # output error is checked layer by layer above (here activation rounding dominates it).
    weights = [_int8_weights(m) for m in (first, nearest)]
    assert list(weights[0]) == list(weights[1]) and len(weights[0]) == 3
    for name, (codes, scale) in weights[0].items():
        other_codes, other_scale = weights[1][name]
        assert np.array_equal(scale, other_scale) and not np.array_equal(codes, other_codes)


def _int8_weights(model: ir.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The int8 weight initializers and their scales, by name."""
    found = {}
    for name, value in sorted(model.graph.initializers.items()):
        if value.dtype == ir.DataType.INT8 and name.endswith("_quantized"):
            scale = model.graph.initializers[name.removesuffix("_quantized") + "_scale"]
            found[name] = (constant_array(value), constant_array(scale))
    return found


def test_random_calibration_defaults_to_round_to_nearest(tmp_path):
    _, record = _quantize(matmul_model(), "random")
    assert record.settings["int8_weights"] == "rtn"


def test_dynamic_int8_rounds_its_weights_too(tmp_path):
    """int8-dynamic takes the same codes (MatMul and Gemm with transB), by default with a
    file, deterministically; the emitted weights keep round-to-nearest's scales."""
    model = matmul_model()
    calib = _calib_file(tmp_path, model, count=48)

    def dynamic(**options):
        context = PassContext(target="ort")
        result, _ = run_pass(model, QuantizePass, context, mode="int8-dynamic", calib=calib,
                             **options)  # fmt: skip
        return result, context.details["quantize"]

    first, record = dynamic()
    assert record.settings["int8_weights"] == "gptq"
    assert any(n.startswith("int8 weights: gptq on 2 layers") for n in record.notes)
    again, _ = dynamic()
    assert io.to_proto(first).SerializeToString() == io.to_proto(again).SerializeToString()
    nearest, rtn_record = dynamic(int8_weights="rtn")
    assert not any(n.startswith("int8 weights") for n in rtn_record.notes)
    ours, theirs = (
        {n: constant_array(v) for n, v in sorted(m.graph.initializers.items())}
        for m in (first, nearest)
    )
    codes = [n for n in ours if n.endswith("_weight_q")]
    assert len(codes) == 2
    for name in codes:
        assert not np.array_equal(ours[name], theirs[name])
        scale = name.removesuffix("_q") + "_scale"
        assert np.array_equal(ours[scale], theirs[scale])


def test_other_modes_say_the_option_had_no_effect(tmp_path):
    model = matmul_model()
    context = PassContext(target="ort")
    calib = _calib_file(tmp_path, model)
    run_pass(model, QuantizePass, context, mode="fp16", calib=calib, int8_weights="gptq")
    assert any("--int8-weights had no effect" in n for n in context.details["quantize"].notes)


def test_bad_value_is_refused(tmp_path):
    model = matmul_model()
    message = r"int8_weights' \(--int8-weights\): expected one of rtn, gptq"
    with pytest.raises(UserInputError, match=message):
        _quantize(model, _calib_file(tmp_path, model), int8_weights="adaround")


def test_conv_patches_are_the_im2col_rows_of_the_pruning_compensation():
    from graphopt.passes.pruning.compensation import patch_rows

    x = np.random.default_rng(0).standard_normal((2, 3, 7, 9)).astype(np.float32)
    geometry = ((3, 2), (1, 0, 1, 1), (2, 1), (1, 2))
    every = int8_rounding.conv_patches(x, *geometry, 10**6, np.random.default_rng(0))
    assert np.array_equal(every, patch_rows(x, *geometry))
    some = int8_rounding.conv_patches(x, *geometry, 10, np.random.default_rng(0))
    assert some.shape == (10, every.shape[1])
    assert all(any(np.array_equal(row, other) for other in every) for row in some)


def test_cli_refuses_a_bad_value_in_one_line(tmp_path, capsys):
    from graphopt.cli import main

    model = matmul_model()
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    calib = _calib_file(tmp_path, model)
    out = tmp_path / "q.onnx"
    argv = ["optimize", str(path), "-o", str(out), "--quantize", "int8", "--calib", calib]
    try:
        code = main([*argv, "--int8-weights", "adaround"])
    except SystemExit as exc:  # argparse refuses a value outside the declared choices
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "int8-weights" in err and "Traceback" not in err
    assert not out.exists()


def test_the_note_shows_relative_errors_not_their_squares():
    """The note gave the ratio and means of the summed squared errors ‖XΔW‖²/‖XW‖² as the
    "relative" errors (6.76x lower where the relative errors differ 2.6x)."""
    rounded = int8_rounding.Rounded({("w", 1): None, ("v", 1): None})  # type: ignore[dict-item]
    squares = {"rtn": (4e-4, 1e-4), "gptq": (1e-4, 1e-4)}
    for method, (a, b) in squares.items():
        setattr(rounded, f"error_{method}", a + b)
        setattr(rounded, f"relative_{method}", float(np.sqrt(a) + np.sqrt(b)))
    note = rounded.note()
    # Relative errors 0.02 + 0.01 vs 0.01 + 0.01: 1.5x, means 1.5e-2 vs 1.0e-2.
    assert "1.50x lower" in note and "(mean 1.00e-02 vs 1.50e-02)" in note
    assert "‖ΔY‖/‖Y‖" in note


def test_round_weights_sums_square_roots_of_the_layer_errors(tmp_path, monkeypatch):
    """The relative sums are the square roots of each layer's squared ratio, summed."""
    model = matmul_model()
    name_nodes(model.graph)
    calib = load_calibration(_calib_file(tmp_path, model), model)
    weights = {"matmul": (1, 1), "gemm": (1, 0)}
    squared: list[float] = []
    real = int8_rounding.relative_error

    def spy(w, approx, h):
        squared.append(real(w, approx, h))
        return squared[-1]

    monkeypatch.setattr(int8_rounding, "relative_error", spy)
    rounded = int8_rounding.round_weights(model, weights, calib)
    rtn, gptq = squared[0::2], squared[1::2]
    assert len(rtn) == 2 and rounded.relative_rtn == pytest.approx(sum(np.sqrt(rtn)))
    assert rounded.relative_gptq == pytest.approx(sum(np.sqrt(gptq)))
    assert rounded.error_gptq == pytest.approx(sum(gptq))


def test_the_note_says_so_when_neither_rounding_moved_the_output() -> None:
    # Inputs all 0 on the calibration data: both errors 0, which read "infx lower" before.
    weight = quantize_weight(np.ones((4, 4), np.float32), 1)
    note = int8_rounding.Rounded({("w", 1): weight}).note()
    assert "no output error on calibration data for either rounding" in note
    assert "inf" not in note
