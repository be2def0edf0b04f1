"""The numerics of MoDeGPT's three module decompositions, on plain arrays (no graph).

* MLP (:func:`nystrom`): keep the intermediate units with the largest ridge leverage scores of
  the nonlinearity's output correlation ``C``, and refit the down projection on the kept
  units by least squares (the Nyström approximation of ``C``).
* Q/K (:func:`cr_scores`, :func:`top_per_head`): CR decomposition of the bilinear score
  ``X W_q W_kᵀ Xᵀ``: per head, the head dims whose Q and K columns carry the most energy
  under the input correlation, the same ones in Q and K.
* V/O (:func:`vo_rotation`): per head, the SVD of the whitened V→O product, written as an
  exact change of basis of the head's V dims, sorted by singular value, so truncating to
  rank k is dropping the trailing dims.

Correlations here are uncentered second moments ``E[x xᵀ]``; a bias is handled by
augmenting the input with a constant 1 (:func:`augmented`).
"""

from __future__ import annotations

import numpy as np


def augmented(gram: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``E[[x, 1][x, 1]ᵀ]`` from ``E[x xᵀ]`` and ``E[x]``: the bias as one more input."""
    n = gram.shape[0]
    out = np.empty((n + 1, n + 1))
    out[:n, :n] = gram
    out[:n, n] = out[n, :n] = mean
    out[n, n] = 1.0
    return out


def leverage_scores(corr: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge leverage scores ``diag(C (C + λI)⁻¹)``, λ = ``ridge`` × mean diagonal of C."""
    lam = ridge * max(float(np.mean(np.diag(corr))), 1e-12)
    eye = np.eye(corr.shape[0])
    # C (C + λI)⁻¹ is symmetric for symmetric C; solve instead of inverting.
    return np.diag(np.linalg.solve(corr + lam * eye, corr)).copy()


def nystrom(
    corr: np.ndarray,
    down: np.ndarray,
    keep: np.ndarray,
    damp: float = 1e-4,
    corr_down: np.ndarray | None = None,
) -> np.ndarray:
    """The down projection refit on the kept units: ``(Sᵀ C S)⁻¹ Sᵀ C · down``, damped.

    ``down`` is ``[units, out]`` (MatMul layout), ``keep`` the kept unit indices. The damping
    (``damp`` × the mean diagonal of the kept block) pulls the refit toward the kept rows of
    ``down`` as they were, not toward zero: ``(SᵀCS + δI)⁻¹ (SᵀC·down + δ·Sᵀdown)``, so a few
    calibration tokens cannot drag the weights far, and with every unit kept the result is
    ``down`` for any ``damp``. ``corr_down`` is ``C · down`` when the caller has it.
    """
    block = corr[np.ix_(keep, keep)]
    scale = damp * max(float(np.mean(np.diag(block))), 1e-12)
    rhs = corr_down[keep] if corr_down is not None else corr[keep, :] @ down
    return np.linalg.solve(block + scale * np.eye(len(keep)), rhs + scale * down[keep])


def mlp_error(
    corr: np.ndarray,
    down: np.ndarray,
    keep: np.ndarray,
    fitted: np.ndarray,
    corr_down: np.ndarray | None = None,
) -> float:
    """Relative output error ``‖Y - Ŷ‖² / ‖Y‖²`` of the down projection under ``corr``, with
    ``Ŷ`` reading only the ``keep`` units through ``fitted``."""
    cd = corr_down if corr_down is not None else corr @ down
    total = float(np.sum(down * cd))
    cross = float(np.sum(fitted * cd[keep]))
    own = float(np.sum(fitted * (corr[np.ix_(keep, keep)] @ fitted)))
    return max(total - 2 * cross + own, 0.0) / total if total > 0 else 0.0


def cr_scores(corr: np.ndarray, wq: np.ndarray, wk: np.ndarray) -> np.ndarray:
    """Per column i: ``‖C^{1/2} W_q[:, i]‖ · ‖C^{1/2} W_k[:, i]‖`` (``W`` are ``[in, cols]``;
    with a bias, the augmented correlation and weights with the bias as last row)."""
    q = np.einsum("ij,ik,kj->j", wq, corr, wq)
    k = np.einsum("ij,ik,kj->j", wk, corr, wk)
    return np.sqrt(np.maximum(q, 0.0) * np.maximum(k, 0.0))


def top_per_head(scores: np.ndarray, heads: int, keep: int) -> np.ndarray:
    """Flat column indices of the ``keep`` best dims of each head, ascending within a head.

    ``scores`` is ``[heads * head_dim]`` (or ``[groups, heads * head_dim]`` summed over
    groups first by the caller). Ties go to the lower index (stable sort): deterministic.
    """
    dim = scores.shape[0] // heads
    chosen = []
    for h in range(heads):
        part = scores[h * dim : (h + 1) * dim]
        best = np.sort(np.argsort(-part, kind="stable")[:keep])
        chosen.append(h * dim + best)
    return np.concatenate(chosen)


def qk_error(root: np.ndarray, wq: np.ndarray, wk: np.ndarray, keep: np.ndarray) -> float:
    """Relative error of the score's bilinear form ``W_q W_kᵀ`` whitened by ``root`` =
    ``C^{1/2}`` (Frobenius norm, squared) when only the ``keep`` columns remain."""
    a, b = root @ wq, root @ wk
    full = a @ b.T
    diff = full - a[:, keep] @ b[:, keep].T
    total = float(np.sum(full * full))
    return float(np.sum(diff * diff)) / total if total > 0 else 0.0


def sqrt_psd(corr: np.ndarray, floor: float = 1e-8) -> np.ndarray:
    """Symmetric square root of a PSD matrix, eigenvalues floored relative to the largest."""
    values, vectors = np.linalg.eigh((corr + corr.T) / 2)
    values = np.maximum(values, floor * max(float(values.max()), 1e-30))
    return (vectors * np.sqrt(values)) @ vectors.T


def vo_rotation(
    root: np.ndarray, wv: np.ndarray, wo: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One head's V/O in the basis of the whitened product's singular vectors.

    ``root`` is ``C^{1/2}`` (C the V projection's input correlation), ``wv`` ``[in, d]``,
    ``wo`` ``[d, out]``. Returns ``(wv', wo', s)`` with ``wv' wo' = wv wo`` (to rounding)
    and ``C^{1/2} wv'[:, :k] wo'[:k]`` the best rank-k approximation of ``C^{1/2} wv wo``:
    ``s`` are its singular values, descending, so truncation's squared error is
    ``Σ s[k:]²``. Done as QR of both factors and the SVD of the small ``d × d`` core, then
    mapped back through the (exact) factors, so ``C^{-1/2}`` is never formed.
    """
    ra = np.linalg.qr(root @ wv, mode="r")  # C^{1/2} wv = qa ra, qa not needed
    qb, rb = np.linalg.qr(wo.T)  # wo = rb^T qb^T
    u, s, vt = np.linalg.svd(ra @ rb.T)
    # wv' = wv T, wo' = T⁻¹ wo with T = ra⁻¹ u diag(s): C^{1/2} wv' = qa u diag(s); ra may be
    # singular (a head whose V columns are dependent): lstsq gives the least-norm T, and the
    # directions it cannot reach have s = 0, so they are the ones dropped first.
    rotated_v = wv @ np.linalg.lstsq(ra, u * s, rcond=None)[0]
    rotated_o = vt @ qb.T
    return rotated_v, rotated_o, s
