"""EoRA compensation on MiniLM: how much of int8 / int4 / 2:4 sparsity's fidelity gap it closes.

    python bench/eora.py [--work DIR] [--calib-sentences 160] [--eval-sentences 250]
                         [--ranks 8,16,32] [--configs int8,int4,2:4] [--markdown OUT.md]

One command. MiniLM (real weights) is optimized with ``--quantize int8``, ``--quantize
int4-weight --target ort`` (MatMulNBits, GPTQ by default with the calibration file) and
``--sparsity 2:4`` (reconstruction by default), each without ``--compensation`` and with
``eora:R`` for each rank (``--configs`` also offers int4-rtn and 2:4-magnitude, the data-free
roundings). Calibration: the first ``--calib-sentences`` sentences of
:mod:`graphopt.models.sentences`' calib split (seq 128). Fidelity: mean cosine of the
sentence embeddings against the float original on the disjoint eval split (``--eval-
sentences``); the gap is ``1 − cos``; "gap closed" is ``1 − gap(EoRA) / gap(without)``.
Added FLOPs and parameters are the pass report's (FLOPs at the model's default shapes, as a
share of the float original's). Speed is not measured (2 shared CPU cores: too noisy).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import graphopt
from graphopt import models
from graphopt.api import OptimizeOptions, optimize
from graphopt.models.sentences import embed, mean_cosine, minilm_npz

CONFIGS = {
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4-weight", "target": "ort"},
    "2:4": {"sparsity": "2:4"},
    # Not in the default set: the data-free roundings, whose error EoRA sees unwhitened.
    "int4-rtn": {"quantize": "int4-weight", "target": "ort", "int4_method": "rtn"},
    "2:4-magnitude": {"sparsity": "2:4", "sparsity_criterion": "magnitude"},
}
DEFAULT_CONFIGS = "int8,int4,2:4"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run(source: Path, out: Path, config: dict, calib: Path, rank: int) -> dict:
    flags = {k: v for k, v in config.items() if k != "target"}
    options = OptimizeOptions(target=config.get("target", "portable"), calib=str(calib), **flags)
    if rank:
        options.compensation = f"eora:{rank}"
    started = time.perf_counter()
    result = optimize(source, out, options)
    seconds = time.perf_counter() - started
    record = result.report.details.get("quantize") or result.report.details.get("sparsify")
    comp = getattr(record, "compensation", None)
    return {
        "seconds": seconds,
        "paths": len(comp.layers) if comp else 0,
        "params": comp.params if comp else 0,
        "flops_share": (comp.flops_added / comp.flops_before) if comp and comp.flops_before else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--calib-sentences", type=int, default=160)
    parser.add_argument("--eval-sentences", type=int, default=250)
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=", ".join(CONFIGS))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="eora_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    source = Path(models.get("minilm"))
    calib = minilm_npz(work / "calib.npz", "calib", args.calib_sentences)
    reference = embed(source, "eval", args.eval_sentences)
    rows = []
    for label in args.configs.split(","):
        config = CONFIGS[label]
        gap0 = None
        for rank in [0, *ranks]:
            out = work / f"minilm_{label.replace(':', 'x')}_r{rank}.onnx"
            info = run(source, out, config, calib, rank)
            cos = mean_cosine(reference, embed(out, "eval", args.eval_sentences))
            gap = 1.0 - cos
            gap0 = gap if rank == 0 else gap0
            closed = "" if rank == 0 or not gap0 else f"{1 - gap / gap0:.1%}"
            rows.append(
                f"| {label} | {'none' if rank == 0 else f'eora:{rank}'} | {cos:.6f} | "
                f"{gap:.3e} | {closed} | {info['paths']} | {info['params']:,} | "
                f"{info['flops_share']:.2%} | {info['seconds']:.0f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    command = "python bench/eora.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(
        [
            "# EoRA compensation on MiniLM",
            "",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
            f"- command: `{command.strip()}`",
            f"- versions: graphopt {graphopt.__version__}, onnxruntime {ort.__version__}, "
            f"numpy {np.__version__}, Python {platform.python_version()}",
            f"- CPU: {cpu_model()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.1f}",
            f"- calibration: {args.calib_sentences} calib-split sentences; fidelity: mean "
            f"embedding cosine to the float original on {args.eval_sentences} eval sentences",
            "",
            "| config | compensation | mean cosine | gap 1-cos | gap closed | paths | "
            "added params | added FLOPs | optimize s |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
