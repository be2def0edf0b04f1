"""Block erasure (``--erase-blocks``): fidelity, FLOPs and speed on three models.

    python bench/block_erasure.py [--markdown OUT.md] [--quick] [--pairs 20]

1. **MiniLM** (all-MiniLM-L6-v2, real weights): one of its 6 encoder layers erased, then two,
   for every score (removal, angular) × replacement (none, mean, linear); calibration: the
   431 ``calib`` sentences of :mod:`graphopt.models.sentences`, fidelity: the mean cosine of
   sentence embeddings on the 250 held-out ``eval`` sentences (target >= 0.90), and which
   layers went.
2. **ResNet-50** (torchvision, seeded random weights; ``--calib random``, no images: its
   weights are random too): ``--erase-blocks flops=0.25``; achieved FLOPs, output fidelity
   (the pass's own, on its calibration and held-out samples) and the latency ratio, ORT CPU 1
   thread, warm-up, ``--pairs`` paired interleaved runs, median of per-pair ratios.
3. **digits** (trained CNN): accuracy before/after, if it has residual blocks.

The markdown states the command, date, versions, CPU and the load average (a shared machine
makes timings noisy).
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

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.errors import UserInputError
from graphopt.models import digits as digit_data
from graphopt.models import get
from graphopt.models.sentences import embed, mean_cosine, minilm_npz
from graphopt.passes.blocks.finding import find_blocks
from graphopt.timing import Spread, interleaved, pair_ratios

SCORES = ("removal", "angular")
REPLACEMENTS = ("none", "mean", "linear")


def _erase(source, out: Path, calib: str, target: str, score: str, replace: str):
    options = OptimizeOptions(
        erase_blocks=target, block_score=score, block_replace=replace, calib=calib, verify=False
    )
    started = time.perf_counter()
    record = optimize(source, out, options).report.details["erase-blocks"]
    return record, time.perf_counter() - started


def _fidelity(record, phase: str) -> str:
    rows = record.fidelity.get(phase, [])
    if not rows:
        return "n/a"
    worst = min(rows, key=lambda f: f.mean_cosine)
    return f"cos {worst.mean_cosine:.4f}, max rel {max(f.max_rel for f in rows):.3g}"


def minilm(work: Path, counts: tuple[int, ...], lines: list[str]) -> None:
    source = get("minilm")
    calib = str(minilm_npz(work / "minilm_calib.npz", "calib"))
    reference = embed(source, "eval")
    lines += [
        "## MiniLM (all-MiniLM-L6-v2, real weights): erased encoder layers",
        "",
        f"Calibration: 431 `calib` sentences (the pass holds 25% out); embedding cosine on "
        f"{len(reference)} held-out `eval` sentences.",
        "",
        "| layers erased | score | replacement | erased (layer index) | FLOPs removed "
        "| embedding cosine (eval) | joint 1 - cos (scoring) | pass time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for count in counts:
        for score in SCORES:
            for replace in REPLACEMENTS:
                out = work / f"minilm_{count}_{score}_{replace}.onnx"
                record, seconds = _erase(source, out, calib, str(count), score, replace)
                cosine = mean_cosine(reference, embed(out, "eval"))
                which = ", ".join(
                    f"{i} ({b.name})" for i, b in enumerate(record.blocks) if b.removed
                )
                joint = "" if record.joint_score is None else f"{record.joint_score:.4f}"
                lines.append(
                    f"| {count} | {score} | {replace} | {which} | {record.flops_removed:.1%} "
                    f"| {cosine:.4f} | {joint} | {seconds:.1f} |"
                )
                print(lines[-1], flush=True)
    lines.append("")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def resnet50(work: Path, pairs: int, lines: list[str]) -> None:
    source = get("resnet50")
    lines += [
        "## ResNet-50 (torchvision, seeded random weights): `--erase-blocks flops=0.25`",
        "",
        "Calibration: `--calib random` (32 generated 3x224x224 inputs, 8 held out by the pass). "
        f"Latency: ORT CPU, 1 thread, batch 1, warm-up, {pairs} paired interleaved runs, "
        "median (p10-p90) of per-pair ratios time(original) / time(erased).",
        "",
        "| score | replacement | blocks erased | FLOPs after / before | fidelity (calibration) "
        "| fidelity (held-out) | speed-up | pass time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    combos = (("removal", "mean"), ("angular", "mean"), ("removal", "none"))
    outs = []
    for score, replace in combos:
        out = work / f"resnet50_{score}_{replace}.onnx"
        record, seconds = _erase(source, out, "random", "flops=0.25", score, replace)
        outs.append((score, replace, out, record, seconds))
    sessions = [_session(source)] + [_session(o[2]) for o in outs]
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)
    feeds = {sessions[0].get_inputs()[0].name: image}
    calls = [lambda s=s: s.run(None, feeds) for s in sessions]
    times = interleaved(calls, pairs)
    for (score, replace, _, record, seconds), candidate in zip(outs, times[1:], strict=True):
        spread = Spread.of(pair_ratios(times[0], candidate))
        lines.append(
            f"| {score} | {replace} | {len(record.removed)} of {len(record.blocks)} "
            f"| {record.flops_after / record.flops_before:.3f} "
            f"| {_fidelity(record, 'calibration')} | {_fidelity(record, 'held-out')} "
            f"| {spread.median:.3f}x ({spread.p10:.3f}-{spread.p90:.3f}) | {seconds:.1f} |"
        )
        print(lines[-1], flush=True)
    refused = len(outs[0][3].refused)
    lines += ["", f"{refused} Adds refused (projection shortcuts), as expected for ResNet-50.", ""]


def digits(work: Path, lines: list[str]) -> None:
    source = get("digits")
    blocks, refused = find_blocks(io.load(source).model.graph)
    lines += ["## digits (trained CNN)", ""]
    x, y = digit_data.data("test")
    session = _session(source)
    before = digit_data.accuracy(session.run(None, {session.get_inputs()[0].name: x})[0], y)
    if not blocks:
        calib = str(digit_data.write_calib_npz(work / "digits.npz"))
        try:
            _erase(source, work / "digits_out.onnx", calib, "1", "removal", "mean")
            said = "(the pass ran)"
        except UserInputError as exc:
            said = f"the pass says: `{exc}`"
        lines += [
            f"The digits CNN has no residual blocks (3 plain Conv+BN+ReLU stages; "
            f"{len(refused)} candidates refused), so nothing can be erased; {said}. "
            f"Accuracy stays {before:.1%} (test split).",
            "",
        ]
        return
    lines.append(f"{len(blocks)} blocks found; accuracy before {before:.1%}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="write the tables here too")
    parser.add_argument("--pairs", type=int, default=20, help="paired timing rounds (>= 20)")
    parser.add_argument("--quick", action="store_true", help="MiniLM: one layer only")
    args = parser.parse_args(argv)
    import onnx
    import onnx_ir

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# Block erasure (`--erase-blocks`)",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- versions: Python {platform.python_version()}, onnxruntime {ort.__version__}, "
        f"onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}, numpy {np.__version__}",
        f"- CPU: {_cpu()} ({os.cpu_count()} cores); load average at start: {load}",
        "",
    ]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        minilm(work, (1,) if args.quick else (1, 2), lines)
        resnet50(work, args.pairs, lines)
        digits(work, lines)
    lines.append(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
