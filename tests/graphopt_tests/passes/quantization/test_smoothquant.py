"""SmoothQuant: exact in float, and it lowers int8-dynamic's error where outliers are."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.calibration.samples import load_calibration
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.passes.quantization.smoothquant import S_MAX, factors, smooth
from graphopt.registry import PassContext
from graphopt_tests.helpers import run_pass
from graphopt_tests.passes.quantization.dynamic_graphs import (
    cosine,
    ffn_model,
    inputs,
    op_types,
    run,
    write_calib,
)


@pytest.mark.parametrize("residual", [False, True])
def test_migration_leaves_float_outputs_unchanged(tmp_path, residual):
    model = ffn_model(residual=residual, outlier_gain=30.0)
    calib = load_calibration(write_calib(tmp_path / "calib.npz"), model)
    smoothed = model.clone()
    done = smooth(smoothed, calib, alpha=0.5)
    assert len(done.groups) == 2  # fc1 (LayerNorm-fed) and fc2 (Gelu-fed)
    where = {name: place for name, place, _ in done.groups}
    # Only readers: the LayerNorm absorbs 1/s; with a residual reader a Mul is inserted.
    assert where["ln"] == ("Mul" if residual else "LayerNormalization")
    assert where["g"] == "Mul"
    assert op_types(smoothed).count("Mul") == (2 if residual else 1)
    x = inputs(8, seed=9)
    before, after = run(model, x, optimize=False), run(smoothed, x, optimize=False)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    # The weights did change: migration is not a no-op.
    changed = [v for v in smoothed.graph.initializers if v.endswith("_smoothed")]
    assert changed


def test_factors_follow_the_formula():
    x_peak = np.array([8.0, 1.0, 0.0, 2.0])
    w_peak = np.array([0.5, 2.0, 1.0, 0.0])
    s = factors(x_peak, w_peak, 0.5)
    assert np.allclose(s[:2], [np.sqrt(8.0) / np.sqrt(0.5), 1.0 / np.sqrt(2.0)])
    assert s[2] == 1.0 and s[3] == 1.0  # a zero channel is left alone
    assert factors(np.array([1e9]), np.array([1e-9]), 1.0)[0] == np.float32(S_MAX)
    assert np.allclose(factors(x_peak[:2], w_peak[:2], 0.0), 1.0 / w_peak[:2])


def _error(tmp_path, alpha: float) -> tuple[float, float]:
    """int8-dynamic's max and mean abs error on held-out inputs with SmoothQuant at alpha."""
    model = ffn_model(outlier_gain=40.0)
    calib = write_calib(tmp_path / "calib.npz", count=32)
    result, _ = run_pass(
        model,
        QuantizePass,
        PassContext(),
        mode="int8-dynamic",
        calib=calib,
        smoothquant=alpha,
    )
    x = inputs(32, seed=11)
    reference, got = run(model, x), run(result, x)
    return float(np.abs(got - reference).mean()), cosine(reference, got)


def test_smoothing_reduces_quantization_error_on_outlier_channels(tmp_path):
    plain_error, plain_cosine = _error(tmp_path, 0.0)
    smooth_error, smooth_cosine = _error(tmp_path, 0.5)
    assert smooth_error < 0.8 * plain_error
    assert smooth_cosine > plain_cosine


def test_default_smooths_layer_norm_fed_layers_only(tmp_path):
    model = ffn_model(outlier_gain=30.0)
    context = PassContext()
    calib = write_calib(tmp_path / "calib.npz")
    run_pass(model, QuantizePass, context, mode="int8-dynamic", calib=calib)
    record = context.details["quantize"]
    notes = " ".join(record.notes)
    assert "SmoothQuant: 1 inputs of 1 layers smoothed (1 into their normalization scale" in notes
    assert "alpha 0.5" in notes


def test_off_and_without_calibration(tmp_path):
    context = PassContext()
    run_pass(ffn_model(), QuantizePass, context, mode="int8-dynamic", smoothquant=0.0)
    assert not any("SmoothQuant" in note for note in context.details["quantize"].notes)
    context = PassContext()
    run_pass(ffn_model(), QuantizePass, context, mode="int8-dynamic", smoothquant=0.5)
    assert any("SmoothQuant skipped" in n for n in context.details["quantize"].notes)
