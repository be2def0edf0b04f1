"""The numerics of one factorization: whitening, error curves, the least-squares refit, and
the rank rules."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import UserInputError
from graphopt.passes.factorization import lowrank
from graphopt.passes.factorization.allocation import Option, allocate
from graphopt.passes.factorization.settings import (
    RankRule,
    aligned,
    candidate_ranks,
    resolve_method,
    speed_check_mode,
)
from graphopt_tests.passes.factorization.graphs import anisotropic


def _problem(seed: int = 0, n: int = 48, k: int = 64, rows: int = 2000):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k))
    x = anisotropic(rng, (rows, k)).astype(np.float64)
    return w, x, x.T @ x / rows


def _out_error(w, approx, x):
    return float(np.sum((x @ (w - approx).T) ** 2) / np.sum((x @ w.T) ** 2))


def test_asvd_beats_svd_on_anisotropic_inputs():
    w, x, h = _problem()
    for rank in (4, 8, 16):
        u, v = lowrank.spectrum(w, None, "svd").factors(rank)
        ua, va = lowrank.spectrum(w, h, "asvd").factors(rank)
        svd_error, asvd_error = _out_error(w, u @ v, x), _out_error(w, ua @ va, x)
        assert asvd_error < 0.5 * svd_error
        # The whitened tail is the output error itself, up to the damping (a ridge of 1e-4
        # of the mean input energy in every direction).
        curve = lowrank.energies(w, h, "asvd")
        assert curve[rank:].sum() / curve.sum() == pytest.approx(asvd_error, rel=0.05, abs=2e-4)


def test_energy_curves_match_the_factors():
    w, _, h = _problem(1)
    plain = lowrank.energies(w, h, "svd")
    for rank in (8, 24):
        u, v = lowrank.spectrum(w, None, "svd").factors(rank)
        assert plain[rank:].sum() / plain.sum() == pytest.approx(
            lowrank.output_error(w, u @ v, h), rel=1e-3
        )
    # Without data: the weight spectrum (Eckart-Young).
    weight = lowrank.energies(w, None, "svd")
    u, v = lowrank.spectrum(w, None, "svd").factors(8)
    assert weight[8:].sum() / weight.sum() == pytest.approx(lowrank.weight_error(w, u @ v))
    # asvd's shortcut (eigenvalues of W H Wᵀ, or of Lᵀ WᵀW L for tall W) is the squared
    # singular values of the whitened weight, on both sides.
    for weight, hessian in ((w, h), (w.T, h[:48, :48])):
        whitened = lowrank.spectrum(weight, hessian, "asvd").sigma ** 2
        got = lowrank.energies(weight, hessian, "asvd")
        np.testing.assert_allclose(got[: len(whitened)], whitened, rtol=1e-6, atol=1e-9)


def test_full_rank_factors_reproduce_the_weight():
    w, _, h = _problem(2)
    for method, hessian in (("svd", None), ("asvd", h)):
        u, v = lowrank.spectrum(w, hessian, method).factors(48)
        np.testing.assert_allclose(u @ v, w, atol=1e-8)


def test_refit_reduces_the_error_toward_the_original_outputs():
    w, x, h = _problem(3)
    rng = np.random.default_rng(9)
    # The current inputs drifted from the original ones (earlier layers were factorized).
    drifted = x + 0.3 * rng.standard_normal(x.shape) @ rng.standard_normal((64, 64)) * 0.2
    rows = x.shape[0]
    current, cross = drifted.T @ drifted / rows, drifted.T @ x / rows
    u, v = lowrank.spectrum(w, current, "asvd").factors(12)
    before = lowrank.output_error(w, u @ v, h, current, cross)
    refitted = lowrank.refit_u(w, v, current, cross)
    after = lowrank.output_error(w, refitted @ v, h, current, cross)
    assert after < 0.9 * before
    direct = float(np.sum((x @ w.T - drifted @ (refitted @ v).T) ** 2) / np.sum((x @ w.T) ** 2))
    assert after == pytest.approx(direct, rel=1e-6)
    # Same inputs: the refit keeps asvd's optimum (it is already the least-squares U).
    u, v = lowrank.spectrum(w, h, "asvd").factors(12)
    same = lowrank.output_error(w, lowrank.refit_u(w, v, h) @ v, h)
    assert same <= lowrank.output_error(w, u @ v, h) + 1e-9


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("flops=0.25", "flops", 0.25), ("energy=0.9", "energy", 0.9), ("rank=16", "rank", 16),
     ("ratio=0.5", "ratio", 0.5), (" FLOPS = 0.3 ", "flops", 0.3)],
)  # fmt: skip
def test_rank_rules_parse(text, kind, value):
    rule = RankRule.parse(text)
    assert (rule.kind, rule.value) == (kind, value)
    assert RankRule.parse(str(rule)) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [("flops=1.5", "0 < R < 1"), ("rank=2.5", "positive integer"), ("energy=0", "0 < E <= 1"),
     ("half", "expected flops=R"), ("rank=", "expected flops=R")],
)  # fmt: skip
def test_bad_rank_rules(text, message):
    with pytest.raises(UserInputError, match=message):
        RankRule.parse(text)


def test_rounding_to_multiples():
    assert aligned(1, 8, 64) == 8
    assert aligned(9, 8, 64) == 16
    assert aligned(16, 8, 64) == 16
    assert aligned(60, 8, 64) == 64  # capped at full rank (then it saves nothing)
    assert aligned(33, 32, 384) == 64
    assert candidate_ranks(40, 8) == [8, 16, 24, 32]
    assert candidate_ranks(10, 1) == list(range(1, 10))


def test_method_defaults_and_data_rule():
    assert resolve_method(None, "calib.npz").method == "asvd"
    assert resolve_method(None, "random").method == "svd"  # generated data: data-free default
    assert resolve_method("asvd", "random").method == "asvd"  # asked for explicitly
    assert resolve_method(None, "").method == "svd"
    assert resolve_method(None, "").defaulted == ("method",)
    assert "method svd (default)" in resolve_method(None, "").note("")
    with pytest.raises(UserInputError, match=r"asvd needs calibration data.*--calib"):
        resolve_method("asvd", "")
    assert speed_check_mode("OFF") == "off" and speed_check_mode("old.onnx") == "old.onnx"
    with pytest.raises(UserInputError, match="--factorize-speed-check"):
        speed_check_mode("maybe")


def test_allocation_spends_error_where_it_is_cheapest():
    # Layer 0 loses little per FLOP, layer 1 a lot: the target comes from layer 0 first.
    # Convex curves, as real ones are: each step down in rank costs more than the last.
    cheap = [Option(r, 0.01 * (4 - r) ** 2, 100 * (4 - r)) for r in (1, 2, 3)]
    dear = [Option(r, 0.5 * (4 - r) ** 2, 100 * (4 - r)) for r in (1, 2, 3)]
    result = allocate([cheap, dear], 200)
    assert result.ranks == [2, None] and result.saved == 200 and result.shortfall == 0
    both = allocate([cheap, dear], 400)
    assert both.ranks == [1, 3] and both.saved == 400
    short = allocate([cheap, dear], 1000)
    assert short.ranks == [1, 1] and short.shortfall == 400
