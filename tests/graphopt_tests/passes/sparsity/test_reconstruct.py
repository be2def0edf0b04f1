"""SparseGPT reconstruction: the pattern is kept, and the output error is the lowest."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.sparsity.masks import pattern_mask, scores
from graphopt.passes.sparsity.reconstruct import sparsegpt
from graphopt.passes.sparsity.settings import Pattern
from graphopt.passes.sparsity.statistics import relative_output_error


def follows(sparse: np.ndarray, pattern: Pattern) -> bool:
    """Whether the zeros of ``sparse`` [N, K] are exactly ``pattern``'s."""
    n, k = sparse.shape
    if pattern.is_nm:
        groups = (sparse.reshape(n, k // pattern.group, pattern.group) != 0).sum(axis=2)
        return bool((groups == pattern.keep).all())
    r, c = pattern.rows, pattern.cols
    tiles = (sparse.reshape(n // r, r, k // c, c) != 0).any(axis=(1, 3))
    dropped = (~tiles).sum(axis=1)
    return bool((dropped == round(pattern.ratio * (k // c))).all())


def _layer(seed: int = 0, n: int = 24, k: int = 64, rows: int = 512):
    rng = np.random.default_rng(seed)
    # Correlated inputs with uneven channel scales, as real activations are.
    x = rng.standard_normal((rows, 6)) @ rng.standard_normal((6, k))
    x = x * rng.uniform(0.2, 3.0, k) + 0.1 * rng.standard_normal((rows, k))
    w = rng.standard_normal((n, k)).astype(np.float32)
    hessian = (x.T @ x / rows).astype(np.float32)
    return w, hessian


@pytest.mark.parametrize("text", ["2:4", "1:4", "block:1x4=0.75", "block:4x1=0.5",
                                  "block:4x4=0.5", "unstructured=0.6"])  # fmt: skip
def test_reconstruction_keeps_the_pattern_and_beats_masking(text):
    w, hessian = _layer()
    pattern = Pattern.parse(text)
    sparse = sparsegpt(w, hessian, pattern)
    assert follows(sparse, pattern)
    energy = np.diag(hessian)
    for criterion in ("magnitude", "wanda"):
        masked = np.where(pattern_mask(scores(w, criterion, energy), pattern), w, 0.0)
        assert relative_output_error(w, sparse, hessian) < relative_output_error(w, masked, hessian)


def test_nm_zeros_are_exactly_the_pattern():
    w, hessian = _layer(1)
    sparse = sparsegpt(w, hessian, Pattern.parse("2:4"))
    assert ((sparse.reshape(w.shape[0], -1, 4) != 0).sum(axis=2) <= 2).all()


def test_with_uncorrelated_unit_inputs_it_is_magnitude_pruning():
    # H = I: no column can make up for another, so OBS keeps the largest weights unchanged.
    w = np.random.default_rng(3).standard_normal((8, 32)).astype(np.float32)
    sparse = sparsegpt(w, np.eye(32, dtype=np.float32), Pattern.parse("2:4"))
    masked = np.where(pattern_mask(np.abs(w), Pattern.parse("2:4")), w, 0.0)
    np.testing.assert_allclose(sparse, masked, rtol=1e-5, atol=1e-6)


def test_kept_weights_are_the_least_squares_optimum_for_the_mask():
    from graphopt.passes.sparsity.reconstruct import resolve_kept

    w, hessian = _layer(4, n=6, k=32)
    keep = pattern_mask(np.abs(w), Pattern.parse("2:4"))
    got = resolve_kept(w, np.where(keep, w, 0.0), hessian, keep, dampening=0.0, iterations=64)
    h = hessian.astype(np.float64)
    for row in range(w.shape[0]):
        kept = np.flatnonzero(keep[row])
        exact = np.linalg.solve(h[np.ix_(kept, kept)], (h @ w[row].astype(np.float64))[kept])
        np.testing.assert_allclose(got[row, kept], exact, rtol=2e-3, atol=2e-3)
