"""The numerics of one layer's factorization: ``W[N, K] ≈ U[N, r] · V[r, K]``.

* Plain SVD: the best rank-r approximation in weight space (Eckart-Young).
* Activation-aware SVD (SVD-LLM, Wang et al. 2024): with the layer input's Gram matrix
  ``H = XᵀX`` and a square root ``S`` (``H = S Sᵀ``), ``‖X (W − Ŵ)ᵀ‖ = ‖(W − Ŵ) S‖``: the
  SVD of ``W S`` truncated and unwhitened (``V = Vᵣᵀ S⁻¹``) is the best rank-r approximation
  of the layer's *outputs* on those inputs, and its tail singular values are exactly the
  output error, so error curves over all ranks cost one decomposition. ``S`` is the
  Cholesky factor of ``H`` plus a small ridge (damping): calibration inputs are often rank
  deficient (LayerNorm outputs, constant padding channels).
* The second factor's least-squares refit (:func:`refit_u`): given ``V``, the ``U`` that
  best reproduces the *original* outputs ``X Wᵀ`` from the *current* inputs ``X̃`` (the
  model with earlier layers already factorized), from the cross Gram ``X̃ᵀX``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ridge added to H before whitening, relative to its mean diagonal (SVD-LLM's damping).
WHITEN_DAMP = 1e-4
# Ridge of the refit's normal equations, relative to their mean diagonal.
REFIT_DAMP = 1e-6


@dataclass
class Spectrum:
    """One layer's SVD (whitened or not), for its factors."""

    u: np.ndarray  # [N, f] left singular vectors
    sigma: np.ndarray  # [f]
    vt: np.ndarray  # [f, K] right singular vectors (whitened coordinates for asvd)
    whiten: np.ndarray | None  # asvd: L with L Lᵀ = H (damped); None for plain SVD

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(U [N, r], V [r, K])``, float64, singular values split evenly between them
        (neither factor's scale dwarfs the other's in float16/float32)."""
        root = np.sqrt(self.sigma[:rank])
        u = self.u[:, :rank] * root
        v = root[:, None] * self.vt[:rank]
        if self.whiten is not None:
            v = np.linalg.solve(self.whiten.T, v.T).T  # V = Vᵣ L⁻¹: back to input coordinates
        return u, v


def damped(hessian: np.ndarray) -> np.ndarray:
    """``H`` (float64, symmetrized) plus ``WHITEN_DAMP`` × its mean diagonal."""
    h = np.asarray(hessian, np.float64)
    h = (h + h.T) / 2
    h[np.diag_indices_from(h)] += WHITEN_DAMP * max(float(np.mean(np.diag(h))), 1e-30)
    return h


def spectrum(weight: np.ndarray, hessian: np.ndarray | None, method: str) -> Spectrum:
    """The layer's decomposition for ``method``: asvd (with ``hessian``) whitens by the
    Cholesky factor of the damped ``H``, else plain SVD."""
    w = np.asarray(weight, np.float64)
    if method == "asvd" and hessian is not None:
        root = np.linalg.cholesky(damped(hessian))
        u, sigma, vt = np.linalg.svd(w @ root, full_matrices=False)
        return Spectrum(u, sigma, vt, root)
    u, sigma, vt = np.linalg.svd(w, full_matrices=False)
    return Spectrum(u, sigma, vt, None)


def energies(weight: np.ndarray, hessian: np.ndarray | None, method: str) -> np.ndarray:
    """What dropping each singular direction costs, descending: the relative error of rank
    r is ``energy[r:].sum() / energy.sum()``. Output errors with ``hessian`` (for plain SVD
    too, to compare methods and allocate ranks alike), weight errors without.

    Only values, no vectors where they are not needed: asvd's are the eigenvalues of
    ``W H Wᵀ`` (or of ``Lᵀ WᵀW L``, whichever side is smaller), the squared singular values
    of ``W L``; plain SVD's ``σᵢ² vᵢᵀ H vᵢ`` (``‖(W − Wᵣ) L‖²``: the left vectors are
    orthonormal)."""
    w = np.asarray(weight, np.float64)
    if hessian is None:
        return np.linalg.svd(w, compute_uv=False) ** 2
    h = damped(hessian)
    if method == "asvd":
        n, k = w.shape
        if n <= k:
            gram = w @ h @ w.T
        else:
            root = np.linalg.cholesky(h)
            gram = root.T @ (w.T @ w) @ root
        values = np.linalg.eigvalsh((gram + gram.T) / 2)[::-1]
        return np.maximum(values, 0.0)
    _, sigma, vt = np.linalg.svd(w, full_matrices=False)
    return sigma**2 * np.einsum("ik,kl,il->i", vt, h, vt)


def refit_u(
    weight: np.ndarray, v: np.ndarray, current: np.ndarray, cross: np.ndarray | None = None
) -> np.ndarray:
    """``U = W Cᵀ Vᵀ (V H̃ Vᵀ)⁻¹``: the least-squares ``U`` for inputs with Gram ``H̃ =
    X̃ᵀX̃`` (``current``) and targets ``X Wᵀ``, ``C = X̃ᵀX`` (``cross``; None: the inputs are
    the original ones, ``C = H̃``)."""
    w = np.asarray(weight, np.float64)
    v = np.asarray(v, np.float64)
    h = np.asarray(current, np.float64)
    c = h if cross is None else np.asarray(cross, np.float64)
    normal = v @ h @ v.T
    ridge = REFIT_DAMP * max(float(np.mean(np.diag(normal))), 1e-30)
    normal[np.diag_indices_from(normal)] += ridge
    rhs = w @ c.T @ v.T  # [N, r]
    return np.linalg.solve(normal, rhs.T).T


def output_error(
    weight: np.ndarray,
    approx: np.ndarray,
    original: np.ndarray,
    current: np.ndarray | None = None,
    cross: np.ndarray | None = None,
) -> float:
    """``‖X Wᵀ − X̃ Ŵᵀ‖² / ‖X Wᵀ‖²`` from ``H = XᵀX`` (``original``), ``H̃`` and ``C = X̃ᵀX``
    (both default to ``H``: the same inputs)."""
    w = np.asarray(weight, np.float64)
    a = np.asarray(approx, np.float64)
    h = np.asarray(original, np.float64)
    ht = h if current is None else np.asarray(current, np.float64)
    c = h if cross is None else np.asarray(cross, np.float64)
    total = float(np.sum((w @ h) * w))
    moved = total - 2 * float(np.sum((w @ c.T) * a)) + float(np.sum((a @ ht) * a))
    return max(moved, 0.0) / total if total > 0 else 0.0


def weight_error(weight: np.ndarray, approx: np.ndarray) -> float:
    w = np.asarray(weight, np.float64)
    total = float(np.sum(w * w))
    return float(np.sum((w - approx) ** 2)) / total if total > 0 else 0.0
