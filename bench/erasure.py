"""Erasure benchmark: graphopt vs onnxslim vs onnxsim, side by side in one run.

For every model: non-Constant node count (subgraphs included) of each tool's output, the
whole-process wall time of each tool's command line (median of ``--repeat`` interleaved
runs), and each output's max error relative to the original's largest magnitude (ORT CPU,
generated inputs). Commands compared:

    graphopt optimize IN -o OUT --no-verify --fold-limit none
    onnxslim IN OUT
    onnxsim IN OUT            (its default output check left on: that is how users run it)

The nine ``light_*`` models are the catalog's randomized copies of ONNX's light zoo
(``graphopt.models.light``: seeded random weights as initializers), not the shipped files,
whose ConstantOfShape weights make an optimizer's constant-folding size limit, not its
rewrites, decide the node count.

Usage: python bench/erasure.py [--models a,b] [--repeat 3] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from graphopt.analysis.stats import count_nodes
from graphopt.inputs import make_inputs
from graphopt.io import load
from graphopt.output_errors import compare
from graphopt.verify import run_model

LIGHT_MODELS = [
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
]
BUILT_MODELS = [
    "resnet50",
    "mobilenet_v3_large",
    "convnext_tiny",
    "minilm",
    "ppocr_det",
    "ppocr_rec",
    # The same kinds of model from the TorchScript exporter (dynamo=False), which leaves far
    # more for an optimizer to do than the dynamo exporter.
    "resnet18_ts",
    "efficientnet_b0_ts",
    "minilm_ts",
]
BIN = Path(sys.executable).parent


@dataclass
class ToolRun:
    nodes: int | None = None
    seconds: list[float] = field(default_factory=list)
    max_rel: float | None = None
    error: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def tool_command(tool: str, src: Path, dst: Path) -> list[str]:
    if tool == "graphopt":
        return [
            str(BIN / "graphopt"),
            "optimize",
            str(src),
            "-o",
            str(dst),
            "--no-verify",
            "--fold-limit",
            "none",
        ]
    if tool == "onnxslim":
        return [str(BIN / "onnxslim"), str(src), str(dst)]
    if tool == "onnxsim":
        return [str(BIN / "onnxsim"), str(src), str(dst)]
    raise ValueError(tool)


def model_paths(names: list[str]) -> list[tuple[str, Path, dict[str, tuple[int, ...]]]]:
    """(label, path, input shapes) for every benchmark model (built into the model cache).

    ``light_<name>`` is the light zoo model with seeded random weights (catalog entry).
    """
    from graphopt import models

    result = []
    for name in names:
        path = models.get(name)
        result.append((name, path, models.input_shapes(name)))
    return result


def max_relative_error(original, candidate_path: Path, shapes) -> float:
    candidate = load(candidate_path).model
    feeds = make_inputs(original, shapes, seed=0)
    ref = run_model(original, feeds)
    got = run_model(candidate, feeds)
    return max(compare(str(i), r, g).max_rel for i, (r, g) in enumerate(zip(ref, got, strict=True)))


def bench_model(label: str, path: Path, shapes, repeat: int, tools: list[str]) -> dict:
    original = load(path).model
    runs = {tool: ToolRun() for tool in tools}
    with tempfile.TemporaryDirectory(prefix="bench-erasure-") as tmp:
        for _ in range(repeat):
            for tool in tools:  # interleaved, so drift in machine load hits every tool alike
                run = runs[tool]
                if run.error:
                    continue
                out = Path(tmp) / f"{tool}.onnx"
                began = time.perf_counter()
                proc = subprocess.run(
                    tool_command(tool, path, out),
                    capture_output=True,
                    text=True,
                    env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                )
                elapsed = time.perf_counter() - began
                if proc.returncode != 0 or not out.exists():
                    tail = (proc.stderr or proc.stdout).strip().splitlines()
                    run.error = tail[-1][:120] if tail else f"exit {proc.returncode}"
                    continue
                run.seconds.append(elapsed)
                if run.nodes is None:
                    run.nodes = count_nodes(load(out).model)
                    try:
                        run.max_rel = max_relative_error(original, out, shapes)
                    except Exception as exc:
                        run.max_rel = float("nan")
                        run.error = f"output does not run: {str(exc).splitlines()[0][:100]}"
    return {"label": label, "nodes": count_nodes(original), "runs": runs}


def fmt_time(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def fmt_err(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def markdown(rows: list[dict], tools: list[str]) -> str:
    head = ["model", "original"] + [f"{t} nodes" for t in tools]
    head += [f"{t} s" for t in tools] + ["graphopt / onnxslim time"]
    head += [f"{t} max rel err" for t in tools] + ["nodes ≤ both peers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        runs = row["runs"]
        cells = [row["label"], str(row["nodes"])]
        cells += [
            str(runs[t].nodes) if runs[t].nodes is not None else f"fail: {runs[t].error}"
            for t in tools
        ]
        cells += [fmt_time(runs[t].median) for t in tools]
        g, s = runs["graphopt"].median, runs.get("onnxslim", ToolRun()).median
        cells.append(f"{g / s:.2f}×" if g and s else "—")
        cells += [fmt_err(runs[t].max_rel) for t in tools]
        peers = [runs[t].nodes for t in tools if t != "graphopt" and runs[t].nodes is not None]
        ours = runs["graphopt"].nodes
        cells.append("yes" if ours is not None and all(ours <= p for p in peers) else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset (light_* or built names)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tools", default="graphopt,onnxslim,onnxsim")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    names = (
        args.models.split(",")
        if args.models
        else ([f"light_{m}" for m in LIGHT_MODELS] + BUILT_MODELS)
    )
    tools = args.tools.split(",")
    for tool in tools:
        if tool != "graphopt" and shutil.which(tool, path=str(BIN)) is None:
            print(f"{tool} is not installed (pip install -e '.[dev]')", file=sys.stderr)
            return 2
    rows = []
    for label, path, shapes in model_paths(names):
        row = bench_model(label, path, shapes, args.repeat, tools)
        rows.append(row)
        runs = row["runs"]
        summary = ", ".join(
            f"{t} {runs[t].nodes} nodes {fmt_time(runs[t].median)} s {fmt_err(runs[t].max_rel)}"
            + (f" [{runs[t].error}]" if runs[t].error else "")
            for t in tools
        )
        print(f"{label}: {row['nodes']} nodes; {summary}", flush=True)
    table = markdown(rows, tools)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
