"""The numerics of the three decompositions on synthetic data (no graph)."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.decomposition import methods


def _corr(rng, n: int, rows: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A correlated, non-isotropic input: its correlation and its rows."""
    mix = rng.normal(size=(n, n)) * np.linspace(2.0, 0.1, n)
    x = rng.normal(size=(rows, n)) @ mix.T + 0.3
    return x.T @ x / rows, x


def test_nystrom_with_every_unit_kept_is_exact():
    rng = np.random.default_rng(0)
    corr, _ = _corr(rng, 24)
    down = rng.normal(size=(24, 8))
    keep = np.arange(24)
    for damp in (0.0, 0.01, 1.0):  # damping pulls toward the rows as they were: still exact
        np.testing.assert_allclose(methods.nystrom(corr, down, keep, damp), down, atol=1e-8)
    assert methods.mlp_error(corr, down, keep, down) == pytest.approx(0.0, abs=1e-12)


def test_nystrom_is_the_least_squares_refit_on_the_kept_units():
    rng = np.random.default_rng(1)
    corr, x = _corr(rng, 20)
    down = rng.normal(size=(20, 6))
    scores = methods.leverage_scores(corr, ridge=1.0)
    assert ((scores > 0) & (scores < 1)).all()
    keep = np.sort(np.argsort(-scores)[:12])
    fitted = methods.nystrom(corr, down, keep, damp=0.0)
    # The same thing from the rows: regress the full output on the kept units' activations.
    direct, *_ = np.linalg.lstsq(x[:, keep], x @ down, rcond=None)
    np.testing.assert_allclose(fitted, direct, rtol=1e-6, atol=1e-8)
    y, approx = x @ down, x[:, keep] @ fitted
    error = np.sum((y - approx) ** 2) / np.sum(y**2)
    assert methods.mlp_error(corr, down, keep, fitted) == pytest.approx(error, rel=1e-6)
    # The refit beats plain dropping of the other units.
    assert error < np.sum((y - x[:, keep] @ down[keep]) ** 2) / np.sum(y**2)


def test_cr_scores_and_top_k_per_head():
    rng = np.random.default_rng(2)
    corr, _ = _corr(rng, 10)
    wq, wk = rng.normal(size=(10, 12)), rng.normal(size=(10, 12))
    root = methods.sqrt_psd(corr)
    expected = np.linalg.norm(root @ wq, axis=0) * np.linalg.norm(root @ wk, axis=0)
    scores = methods.cr_scores(corr, wq, wk)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    keep = methods.top_per_head(scores, heads=3, keep=2)
    assert len(keep) == 6
    for h in range(3):
        mine = keep[(keep >= 4 * h) & (keep < 4 * h + 4)]
        best = 4 * h + np.argsort(-expected[4 * h : 4 * h + 4])[:2]
        assert sorted(mine) == sorted(best)
    assert methods.qk_error(root, wq, wk, np.arange(12)) == pytest.approx(0.0, abs=1e-12)
    full, part = root @ wq @ wk.T @ root, root @ wq[:, keep] @ wk[:, keep].T @ root
    error = np.sum((full - part) ** 2) / np.sum(full**2)
    assert methods.qk_error(root, wq, wk, keep) == pytest.approx(error, rel=1e-9)


def test_vo_rotation_is_exact_and_truncation_drops_the_smallest_singular_values():
    rng = np.random.default_rng(3)
    corr, _ = _corr(rng, 16)
    wv, wo = rng.normal(size=(16, 6)), rng.normal(size=(6, 16))
    root = methods.sqrt_psd(corr)
    new_v, new_o, s = methods.vo_rotation(root, wv, wo)
    np.testing.assert_allclose(new_v @ new_o, wv @ wo, rtol=1e-7, atol=1e-9)
    whitened = root @ wv @ wo
    np.testing.assert_allclose(s, np.linalg.svd(whitened, compute_uv=False)[:6], rtol=1e-7)
    for k in (1, 3, 5):
        err = np.linalg.norm(whitened - root @ new_v[:, :k] @ new_o[:k], "fro") ** 2
        assert err == pytest.approx(np.sum(s[k:] ** 2), rel=1e-6)


def test_vo_rotation_of_a_rank_deficient_head_stays_exact():
    rng = np.random.default_rng(4)
    corr, _ = _corr(rng, 12)
    wv = rng.normal(size=(12, 2)) @ rng.normal(size=(2, 5))  # 5 V dims, rank 2
    wo = rng.normal(size=(5, 12))
    new_v, new_o, s = methods.vo_rotation(methods.sqrt_psd(corr), wv, wo)
    np.testing.assert_allclose(new_v @ new_o, wv @ wo, atol=1e-8)
    assert s[2:].max() < 1e-8 * s[0]  # the dependent directions are the ones dropped first
    np.testing.assert_allclose(new_v[:, :2] @ new_o[:2], wv @ wo, atol=1e-7)


def test_augmented_correlation_carries_the_bias():
    rng = np.random.default_rng(5)
    corr, x = _corr(rng, 6)
    aug = methods.augmented(corr, x.mean(axis=0))
    ones = np.hstack([x, np.ones((len(x), 1))])
    np.testing.assert_allclose(aug, ones.T @ ones / len(x), rtol=1e-10)
