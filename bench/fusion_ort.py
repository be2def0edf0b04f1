"""``--target ort`` benchmark: graphopt's contrib-op fusions vs the original vs ORT's optimizer.

For every model: is attention fused (com.microsoft Attention / MultiHeadAttention /
GroupQueryAttention nodes in graphopt's output), and ONNX Runtime CPU speed at batch 1,
sequence length 128 (ORT_ENABLE_ALL, sequential execution, 1 and 2 intra-op threads) of

    original     the exported model as given
    ours         graphopt optimize IN --target ort (verified against the original at 1x128)
    ort-opt      onnxruntime.transformers.optimizer.optimize_model(IN, model_type, num_heads,
                 hidden_size) with its defaults

Method: ``graphopt.timing.interleaved``: warm-up, then ``--pairs`` rounds in alternating
order (original, ours, ort-opt; then reversed), each timed turn of ``--inner`` runs primed by
an untimed turn of the same model; the speed-up is the median of the per-round ratios
original/candidate. Max rel err: graphopt's output vs the original (ORT_ENABLE_ALL), as
max|a-b| / max|a| over outputs.

Usage: python bench/fusion_ort.py [--models a,b] [--pairs 25] [--inner 5] [--seq 128]
                                 [--skip pass,pass]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphopt import api, models
from graphopt.inputs import make_inputs
from graphopt.io import load
from graphopt.output_errors import compare
from graphopt.timing import interleaved, pair_ratios

# name: (model_type for ORT's optimizer or None, num_heads, hidden_size)
MODELS: dict[str, tuple[str | None, int, int]] = {
    "bert_tiny": ("bert", 4, 128),
    "bert_tiny_ts": ("bert", 4, 128),
    "gpt2_tiny": ("gpt2", 4, 128),
    "gpt2_tiny_ts": ("gpt2", 4, 128),
    "minilm": ("bert", 12, 384),
    "minilm_ts": ("bert", 12, 384),
    # Grouped-query attention (4 query heads, 2 K/V heads). ORT's transformers optimizer has
    # no LLaMA/Qwen2 model type (ORT builds those with its GenAI model builder): not run.
    "llama_tiny": (None, 4, 128),
    "qwen2_tiny": (None, 4, 128),
    "llama_tiny_ts": (None, 4, 128),
}
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


@dataclass
class Row:
    model: str
    attention: str
    speedup: dict[int, float]
    ort_speedup: dict[int, float | None]
    max_rel: float
    no_ort_type: bool = False  # ORT's optimizer has no model type for it (not run)


def feeds_for(path: Path, seq: int) -> dict[str, np.ndarray]:
    """Seeded token ids; an all-ones attention mask and zero token types (a real batch)."""
    model = load(path).model
    shapes = {v.name: (1, seq) for v in model.graph.inputs}
    feeds = make_inputs(model, shapes, seed=0)
    for name in feeds:
        if "mask" in name:
            feeds[name] = np.ones_like(feeds[name])
        elif "token_type" in name:
            feeds[name] = np.zeros_like(feeds[name])
    return feeds


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def ort_optimizer(path: Path, out: Path, model_type: str, heads: int, hidden: int) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(
        os.fspath(path), model_type=model_type, num_heads=heads, hidden_size=hidden
    )
    optimized.save_model_to_file(os.fspath(out))
    return out


def speedups(
    paths: list[Path], feeds: dict[str, np.ndarray], threads: int, pairs: int, inner: int
) -> list[float]:
    """Median over interleaved rounds of time(original) / time(candidate), per candidate
    (``graphopt.timing``: alternating order, each timed turn primed by an untimed one)."""
    sessions = [session(p, threads) for p in paths]

    def turn(s: ort.InferenceSession):
        def call() -> None:
            for _ in range(inner):
                s.run(None, feeds)

        return call

    times = interleaved([turn(s) for s in sessions], rounds=pairs)
    return [statistics.median(pair_ratios(times[0], t)) for t in times[1:]]


def bench_model(name: str, tmp: Path, args: argparse.Namespace) -> Row:
    model_type, heads, hidden = MODELS[name]
    original = Path(models.get(name))
    feeds = feeds_for(original, args.seq)
    ours = tmp / f"{name}.ort.onnx"
    options = api.OptimizeOptions(
        target="ort",
        input_shapes={k: v.shape for k, v in feeds.items()},
        skip=[p for p in args.skip.split(",") if p],
    )
    result = api.optimize(original, ours, options)
    found = Counter(n.op_type for n in result.model.graph if n.domain == "com.microsoft")
    fused = {op: found[op] for op in ATTENTION_OPS if found[op]}
    attention = ", ".join(f"{n} {op}" for op, n in fused.items()) if fused else "no"
    theirs = None
    try:
        if model_type is not None:
            theirs = ort_optimizer(original, tmp / f"{name}.ortopt.onnx", model_type, heads, hidden)
    except Exception as exc:  # ORT's optimizer crashes on some exports; report, don't stop
        print(f"{name}: ORT's transformers optimizer failed: {type(exc).__name__}: {exc}")

    ref = session(original, 1).run(None, feeds)
    got = session(ours, 1).run(None, feeds)
    max_rel = max(
        compare(str(i), r, g).max_rel for i, (r, g) in enumerate(zip(ref, got, strict=True))
    )

    speedup, ort_speedup = {}, {}
    for threads in (1, 2):
        candidates = [original, ours] + ([theirs] if theirs else [])
        ratios = speedups(candidates, feeds, threads, args.pairs, args.inner)
        speedup[threads] = ratios[0]
        ort_speedup[threads] = ratios[1] if theirs else None
    return Row(name, attention, speedup, ort_speedup, max_rel, model_type is None)


def _x(ratio: float | None, not_run: bool = False) -> str:
    if not_run:
        return "n/a"
    return "failed" if ratio is None else f"{ratio:.2f}x"


def table(rows: list[Row]) -> str:
    lines = [
        "| model | attention fused? | ours/original 1 thread | ours/original 2 threads "
        "| ORT optimizer/original 1 thread | ORT optimizer/original 2 threads | max rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.attention} | {r.speedup[1]:.2f}x | {r.speedup[2]:.2f}x "
            f"| {_x(r.ort_speedup[1], r.no_ort_type)} | {_x(r.ort_speedup[2], r.no_ort_type)} "
            f"| {r.max_rel:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--pairs", type=int, default=25)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--seq", type=int, default=128)
    # e.g. --skip ort-group-query-attention: the --target ort output without that pass
    parser.add_argument("--skip", default="", help="graphopt passes to skip, comma-separated")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-ort-") as tmp:
        for name in args.models.split(","):
            rows.append(bench_model(name, Path(tmp), args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
