"""Verification cost: `graphopt optimize M` with and without verification, vs a baseline commit.

For every model of the erasure table, four command lines are timed as whole processes (start-up
and imports included), interleaved in a rotating order, ``--repeat`` times each:

    new             python -m graphopt optimize M -o OUT               (this checkout)
    new --no-verify python -m graphopt optimize M -o OUT --no-verify   (this checkout)
    old             the same two, run from a copy of the baseline commit's tree
    old --no-verify

Each runs with its tree as the working directory, so ``python -m graphopt`` imports that tree's
package. The verification's cost is the median default time minus the median ``--no-verify``
time of the same code, by wall time and by CPU time (user + system of the process, all
threads; less sensitive to other load); its share is the wall cost over the default time.
The "shapes" column is what the current report says it checked ("checked at 2 input shapes"
when the model has symbolic dims).

The baseline is ``--baseline REV`` (extracted read-only with ``git archive REV | tar -x``
into a temporary folder) or ``--baseline-dir DIR`` (a tree already extracted).

Usage: python bench/verify_cost.py --baseline 52af17d [--models a,b] [--repeat 3]
                                   [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from erasure import BUILT_MODELS, LIGHT_MODELS

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("old", "old --no-verify", "new", "new --no-verify")


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    codes: set[int] = field(default_factory=set)
    nodes: str = ""
    shapes: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def run(tree: Path, model: Path, out: Path, verify: bool) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user + system, all threads), exit code, output."""
    argv = [sys.executable, "-m", "graphopt", "optimize", str(model), "-o", str(out)]
    if not verify:
        argv.append("--no-verify")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200", "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.run(argv, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, proc.stdout + proc.stderr


def bench_model(path: Path, trees: dict[str, Path], repeat: int, tmp: Path) -> dict[str, Timing]:
    timings = {v: Timing() for v in VARIANTS}
    for i in range(repeat):
        order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
        for variant in order:
            code_name, _, flag = variant.partition(" ")
            seconds, cpu, code, text = run(trees[code_name], path, tmp / "out.onnx", not flag)
            t = timings[variant]
            t.seconds.append(seconds)
            t.cpu.append(cpu)
            t.codes.add(code)
            found = re.search(r"nodes (\d+) -> (\d+)", text)
            t.nodes = f"{found.group(2)}" if found else "?"
            shapes = re.search(r"checked at (\d+) input shapes?", text)
            t.shapes = shapes.group(1) if shapes else ("1" if not flag else "")
    return timings


def markdown(rows: list[tuple[str, dict[str, Timing]]]) -> str:
    head = [
        "model",
        "shapes checked (new)",
        "old s",
        "new s",
        "new / old",
        "verification s old → new",
        "verification CPU s old → new",
        "verification share of new run",
        "nodes old / new",
        "exit old / new",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, t in rows:
        old, new = t["old"].median, t["new"].median
        old_v = old - t["old --no-verify"].median
        new_v = new - t["new --no-verify"].median
        old_cpu = t["old"].median_cpu - t["old --no-verify"].median_cpu
        new_cpu = t["new"].median_cpu - t["new --no-verify"].median_cpu
        codes = [",".join(map(str, sorted(t[v].codes))) for v in ("old", "new")]
        cells = [
            label,
            t["new"].shapes,
            f"{old:.2f}",
            f"{new:.2f}",
            f"{new / old:.2f}×",
            f"{old_v:.2f} → {new_v:.2f}",
            f"{old_cpu:.2f} → {new_cpu:.2f}",
            f"{new_v / new:.0%}",
            f"{t['old'].nodes} / {t['new'].nodes}",
            " / ".join(codes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="commit to compare with (extracted by git archive)")
    parser.add_argument("--baseline-dir", help="an extracted tree of the baseline instead")
    parser.add_argument("--models", help="comma-separated subset (default: the erasure table's)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    if not (args.baseline or args.baseline_dir):
        parser.error("give --baseline REV or --baseline-dir DIR")
    from graphopt import models

    names = (
        args.models.split(",")
        if args.models
        else [f"light_{m}" for m in LIGHT_MODELS] + BUILT_MODELS
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-verify-cost-") as tmp_name:
        tmp = Path(tmp_name)
        if args.baseline_dir:
            old_tree = Path(args.baseline_dir).resolve()
        else:
            old_tree = tmp / "baseline"
            old_tree.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
        trees = {"old": old_tree, "new": ROOT}
        for name in names:
            path = Path(models.get(name))
            timings = bench_model(path, trees, args.repeat, tmp)
            rows.append((name, timings))
            print(
                markdown(rows[-1:]).splitlines()[-1], f"load {os.getloadavg()[0]:.1f}", flush=True
            )
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
