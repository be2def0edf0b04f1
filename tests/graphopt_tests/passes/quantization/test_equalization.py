"""Cross-layer equalization: exact in float, fewer int8 errors on badly scaled channels, on by
default for depthwise models only, ``--equalize false`` respected; bias absorption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.passes.calibration.samples import load_calibration
from graphopt.passes.quantization import equalization
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, run_pass, tensor_info

CHANNELS = 8


def badly_scaled(relu6: bool = False, bias: float = 0.1) -> ir.Model:
    """Depthwise 3×3 (channel weight magnitudes 1e-3 … 1e2) → Relu → pointwise (inverse
    magnitudes: every channel matters equally to the output) → Relu → depthwise → pointwise.
    ``relu6``: a Clip(0, 6) in the first place instead of the Relu."""
    rng = np.random.default_rng(0)
    magnitudes = np.logspace(-3, 2, CHANNELS)
    dw1 = rng.uniform(0.5, 1.0, (CHANNELS, 1, 3, 3)) * magnitudes[:, None, None, None]
    pw1 = rng.standard_normal((16, CHANNELS, 1, 1)) / magnitudes[None, :, None, None]
    dw2 = rng.uniform(-1.0, 1.0, (16, 1, 3, 3))
    pw2 = rng.standard_normal((4, 16, 1, 1)) * 0.3
    inits = {
        "dw1": dw1.astype(np.float32),
        "b1": (np.abs(rng.standard_normal(CHANNELS)) * bias * magnitudes).astype(np.float32),
        "pw1": pw1.astype(np.float32),
        "b2": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "dw2": dw2.astype(np.float32),
        "pw2": pw2.astype(np.float32),
    }
    first_act = (
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act1")
        if relu6
        else helper.make_node("Relu", ["c1"], ["a1"], name="act1")
    )
    if relu6:
        inits["lo"], inits["hi"] = np.float32(0.0), np.float32(6.0)
    nodes = [
        helper.make_node(
            "Conv", ["x", "dw1", "b1"], ["c1"], name="dw1", group=CHANNELS, pads=[1, 1, 1, 1]
        ),
        first_act,
        helper.make_node("Conv", ["a1", "pw1", "b2"], ["c2"], name="pw1"),
        helper.make_node("Relu", ["c2"], ["a2"], name="act2"),
        helper.make_node("Conv", ["a2", "dw2"], ["c3"], name="dw2", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c3", "pw2"], ["y"], name="pw2"),
    ]
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", CHANNELS, 6, 6])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        inits,
        opset=17,
    )


def _inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, CHANNELS, 6, 6)).astype(np.float32)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = io.to_proto(model).SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _rel(reference: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(reference - got).max() / np.abs(reference).max())


def _calib(tmp_path: Path, count: int = 32) -> str:
    path = tmp_path / "calib.npz"
    np.savez(path, x=_inputs(count, seed=1))
    return str(path)


def _ranges(model: ir.Model, name: str) -> np.ndarray:
    array = model.graph.initializers[name].const_value.numpy()
    return np.abs(array.reshape(array.shape[0], -1)).max(axis=1)


def test_equalization_is_exact_in_float_and_evens_the_ranges():
    model = badly_scaled()
    x = _inputs(8, seed=5)
    before = _run(model, x)
    spread_before = _ranges(model, "dw1")
    done = equalization.equalize_model(model)
    # dw1→pw1 (through Relu), dw2→pw2 (no activation); pw1→Relu→dw2 too.
    assert [(p.first.name, p.second.name) for p in done.pairs] == [
        ("dw1", "pw1"),
        ("pw1", "dw2"),
        ("dw2", "pw2"),
    ]
    assert done.depthwise_pairs == 2 and done.sweeps > 1
    assert _rel(before, _run(model, x)) < 1e-5
    weight = next(n for n in model.graph if n.name == "dw1").inputs[1].name
    spread_after = _ranges(model, weight)
    assert spread_before.max() / spread_before.min() > 1e4
    assert spread_after.max() / spread_after.min() < 10
    # The replaced initializers are gone (no doubled weights in the file).
    assert "dw1" not in model.graph.initializers and "pw1" not in model.graph.initializers


def test_pairs_through_a_clip_are_skipped_and_counted():
    model = badly_scaled(relu6=True)
    done = equalization.equalize_model(model)
    assert ("dw1", "pw1") not in [(p.first.name, p.second.name) for p in done.pairs]
    assert "1 pairs through a Clip" in done.note


def test_bias_absorption_moves_a_sure_minimum_and_stays_exact_on_the_data(tmp_path):
    # Large positive biases: dw1's pre-activation never reaches zero, so part moves on.
    model = badly_scaled(bias=50.0)
    calib = load_calibration(_calib(tmp_path), model)
    x = _inputs(8, seed=1)  # within the calibration samples' distribution
    before = _run(model, x)
    done = equalization.equalize_model(model, calib)
    assert done.absorbed >= 1
    assert _rel(before, _run(model, x)) < 1e-5


def _quantize(model: ir.Model, tmp_path: Path, **options):
    context = PassContext(target="ort")
    result, _ = run_pass(
        model, QuantizePass, context, mode="int8", calib=_calib(tmp_path), **options
    )
    return result, context.details["quantize"]


def test_equalization_reduces_the_int8_error_on_badly_scaled_channels(tmp_path):
    model = badly_scaled()
    x = _inputs(16, seed=7)  # held out
    reference = _run(model, x)
    errors = {}
    for flag in (False, True):
        quantized, record = _quantize(model, tmp_path, equalize=flag)
        errors[flag] = _rel(reference, _run(quantized, x))
        assert any("cross-layer equalization" in note for note in record.notes) == flag
    # The per-tensor scale between dw1 and pw1 wipes out the small channels without it.
    assert errors[True] < errors[False] / 3, errors
    assert errors[True] < 0.1, errors


@pytest.mark.parametrize(("depthwise", "expected"), [(True, True), (False, False)])
def test_default_is_on_for_depthwise_models_only(tmp_path, depthwise, expected):
    model = badly_scaled()
    if not depthwise:
        for node in model.graph:  # the same graph with the depthwise pair made dense
            if node.name == "dw2":
                node.attributes["group"] = ir.AttrInt64("group", 1)
                dense = np.random.default_rng(3).standard_normal((16, 16, 3, 3)) * 0.1
                node.replace_input_with(1, _add(model, "dw2_dense", dense))
            if node.name == "dw1":
                node.attributes["group"] = ir.AttrInt64("group", 1)
                dense = np.random.default_rng(4).standard_normal((CHANNELS, CHANNELS, 3, 3))
                node.replace_input_with(1, _add(model, "dw1_dense", dense))
    assert equalization.has_depthwise(model) == depthwise
    _, record = _quantize(model, tmp_path)
    assert any("cross-layer equalization" in note for note in record.notes) == expected
    assert any("--equalize defaulted on" in note for note in record.notes) == expected


def test_equalize_false_is_respected_on_a_depthwise_model(tmp_path):
    model = badly_scaled()
    off, record = _quantize(model, tmp_path, equalize=False)
    assert not any("equaliz" in note for note in record.notes)
    # The float weights it quantized are the original ones: dw1's per-channel scales span
    # the original 1e-3 … 1e2 magnitudes.
    names = {v.name for n in off.graph for v in n.inputs if v is not None}
    assert not any("equalized" in name for name in names)
    again, _ = _quantize(badly_scaled(), tmp_path)
    assert any("equalized" in v.name for n in again.graph for v in n.inputs if v is not None)


def test_equalized_quantization_is_deterministic(tmp_path):
    first, _ = _quantize(badly_scaled(), tmp_path, equalize=True)
    second, _ = _quantize(badly_scaled(), tmp_path, equalize=True)
    assert io.to_proto(first).SerializeToString() == io.to_proto(second).SerializeToString()


def _add(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    from graphopt import editing

    return editing.add_initializer(model.graph, name, array.astype(np.float32))
