"""Which weights a pattern keeps, given a score per weight (higher = more worth keeping).

Every function works on the canonical ``[N, K]`` layout (N outputs, K the reduction axis)
and returns a boolean keep-mask of the same shape. Ties break by position (stable sorts), so
the same scores always give the same mask.
"""

from __future__ import annotations

import numpy as np

from graphopt.passes.sparsity.settings import Pattern


def nm_mask(scores: np.ndarray, keep: int, group: int) -> np.ndarray:
    """Keep the ``keep`` best of every ``group`` consecutive K elements of each row."""
    n, k = scores.shape
    grouped = scores.reshape(n, k // group, group)
    # The lowest group-keep of each group go; a stable sort makes ties deterministic.
    order = np.argsort(grouped, axis=2, kind="stable")
    mask = np.ones_like(grouped, dtype=bool)
    np.put_along_axis(mask, order[:, :, : group - keep], False, axis=2)
    return mask.reshape(n, k)


def tile_scores(scores: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sum of ``scores`` over each ``rows`` × ``cols`` tile: ``[N/rows, K/cols]``."""
    n, k = scores.shape
    return scores.reshape(n // rows, rows, k // cols, cols).sum(axis=(1, 3))


def zeros_between(ratio: float, start: int, stop: int) -> int:
    """How many of the tiles ``start:stop`` of a row go, so that every prefix of the row
    loses ``round(ratio × length)`` tiles: a row cut into pieces (the reconstruction's
    column blocks) reaches exactly the share a whole row would."""
    return round(ratio * stop) - round(ratio * start)


def tile_mask(scores: np.ndarray, pattern: Pattern, first_tile: int = 0) -> np.ndarray:
    """Per row of tiles, zero the lowest-scoring tiles of ``scores`` (a column range of the
    weight starting at tile ``first_tile``, for :func:`zeros_between`'s quota)."""
    rows, cols = pattern.rows, pattern.cols
    tiles = tile_scores(scores, rows, cols)
    count = tiles.shape[1]
    drop = zeros_between(pattern.ratio, first_tile, first_tile + count)
    keep_tiles = np.ones_like(tiles, dtype=bool)
    if drop > 0:
        order = np.argsort(tiles, axis=1, kind="stable")
        np.put_along_axis(keep_tiles, order[:, :drop], False, axis=1)
    return np.repeat(np.repeat(keep_tiles, rows, axis=0), cols, axis=1)


def pattern_mask(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """The keep-mask of the whole weight under ``pattern``."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.keep, pattern.group)
    return tile_mask(scores, pattern)


def scores(weight: np.ndarray, criterion: str, energy: np.ndarray | None) -> np.ndarray:
    """Per-weight importance of ``weight`` [N, K]: ``|W|`` (magnitude) or Wanda's
    ``|W_ij| · ‖X_j‖`` with ``energy`` [K] the mean squared input per reduction feature."""
    magnitude = np.abs(weight.astype(np.float64))
    if criterion == "magnitude" or energy is None:
        return magnitude
    return magnitude * np.sqrt(np.maximum(np.asarray(energy, np.float64), 0.0))[None, :]
