"""Portable-fusion benchmark (issue 4): graphopt vs onnxslim vs onnxsim, side by side.

For every model, each tool's default command line is run once:

    graphopt optimize IN -o OUT      (default: portable target, verified against the original)
    onnxslim IN OUT
    onnxsim IN OUT

and the table reports the non-Constant node count (subgraphs included) of the original and
of each output, each output's max error relative to the original's largest magnitude (ORT
CPU, generated inputs), and ONNX Runtime CPU speed:

    vs slim   graphopt's output vs onnxslim's, at ORT_ENABLE_ALL and ORT_DISABLE_ALL
    vs orig   graphopt's output vs the original, at ORT_DISABLE_ALL (graphopt's own fusions
              are all that run there)

Method: one session per model and setting (sequential execution, ``--threads`` intra-op
threads), warm-up, then ``--pairs`` interleaved rounds (original, graphopt, onnxslim in
turn, the order rotating every round), each model timed over ``--inner`` runs per round
(more for fast models, so that a round takes ≥ 30 ms) after one untimed run of its own. A
speed ratio is the median over rounds of t(other) / t(graphopt): above 1 means graphopt's
output is faster.

The nine ``light_*`` models are the catalog's randomized copies of ONNX's light zoo
(``graphopt.models.light``: seeded random weights as initializers, as issue 4 asks), not the
shipped files with ConstantOfShape weights.

Usage: python bench/fusion.py [--models a,b] [--pairs 20] [--inner 1] [--threads 1,2]
                              [--graphopt-args '--fold-limit none'] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from erasure import BIN, LIGHT_MODELS, max_relative_error, model_paths

from graphopt.analysis.stats import count_nodes
from graphopt.inputs import make_inputs
from graphopt.io import load

TOOLS = ("graphopt", "onnxslim", "onnxsim")
BUILT_MODELS = [
    "resnet50",
    "mobilenet_v3_large",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "bert_tiny",
    "gpt2_tiny",
    "bert_tiny_ts",
    "minilm",
    "minilm_ts",
    "ppocr_det",
    "ppocr_rec",
]
LEVELS = ("all", "disable")


@dataclass
class Result:
    label: str
    original: int
    nodes: dict[str, int | None] = field(default_factory=dict)
    max_rel: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    # (level, threads) -> {"slim": ratio, "orig": ratio}
    speed: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)


def command(tool: str, src: Path, dst: Path, extra: list[str]) -> list[str]:
    """Each tool's default command line (graphopt's default is the portable target)."""
    if tool == "graphopt":
        return [str(BIN / "graphopt"), "optimize", str(src), "-o", str(dst), *extra]
    return [str(BIN / tool), str(src), str(dst)]


def make_session(path: Path, level: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if level == "all"
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def timed(session, feeds: dict[str, np.ndarray], inner: int) -> float:
    began = time.perf_counter()
    for _ in range(inner):
        session.run(None, feeds)
    return (time.perf_counter() - began) / inner


def speed_ratios(
    paths: dict[str, Path], feeds, level: str, threads: int, pairs: int, inner: int
) -> dict[str, float]:
    """Median per-round ratios t(onnxslim)/t(graphopt) and t(original)/t(graphopt)."""
    sessions = {name: make_session(path, level, threads) for name, path in paths.items()}
    for session in sessions.values():  # warm-up (allocations, thread pool)
        timed(session, feeds, 2)
    # Small models run in microseconds: time enough runs per round (≥ ~30 ms) that the
    # timer and scheduler noise do not decide the ratio.
    single = min(timed(session, feeds, 1) for session in sessions.values())
    inner = max(inner, math.ceil(0.03 / max(single, 1e-6)))
    rounds: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for i in range(pairs):
        # Interleaved, so load drift hits all alike; the order rotates every round so that no
        # model always runs right after the same other one (caches, CPU frequency).
        for name in order[i % len(order) :] + order[: i % len(order)]:
            # Primed: an untimed run first, so no model's first run of a turn is the cold
            # one after another model's (graphopt/timing.py does the same).
            sessions[name].run(None, feeds)
            rounds[name].append(timed(sessions[name], feeds, inner))
    ours = rounds["graphopt"]
    return {
        other: statistics.median(t / g for t, g in zip(rounds[other], ours, strict=True))
        for other in ("onnxslim", "original")
        if other in rounds
    }


def bench_model(label: str, path: Path, shapes, args) -> Result:
    original = load(path).model
    result = Result(label, count_nodes(original))
    with tempfile.TemporaryDirectory(prefix="bench-fusion-") as tmp:
        outputs: dict[str, Path] = {}
        for tool in TOOLS:
            out = Path(tmp) / f"{tool}.onnx"
            proc = subprocess.run(
                command(tool, path, out, args.graphopt_args.split()),
                capture_output=True,
                text=True,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            )
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()
                result.errors[tool] = tail[-1][:120] if tail else f"exit {proc.returncode}"
                result.nodes[tool] = result.max_rel[tool] = None
                continue
            outputs[tool] = out
            result.nodes[tool] = count_nodes(load(out).model)
            try:
                result.max_rel[tool] = max_relative_error(original, out, shapes)
            except Exception as exc:
                result.max_rel[tool] = float("nan")
                result.errors[tool] = f"output does not run: {str(exc).splitlines()[0][:100]}"
        if args.pairs and "graphopt" in outputs:
            paths = {"original": path, "graphopt": outputs["graphopt"]}
            if "onnxslim" in outputs:
                paths["onnxslim"] = outputs["onnxslim"]
            feeds = make_inputs(original, shapes, seed=0)
            for level in LEVELS:
                for threads in args.threads:
                    result.speed[(level, threads)] = speed_ratios(
                        paths, feeds, level, threads, args.pairs, args.inner
                    )
    return result


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}×"


def fmt_err(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def markdown(rows: list[Result], threads: list[int]) -> str:
    head = ["model", "original"] + [f"{t} nodes" for t in TOOLS] + ["nodes ≤ both"]
    head += [f"{t} max rel err" for t in TOOLS]
    for n in threads:
        head += [f"vs slim ALL {n}t", f"vs slim DISABLE {n}t", f"vs orig DISABLE {n}t"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label, str(row.original)]
        cells += [
            str(row.nodes[t]) if row.nodes.get(t) is not None else f"fail: {row.errors.get(t)}"
            for t in TOOLS
        ]
        ours = row.nodes.get("graphopt")
        peers = [row.nodes[t] for t in TOOLS[1:] if row.nodes.get(t) is not None]
        cells.append("yes" if ours is not None and all(ours <= p for p in peers) else "NO")
        cells += [fmt_err(row.max_rel.get(t)) for t in TOOLS]
        for n in threads:
            every = row.speed.get(("all", n), {})
            off = row.speed.get(("disable", n), {})
            cells += [
                fmt_ratio(every.get("onnxslim")),
                fmt_ratio(off.get("onnxslim")),
                fmt_ratio(off.get("original")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset (light_* or catalog names)")
    parser.add_argument("--pairs", type=int, default=20, help="interleaved rounds (0: no speed)")
    parser.add_argument("--inner", type=int, default=1, help="runs timed per round (at least)")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument(
        "--graphopt-args", default="", help="extra graphopt options, e.g. '--fold-limit none'"
    )
    args = parser.parse_args()
    args.threads = [int(n) for n in args.threads.split(",")]
    names = (
        args.models.split(",")
        if args.models
        else ([f"light_{m}" for m in LIGHT_MODELS] + BUILT_MODELS)
    )
    for tool in TOOLS[1:]:
        if shutil.which(tool, path=str(BIN)) is None:
            print(f"{tool} is not installed (pip install -e '.[dev]')", file=sys.stderr)
            return 2
    rows = []
    for label, path, shapes in model_paths(names):
        row = bench_model(label, path, shapes, args)
        rows.append(row)
        nodes = ", ".join(f"{t} {row.nodes.get(t)}" for t in TOOLS)
        errs = ", ".join(f"{t} {fmt_err(row.max_rel.get(t))}" for t in TOOLS)
        speed = "; ".join(
            f"{level} {n}t: "
            + ", ".join(f"vs {k} {fmt_ratio(v)}" for k, v in row.speed[(level, n)].items())
            for (level, n) in row.speed
        )
        fails = "".join(f" [{t}: {e}]" for t, e in row.errors.items())
        # The machine is shared: the load average says how much to trust the ratios.
        load = f"load {os.getloadavg()[0]:.1f}"
        print(f"{label}: {row.original} nodes; {nodes}; err {errs}; {speed}{fails}; {load}")
        sys.stdout.flush()
    table = markdown(rows, args.threads if args.pairs else [])  # --pairs 0: no speed columns
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
