"""Joint EoRA: re-round the weight with the low-rank path in view, then refit the path.

Plain EoRA fits a rank-r path ``L = B·A`` to what the pass left, ``ΔW = W − W'``. After a
data-aware pass (GPTQ, SparseGPT) that error is already spread evenly over the whitened input
directions, so ``r`` of them hold little of it. Rounding again *with the path in view* does
better (LQER / LoftQ-style alternation): round ``W − L`` with the pass's own rounding (its
error feedback then sees the path), refit ``L`` to the new residual ``W − W''`` in the
eigenspace of the inputs, repeat ``ROUNDS`` times. The model computes ``W''`` (as sparse or
as quantized as ``W'``: the same rounding made it) plus the path.

``L``'s first value: from the pass's residual (``residual``: LQER) or from ``W`` itself
(``weight``: LoftQ, whose path takes ``W``'s dominant directions before the rounding ever
sees them). Measured per layer on MiniLM (relative output error on calibration inputs at
rank 32, plain EoRA → two rounds): GPTQ int4 ``1.24e-3 → 0.96e-3`` with ``weight``,
``1.15e-3`` with ``residual``; SparseGPT 2:4 ``1.28e-2 → 0.84e-2`` with ``residual``,
``0.97e-2`` with ``weight``. Each layer keeps whichever of plain EoRA and the rounds has the
lowest output error on the calibration Gram, so a layer is never worse than plain EoRA there.
Used by quantize after GPTQ (MatMulNBits; after RTN the model measured worse, see
:mod:`.quantized`) and by sparsify under N:M patterns (:mod:`.sparsified`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphopt.passes.compensation.eora import _energy, eora_factors

ROUNDS = 2
# Module switch (the benchmark's plain-EoRA rows set it False).
ENABLED = True


@dataclass
class Refined:
    """A layer's weight re-rounded with its path in view, and the errors that chose it."""

    approx: np.ndarray  # W'' [N, K] float64
    extra: object  # the rounder's own form of W'' (e.g. the int4 codes), for the caller
    error_plain: float  # relative output error of W' + EoRA(W − W')
    error_joint: float  # of W'' + EoRA(W − W'')
    rounds: int


def refine(
    weight: np.ndarray,
    approx: np.ndarray,
    gram: np.ndarray,
    rank: int,
    rounder: Callable[[np.ndarray], tuple[np.ndarray, object]],
    init: str,
) -> Refined | None:
    """The best re-rounding of ``weight`` (``rounder`` returns ``(W'', extra)``), or None when
    plain EoRA on ``approx`` (the pass's ``W'``) keeps the lowest output error."""
    w = np.asarray(weight, np.float64)
    h = np.asarray(gram, np.float64)
    total = max(_energy(w, h), np.finfo(np.float64).tiny)
    start = np.asarray(approx, np.float64)
    best_error = _after(w - start, h, rank) / total
    plain = best_error
    best: Refined | None = None
    a, b = eora_factors(w - start if init == "residual" else w, h, rank)
    for index in range(ROUNDS):
        rounded, extra = rounder(w - b @ a)
        rounded = np.asarray(rounded, np.float64)
        a, b = eora_factors(w - rounded, h, rank)
        error = _energy(w - rounded - b @ a, h) / total
        if error < best_error:
            best_error = error
            best = Refined(rounded, extra, plain, error, index + 1)
    return best


def _after(delta: np.ndarray, gram: np.ndarray, rank: int) -> float:
    a, b = eora_factors(delta, gram, rank)
    return _energy(delta - b @ a, gram)


def note(refined: int, layers: int, how: str) -> str:
    rest = "" if refined == layers else "; the others kept the pass's rounding (plain EoRA)"
    return (
        f"joint EoRA: {refined} of {layers} layers re-rounded with their path in view "
        f"({how}, up to {ROUNDS} rounds){rest}"
    )
