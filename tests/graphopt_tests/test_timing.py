"""graphopt.timing: interleaved rounds in alternating order, percentiles, per-round ratios."""

from __future__ import annotations

import time

import numpy as np
import pytest

from graphopt.timing import Spread, interleaved, pair_ratios, percentile


def test_rounds_alternate_order_after_warmup() -> None:
    calls: list[str] = []
    ticks: list[int] = []
    runs = [lambda name=name: calls.append(name) for name in "abc"]
    times = interleaved(
        runs, rounds=3, warmup=2, tick=lambda: ticks.append(len(calls)), prime=False
    )
    # Warm-up: each twice in turn; then a b c, c b a, a b c.
    assert calls == list("aabbcc") + list("abc") + list("cba") + list("abc")
    assert ticks == [9, 12, 15]
    assert [len(t) for t in times] == [3, 3, 3] and all(s >= 0 for t in times for s in t)


def test_each_timed_run_follows_a_run_of_itself() -> None:
    """Primed (the default): whatever the order, every timed run directly follows an untimed
    run of the same call, so no position in the round is warmer than another."""
    calls: list[str] = []
    runs = [lambda name=name: calls.append(name) for name in "abc"]
    times = interleaved(runs, rounds=2, warmup=1)
    assert calls == list("abc") + list("aabbcc") + list("ccbbaa")
    assert [len(t) for t in times] == [2, 2, 2]
    # Times are taken of the second run of each pair: a call that is slow when cold shows it
    # only in the untimed run.
    state = {"last": None}

    def cold_slow(name: str) -> None:
        if state["last"] != name:
            time.sleep(0.02)
        state["last"] = name

    slow = [lambda name=name: cold_slow(name) for name in "ab"]
    times = interleaved(slow, rounds=3, warmup=0)
    assert max(max(t) for t in times) < 0.015


def test_rounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        interleaved([lambda: None], rounds=0)


def test_percentile_matches_numpy_linear() -> None:
    values = list(np.random.default_rng(0).standard_normal(37))
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    spread = Spread.of([3.0, 1.0, 2.0])
    assert (spread.median, spread.p10, spread.p90) == (2.0, pytest.approx(1.2), pytest.approx(2.8))


def test_pair_ratios_are_reference_over_candidate_per_round() -> None:
    assert pair_ratios([2.0, 3.0], [1.0, 3.0]) == [2.0, 1.0]
    with pytest.raises(ValueError):
        pair_ratios([1.0], [1.0, 2.0])


def test_the_suite_keeps_its_timings_out_of_the_users_cache() -> None:
    """Timings measured while the suite loads the machine steered later real runs (they
    were written to ~/.cache/graphopt): the conftest gives the session its own folder."""
    from pathlib import Path

    from graphopt.passes.sparsity.crossover import cpu_cache_file

    home_cache = Path.home() / ".cache"
    assert home_cache not in cpu_cache_file("autotune", "times").parents
