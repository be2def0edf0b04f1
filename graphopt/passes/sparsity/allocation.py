"""Per-layer sparsity shares allocated globally by measured error (``--sparsity-allocation
global``).

Each layer's relative error is measured at the shares of ``GRID`` (its output error on
calibration inputs from the Hessian, ``‖XΔWᵀ‖² / ‖XWᵀ‖²``, or without data its weight error),
with the run's criterion's mask (reconstruction, whose errors need a full solve per share,
is measured with Wanda's mask: a proxy that ranks layers alike at a fraction of the cost).
A greedy walk then raises, one ``GRID`` step at a time, the share of the layer whose error
grows least per weight zeroed, until the parameter-weighted mean share reaches the target;
the last step is cut to land on the target exactly. Errors are relative per layer, so a
layer's share of the end-to-end error is weighed alike whatever its scale.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Shares measured per layer (0 = dense).
GRID = tuple(round(x, 2) for x in np.arange(0.0, 0.951, 0.05))


def allocate(
    errors: list[list[float]], params: list[int], target: float, grid: tuple[float, ...] = GRID
) -> list[float]:
    """Per-layer shares whose parameter-weighted mean is ``target``, least summed error.

    ``errors[i][j]``: layer i's error at share ``grid[j]``.
    """
    if not errors:
        return []
    total = float(sum(params))
    level = [0] * len(errors)
    reached = 0.0
    while reached < target * total - 1e-9:
        best, best_cost = -1, np.inf
        for i, curve in enumerate(errors):
            j = level[i]
            if j + 1 >= len(grid):
                continue
            gained = params[i] * (grid[j + 1] - grid[j])
            cost = (curve[j + 1] - curve[j]) / gained if gained > 0 else np.inf
            if cost < best_cost:
                best, best_cost = i, cost
        if best < 0:
            break  # every layer at the top of the grid: the target is out of reach
        j = level[best]
        step = params[best] * (grid[j + 1] - grid[j])
        missing = target * total - reached
        if step > missing:
            # The last step: only as far as the target needs.
            shares = [grid[k] for k in level]
            shares[best] = grid[j] + missing / params[best]
            return shares
        level[best] += 1
        reached += step
    return [grid[k] for k in level]


def error_curves(
    count: int, measure: Callable[[int, float], float], grid: tuple[float, ...] = GRID
) -> list[list[float]]:
    """``measure(layer index, share)`` at every share of ``grid`` for each layer."""
    return [[measure(i, share) if share > 0 else 0.0 for share in grid] for i in range(count)]
