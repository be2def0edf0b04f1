"""Paired, interleaved timing: the project's way of measuring speed on a shared machine.

Every round runs each candidate once, back to back, so load from other jobs hits all sides of
a ratio alike; ratios are taken per round (time(reference) / time(candidate)) and summarized
by their median, with p10-p90 as the spread. Rounds alternate the order (A B C, C B A, ...),
so a linear drift in machine speed falls on every candidate equally.

Each timed run directly follows an untimed run of the same candidate (``prime``): every
candidate is timed warm, as a model serving requests runs. Without it the caches favour
position: alternating A B C, C B A, A B C runs A and C twice in a row at every turn, their
weights still cached from the run before, while B always follows another model. Measured:
ResNet-50 int8 at batch 1 timed between two others read 3% slower than an equally fast variant
timed last (1% at batch 8), and a chain of sparse layers up to 20%.

Used by ``graphopt bench`` and by the scripts in ``bench/``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WARMUP = 3


def interleaved(
    calls: Sequence[Callable[[], object]],
    rounds: int,
    warmup: int = WARMUP,
    tick: Callable[[], None] | None = None,
    prime: bool = True,
) -> list[list[float]]:
    """Seconds per round for each of ``calls``: ``result[i][r]`` is call ``i`` in round ``r``.

    Each call runs ``warmup`` times first (allocations, ORT's first-run planning); with
    ``prime`` each timed run follows an untimed run of the same call (see the module
    docstring). ``tick`` is called after every round (a progress bar).
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for r in range(rounds):
        for i in order if r % 2 == 0 else reversed(order):
            if prime:
                calls[i]()
            start = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - start)
        if tick is not None:
            tick()
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between order statistics (numpy's default)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """Median with p10 and p90."""

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), percentile(values, 10), percentile(values, 90))


def pair_ratios(reference: Sequence[float], candidate: Sequence[float]) -> list[float]:
    """Per round: time(reference) / time(candidate); above 1 the candidate is faster."""
    return [r / c for r, c in zip(reference, candidate, strict=True)]
