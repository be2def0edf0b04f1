"""Activation statistics and calibration methods on distributions whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.quantization import auto_method
from graphopt.passes.quantization.ranges import (
    METHODS,
    QuantParams,
    TensorStats,
    calibrate,
    fake_quantize,
    params_for,
)
from graphopt_tests.helpers import make_model, tensor_info

RNG = np.random.default_rng(0)


def _stats(*batches: np.ndarray, keep: int = 0) -> TensorStats:
    stats = TensorStats()
    for batch in batches:
        stats.add(batch, keep)
    return stats


def _outliers(n: int = 2_000_000) -> np.ndarray:
    """Gaussian values with a handful of rare (2 per million), huge outliers: rare enough
    that clipping them costs less squared error than the rounding a range reaching them
    would add to every other value (so MSE clips too)."""
    values = RNG.standard_normal(n).astype(np.float32)
    values[RNG.choice(n, 4, replace=False)] = np.array([60, -62, 70, 58])
    return values


def test_streamed_histogram_equals_the_one_pass_histogram():
    data = RNG.standard_normal(30_000).astype(np.float32)
    # Growing magnitudes force the edge to double twice while streaming.
    batches = [data[:10_000] * 0.5, data[10_000:20_000] * 2.0, data[20_000:] * 7.0]
    streamed = _stats(*batches)
    whole = _stats(np.concatenate(batches))
    assert streamed.edge == whole.edge
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    assert streamed.counts.sum() == 30_000
    assert (streamed.lo, streamed.hi) == (whole.lo, whole.hi)


@pytest.mark.parametrize("activation_type", ["s8", "u8"])
def test_rare_outliers_are_clipped_by_every_method_but_minmax(activation_type):
    stats = _stats(_outliers())
    minmax = calibrate(stats, "minmax", activation_type)
    assert (minmax.lo, minmax.hi) == (stats.lo, stats.hi) == (-62.0, 70.0)
    for method in ("percentile", "entropy", "mse"):
        r = calibrate(stats, method, activation_type)
        # The bulk (|x| < ~5) is kept, the outliers (> 50) are clipped away.
        assert 3.0 < r.hi < 20.0, (method, r)
        assert -20.0 < r.lo < -3.0, (method, r)


def test_uniform_data_is_not_clipped():
    stats = _stats(RNG.uniform(-1.0, 1.0, 100_000).astype(np.float32))
    for method in METHODS:
        r = calibrate(stats, method, "s8")
        assert r.hi == pytest.approx(1.0, abs=0.02), method
        assert r.lo == pytest.approx(-1.0, abs=0.02), method


def test_one_sided_tensor_gets_a_u8_range_from_zero():
    relu = np.maximum(RNG.standard_normal(50_000).astype(np.float32), 0.0)
    for method in METHODS:
        r = calibrate(_stats(relu), method, "u8")
        assert r.lo == 0.0
        p = params_for(r.lo, r.hi, "u8", symmetric=False)
        assert p.zero_point == 0  # Relu folds into the quantize step


def test_percentile_is_the_99_99th_of_the_magnitudes():
    values = np.linspace(0.0, 1.0, 1_000_001, dtype=np.float32)
    r = calibrate(_stats(values), "percentile", "s8")
    assert r.hi == pytest.approx(0.9999, abs=1e-3)


def test_params_and_fake_quantize_follow_onnx():
    sym = params_for(-3.0, 5.0, "s8", symmetric=True)
    assert sym == QuantParams(float(np.float32(5.0 / 127)), 0, "s8")
    asym = params_for(0.5, 5.0, "u8", symmetric=False)  # the range always includes 0
    assert asym.zero_point == 0 and asym.scale == pytest.approx(5.0 / 255)
    x = np.array([-10.0, -0.02, 0.0, 0.02, 2.5, 4.99, 9.0], np.float32)
    got = fake_quantize(x, asym)
    assert got[0] == 0.0 and got[-1] == pytest.approx(5.0)  # saturates
    assert np.abs(got[2:6] - x[2:6]).max() <= asym.scale / 2 + 1e-7
    # Symmetric s8 saturates at -128 (QuantizeLinear's range), one step past -5.
    assert fake_quantize(x, sym).min() == pytest.approx(-128 * sym.scale)
    assert fake_quantize(x, sym).max() == pytest.approx(5.0)


def _consumer(weights: np.ndarray):
    """x[N, 4] @ W: a MatMul consumer, as a model to take the node from."""
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor_info("x", TensorProto.FLOAT, [None, 4])],
        [tensor_info("y", TensorProto.FLOAT, [None, weights.shape[1]])],
        {"w": weights.astype(np.float32)},
    )
    return model, next(iter(model.graph))


def test_auto_picks_the_method_whose_consumer_output_moves_least():
    # Channel 0 carries one rare large value, channels 1..3 the bulk: percentile and
    # entropy clip it, minmax and mse keep it.
    x = RNG.standard_normal((4096, 4)).astype(np.float32) * np.float32(0.2)
    x[1234, 0] = 9.0
    stats = {"x": _stats(x, keep=4096)}
    verdicts = {}
    for label, weights in (
        # Reads only the outlier channel: clipping it ruins the output.
        ("outliers matter", np.array([[1.0], [0.0], [0.0], [0.0]])),
        # Ignores the outlier channel: a tight range serves the bulk better.
        ("outliers ignored", np.array([[0.0], [1.0], [1.0], [1.0]])),
    ):
        model, node = _consumer(weights)
        runner = auto_method.ConsumerRunner(model)
        chosen, errors = auto_method.choose(
            "x", stats, [node], runner, lambda r: params_for(r.lo, r.hi, "s8", True), "s8"
        )
        assert errors[chosen.method] == min(errors.values())
        assert len(set(errors.values())) > 1  # the methods really differ here
        verdicts[label] = chosen
    assert verdicts["outliers matter"].hi > 8.0  # kept the outliers
    assert verdicts["outliers ignored"].hi < 8.0  # clipped them
