"""MiniLM with block-sparse FFN weights: lowered to graphopt's sparse kernels vs dense ORT.

    python bench/sparse_minilm.py [--work DIR] [--pairs 20] [--markdown OUT.md]

One command. MiniLM (real weights) is optimized three ways, all ``--target ort``:

- **dense**: the exact passes only (the baseline a user runs today);
- **zeros**: ``--sparsity block:1x4=0.8 --sparsity-layers ffn`` (magnitude), stored dense;
- **lowered**: the zeros model with ``--sparse-kernels`` (the crossover decides per layer).

Speed: ORT CPU, ORT_ENABLE_ALL, seq 128, batch 1 and 8, 1 and 2 threads, warm-up, ``--pairs``
paired interleaved rounds (dense, zeros, lowered in each, alternating order, each timed run
primed by an untimed one), median ms per model and median of
the per-round ratios time(dense) / time(candidate). Fidelity: mean cosine of the sentence
embeddings against the dense original on ``--sentences`` evaluation sentences (seq 128).
The markdown states the date, versions, CPU, kernel ISA and load, and the per-layer
decisions. Timings on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import graphopt
from graphopt.api import OptimizeOptions, optimize
from graphopt.backends.ort_custom_ops import own_session_options, uses_own_kernels
from graphopt.models import build
from graphopt.models.sentences import mean_cosine, minilm_npz, sentences, tokenize
from graphopt.passes.sparsity.lowering import METADATA_KEY
from graphopt.timing import interleaved, pair_ratios

SEQ = 128
WARMUP = 3


def session(path: Path, threads: int) -> ort.InferenceSession:
    proto = onnx.load(str(path), load_external_data=False)
    options = own_session_options() if uses_own_kernels(proto) else ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(path: Path, texts: list[str], batch: int = 16) -> np.ndarray:
    """Mean-pooled sentence embeddings (the model's ``sentence_embedding`` output)."""
    run = session(path, 0)
    feeds = tokenize(texts, SEQ)
    chunks = []
    for start in range(0, len(texts), batch):
        part = {k: v[start : start + batch] for k, v in feeds.items()}
        chunks.append(run.run(["sentence_embedding"], part)[0])
    return np.concatenate(chunks).astype(np.float64)


def paired(paths: list[Path], feeds: dict[str, np.ndarray], threads: int, pairs: int):
    """Median ms per model and median ratio time(paths[0]) / time(other), per other
    (:func:`graphopt.timing.interleaved`: alternating order, each timed run primed)."""
    runs = [session(p, threads) for p in paths]
    calls = [lambda run=run: run.run(None, feeds) for run in runs]
    times = [[t * 1e3 for t in ts] for ts in interleaved(calls, pairs, warmup=WARMUP)]
    medians = [statistics.median(t) for t in times]
    ratios = [statistics.median(pair_ratios(times[0], t)) for t in times[1:]]
    return medians, ratios


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def kernel_isa() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "graphopt.kernels", "info"], capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if "isa" in line.lower()]
    return "; ".join(lines) or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparse_minilm"))
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--sparsity", default="block:1x4=0.8")
    parser.add_argument("--layers", default="ffn")
    parser.add_argument(
        "--calib",
        type=int,
        default=0,
        help="calibration sentences for the sparsify pass (its reconstruction criterion); "
        "0: magnitude, no data (fast)",
    )
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    minilm = build("minilm")
    paths = {name: args.work / f"{name}.onnx" for name in ("dense", "zeros", "lowered")}
    sparse = {"sparsity": args.sparsity, "sparsity_layers": args.layers}
    if args.calib:
        sparse["calib"] = str(minilm_npz(args.work / "calib.npz", "calib", args.calib))
    # The lowered model is the zeros model lowered: the same weights, only the ops differ.
    runs = {
        "dense": (minilm, OptimizeOptions(target="ort")),
        "zeros": (minilm, OptimizeOptions(target="ort", **sparse)),
        "lowered": (paths["zeros"], OptimizeOptions(target="ort", sparse_kernels=True)),
    }
    decide_s = 0.0
    for name, (source, options) in runs.items():
        report = optimize(source, paths[name], options).report
        decide_s += sum(s.seconds for s in report.stats if s.name == "sparse-kernels")
    record = json.loads(
        {p.key: p.value for p in onnx.load(str(paths["lowered"])).metadata_props}[METADATA_KEY]
    )
    texts = sentences("eval", args.sentences)
    reference = embed(Path(minilm), texts)
    cosine = {name: mean_cosine(reference, embed(paths[name], texts)) for name in paths}

    lines = [
        f"# MiniLM, {args.sparsity} FFN sparsity: graphopt sparse kernels vs dense ORT",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}; command: "
        f"`python bench/sparse_minilm.py --pairs {args.pairs} --sparsity {args.sparsity} "
        f"--layers {args.layers} --calib {args.calib}`",
        f"- graphopt {graphopt.__version__}, onnxruntime {ort.__version__}, numpy "
        f"{np.__version__}; CPU: {cpu_model()} ({os.cpu_count()} cores); kernels: "
        f"{kernel_isa()}",
        f"- load average before timing: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- fidelity (mean cosine vs the dense original, {len(texts)} sentences, seq {SEQ}): "
        f"dense {cosine['dense']:.6f}, zeros {cosine['zeros']:.6f}, lowered "
        f"{cosine['lowered']:.6f}",
        f"- crossover decision time (sparse-kernels pass, incl. cached/measured timings): "
        f"{decide_s:.2f} s; layers lowered: "
        f"{sum(e['lowered'] for e in record['layers'])} of {len(record['layers'])}",
        "",
        "| batch | threads | dense ms | zeros ms | lowered ms | dense/zeros | dense/lowered |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in (1, 8):
        feeds = tokenize(sentences("eval", batch), SEQ)
        for threads in (1, 2):
            order = [paths["dense"], paths["zeros"], paths["lowered"]]
            (dense, zeros, lowered), (r_zeros, r_lowered) = paired(
                order, feeds, threads, args.pairs
            )
            lines.append(
                f"| {batch} | {threads} | {dense:.2f} | {zeros:.2f} | {lowered:.2f} | "
                f"{r_zeros:.3f} | {r_lowered:.3f} |"
            )
    lines += [
        f"\nload average after timing: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "Per layer (the crossover's one-layer timings, fastest of 15 rounds; fused: epilogue "
        "in the op; separate: activation left to ORT):",
        "",
        "| layer | K | N | M | sparsity | format | dense ms | fused ms | separate ms "
        "| epilogue | speedup | lowered |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for e in record["layers"]:
        lines.append(
            f"| {e['layer']} | {e['K']} | {e['N']} | {e['M']} | {e['sparsity']:.3f} | "
            f"{e['format']} | {e['dense_ms']} | {e['sparse_ms']} | {e.get('separate_ms', '')} "
            f"| {e.get('epilogue', '')} | {e['speedup']} | {'yes' if e['lowered'] else 'no'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
