"""Shared speed measurement for the benchmarks: ORT CPU, paired and interleaved.

The project's rule: ORT CPU, 1 thread (2 threads reported too), warm-up, at least 20
paired interleaved rounds, median of the per-round ratios time(reference) / time(candidate).
Every candidate runs in the same process right after the reference in each round, so load
from other jobs on a shared machine hits both sides of a ratio alike. The rounds come from
:func:`graphopt.timing.interleaved` (which ``graphopt bench`` uses too).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphopt.timing import WARMUP, interleaved, pair_ratios


def add_library_options(parser: argparse.ArgumentParser) -> None:
    """``--library`` and ``--baseline-library``: the kernel benches' custom-op libraries."""
    parser.add_argument("--library", type=Path, help="custom-op library (default: package build)")
    parser.add_argument(
        "--baseline-library",
        type=Path,
        help="a second custom-op library (e.g. a copy of the previous build) timed in the same "
        "rounds as --library",
    )


def session(path: Path, threads: int, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def paired_speedups(
    paths: list[Path],
    feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    threads: int = 1,
    pairs: int = 20,
    inner: int = 1,
    optimize: bool = True,
) -> list[float]:
    """Per candidate ``paths[1:]``: median over rounds of time(paths[0]) / time(candidate).

    ``feeds`` may be one feed dict for all, or one per path (e.g. inputs renamed by a tool).
    """
    per_path = feeds if isinstance(feeds, list) else [feeds] * len(paths)
    sessions = [session(p, threads, optimize) for p in paths]

    def call(s: ort.InferenceSession, f: dict[str, np.ndarray]):
        def run() -> None:
            for _ in range(inner):
                s.run(None, f)

        return run

    # Warm-up as before: WARMUP single runs each, whatever ``inner`` is.
    for s, f in zip(sessions, per_path, strict=True):
        for _ in range(WARMUP):
            s.run(None, f)
    calls = [call(s, f) for s, f in zip(sessions, per_path, strict=True)]
    times = interleaved(calls, pairs, warmup=0)
    return [statistics.median(pair_ratios(times[0], t)) for t in times[1:]]


def invocation_speedups(
    paths: list[Path],
    feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    threads: int = 1,
    pairs: int = 20,
    invocations: int = 3,
) -> list[list[float]]:
    """:func:`paired_speedups` in ``invocations`` fresh processes, one after another: per
    candidate, one paired median per invocation (the issue targets' "paired medians of 3
    invocations"). A fresh process gets fresh sessions, allocations and thread pools, so the
    spread across invocations shows what one process's luck was worth."""
    per_invocation = []
    for _ in range(invocations):
        # spawn, not fork: a forked child would inherit this process's ORT thread pools.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_invocation.append(
                pool.submit(paired_speedups, paths, feeds, threads, pairs).result()
            )
    return [list(ratios) for ratios in zip(*per_invocation, strict=True)]
