"""Ranks for ``--factorize flops=R``: the least total error that removes R of the model's FLOPs.

Each layer offers options: stay whole (no error, nothing saved) or one of its aligned ranks
(its measured relative output error, the FLOPs that rank saves at the run's shapes). For a
price λ every layer independently takes the option minimizing ``error − λ · saved``; the
FLOPs saved grow with λ, so a bisection on λ finds the smallest price that meets the target.
That is the Lagrangian relaxation of "minimize Σ error subject to Σ saved ≥ target": its
solutions are exactly the allocations on the lower convex hull of the error-vs-FLOPs
trade-off, whatever the shape of each layer's curve (the first rank below break-even saves
little, a plain greedy on marginal ratios stalls there).
"""

from __future__ import annotations

from dataclasses import dataclass

ROUNDS = 100


@dataclass(frozen=True)
class Option:
    rank: int
    error: float
    saved: int  # FLOPs saved at the run's shapes


@dataclass
class Allocation:
    ranks: list[int | None]  # per layer: the rank, or None (left whole)
    saved: int
    target: int

    @property
    def shortfall(self) -> int:
        return max(self.target - self.saved, 0)


def _choose(options: list[list[Option]], price: float) -> tuple[list[int | None], int]:
    ranks: list[int | None] = []
    saved = 0
    for layer in options:
        best, best_cost = None, 0.0  # whole: no error, no saving
        for option in layer:
            cost = option.error - price * option.saved
            if cost < best_cost:
                best, best_cost = option, cost
        ranks.append(None if best is None else best.rank)
        saved += 0 if best is None else best.saved
    return ranks, saved


def allocate(options: list[list[Option]], target: int) -> Allocation:
    """Per layer a rank (or None) saving at least ``target`` FLOPs at the least total error;
    when even the smallest ranks everywhere fall short, those (and the shortfall)."""
    most = [max(layer, key=lambda o: o.saved, default=None) for layer in options]
    reachable = sum(o.saved for o in most if o is not None)
    if reachable <= target:
        return Allocation([None if o is None else o.rank for o in most], reachable, target)
    low, high = 0.0, 1.0
    while _choose(options, high)[1] < target:
        high *= 4.0
    for _ in range(ROUNDS):
        middle = (low + high) / 2
        if _choose(options, middle)[1] >= target:
            high = middle
        else:
            low = middle
    ranks, saved = _choose(options, high)
    return Allocation(ranks, saved, target)
