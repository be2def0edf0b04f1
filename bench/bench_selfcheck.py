"""Self-check of ``graphopt bench``: does it measure what a plain ORT timing loop measures?

    python bench/bench_selfcheck.py                       # resnet18 and bert_tiny
    python bench/bench_selfcheck.py --models demo --runs 40 --json /tmp/selfcheck.json

Per model, three times in turn:

1. ``graphopt bench M M --json`` in a fresh process (the command as users run it: same
   model twice, so its ratio should be 1.00x);
2. a plain ORT loop in this process: the same session settings as bench's defaults (CPU,
   1 intra-op and 1 inter-op thread, sequential, ORT_ENABLE_ALL), the same generated inputs
   (graphopt's generator, seed 0), 3 warm-up runs, then ``--runs`` x 2 timed ``run`` calls.

Alternating the two spreads the machine's drift over both. Targets (issue 16): the median
over the three invocations of bench's ratio is within 0.95-1.05, and bench's median latency
(model #1) is within 10% of the plain loop's: the median over invocations of bench / plain,
each plain loop timed right after its invocation. Exit 0 when both hold for every model, 1
otherwise. On a shared machine the numbers are noisy: say so with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort

from graphopt import io
from graphopt.inputs import make_inputs

RATIO_RANGE = (0.95, 1.05)
LATENCY_AGREEMENT = 0.10
INVOCATIONS = 3


def bench_invocation(path: Path, runs: int) -> tuple[float, float]:
    """(ratio median, model #1 median latency in ms) from one ``graphopt bench M M``."""
    command = [sys.executable, "-m", "graphopt", "bench", str(path), str(path)]
    command += ["--runs", str(runs), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)["batches"][0]["models"]
    return rows[1]["ratio_to_first"]["median"], rows[0]["latency_ms"]["median"]


def plain_loop(path: Path, runs: int) -> float:
    """Median latency in ms of a bare ORT loop with bench's default settings and inputs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    feeds = make_inputs(io.load(path).model, seed=0)
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(2 * runs):  # bench times each model once per round; here twice as often
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check(path: Path, runs: int, invocations: int) -> dict:
    ratios, bench_ms, plain_ms = [], [], []
    for _ in range(invocations):
        ratio, latency = bench_invocation(path, runs)
        ratios.append(ratio)
        bench_ms.append(latency)
        plain_ms.append(plain_loop(path, runs))
    ratio = statistics.median(ratios)
    # Each plain loop runs right after its bench invocation: comparing them pair by pair
    # keeps the load of other processes, which changes over seconds, out of the agreement.
    agreement = statistics.median(b / p for b, p in zip(bench_ms, plain_ms, strict=True)) - 1
    return {
        "model": str(path),
        "ratios": ratios,
        "ratio_median": ratio,
        "ratio_ok": RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1],
        "bench_ms": bench_ms,
        "plain_ms": plain_ms,
        "latency_vs_plain": agreement,
        "latency_ok": abs(agreement) <= LATENCY_AGREEMENT,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="resnet18,bert_tiny",
        help="catalog names or .onnx paths, comma-separated (default resnet18,bert_tiny)",
    )
    parser.add_argument("--runs", type=int, default=20, help="bench rounds (default 20)")
    parser.add_argument(
        "--invocations",
        type=int,
        default=INVOCATIONS,
        help=f"bench invocations, each followed by a plain loop (default {INVOCATIONS})",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import graphopt.models as models

    results = []
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        path = Path(name) if name.endswith(".onnx") else models.get(name)
        row = check(path, args.runs, args.invocations)
        results.append(row)
        print(
            f"{Path(row['model']).name}: bench A A ratio median {row['ratio_median']:.3f} "
            f"(invocations {', '.join(f'{r:.3f}' for r in row['ratios'])}; target "
            f"{RATIO_RANGE[0]}-{RATIO_RANGE[1]}: {'ok' if row['ratio_ok'] else 'MISSED'}); "
            f"latency bench {statistics.median(row['bench_ms']):.3f} ms vs plain loop "
            f"{statistics.median(row['plain_ms']):.3f} ms (pairwise median "
            f"{row['latency_vs_plain']:+.1%}; "
            f"target within {LATENCY_AGREEMENT:.0%}: {'ok' if row['latency_ok'] else 'MISSED'})",
            flush=True,
        )
    print(f"onnxruntime {ort.__version__}, CPU; os.cpu_count() {os.cpu_count()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["ratio_ok"] and r["latency_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
