"""EoRA compensation: how much of int8 / int4 / 2:4 / factorization's fidelity gap it closes.

    python bench/eora.py [--work DIR] [--calib-sentences 160] [--eval-sentences 250]
                         [--ranks 8,16,32] [--configs int8,int4,2:4] [--fits plain,joint]
                         [--cnn-configs digits-2:4,...] [--cnn-ranks 8] [--markdown OUT.md]

One command. MiniLM (real weights) is optimized with ``--quantize int8``, ``--quantize
int4-weight --target ort`` (MatMulNBits, GPTQ by default with the calibration file) and
``--sparsity 2:4`` (reconstruction by default) and, with ``--configs prune``,
``--prune flops=0.25`` (lsq refit; the paths go from each pruned block's input), each
without ``--compensation`` and with ``eora:R`` for each rank (``--configs`` also offers
int4-rtn and 2:4-magnitude, the data-free roundings), once per fit in ``--fits``: ``plain``
is EoRA after the pass (the path approximates ``ΔW`` on the layer's input Gram), ``joint``
(the default) first rounds again with the path in view
(:mod:`graphopt.passes.compensation.joint`: MatMulNBits int4 after GPTQ, N:M sparsity by the
pass's criterion; RTN int4, int8 QDQ and factorization stay plain; pruning has no rounding).
Calibration: the first ``--calib-sentences`` sentences of :mod:`graphopt.models.sentences`'
calib split (seq 128). Fidelity: mean cosine of the sentence embeddings against the float
original on the disjoint eval split (``--eval-sentences``); the gap is ``1 − cos``; "gap
closed" is ``1 − gap(EoRA) / gap(without)``.

Conv rows (``--cnn-configs``; "" for none): the digits CNN (real weights, calibration = its
calib split, fidelity = mean cosine of the logits on its test split) and torchvision
resnet18 (seeded random weights; calibration and fidelity on synthetic smooth images:
seeded Gaussian noise at 1/8 resolution, upsampled bilinearly to 224×224, unit variance per
channel; 24 calibration and 16 disjoint evaluation images), with 2:4 sparsity (SparseGPT and
magnitude), int8 QDQ and factorization (``--factorize ratio=0.5``, speed check off: its Conv
layers get paths once the factorizer hands them over, hence not in the default set).

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
from graphopt.passes.compensation import joint

CONFIGS = {
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4-weight", "target": "ort"},
    "2:4": {"sparsity": "2:4"},
    # Not in the default set: the data-free roundings, whose error EoRA sees unwhitened.
    "int4-rtn": {"quantize": "int4-weight", "target": "ort", "int4_method": "rtn"},
    "2:4-magnitude": {"sparsity": "2:4", "sparsity_criterion": "magnitude"},
    # Structured pruning (lsq refit underneath); eora:R adds paths from each pruned block's
    # input (compensation/pruned.py). Not in the default set; its fit is always plain.
    "prune": {"prune": "flops=0.25"},
}
DEFAULT_CONFIGS = "int8,int4,2:4"
FITS = ("plain", "joint")
# Conv models: (catalog model, flags). factorize's Conv layers get paths only once the
# factorizer hands them over (see the report), hence not in the default set.
CNN_CONFIGS = {
    "digits-2:4": ("digits", {"sparsity": "2:4"}),
    "digits-2:4-magnitude": ("digits", {"sparsity": "2:4", "sparsity_criterion": "magnitude"}),
    "digits-int8": ("digits", {"quantize": "int8"}),
    "digits-factorize": ("digits", {"factorize": "ratio=0.5", "factorize_speed_check": "off"}),
    "resnet18-2:4": ("resnet18", {"sparsity": "2:4"}),
    "resnet18-2:4-magnitude": (
        "resnet18",
        {"sparsity": "2:4", "sparsity_criterion": "magnitude"},
    ),
    "resnet18-int8": ("resnet18", {"quantize": "int8"}),
    "resnet18-factorize": (
        "resnet18",
        {"factorize": "ratio=0.5", "factorize_speed_check": "off"},
    ),
}
DEFAULT_CNN = "digits-2:4,digits-2:4-magnitude,digits-int8,resnet18-2:4,resnet18-2:4-magnitude"
RESNET_CALIB, RESNET_EVAL = 24, 16


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run(source: Path, out: Path, config: dict, calib: Path, rank: int, fit: str) -> dict:
    flags = {k: v for k, v in config.items() if k != "target"}
    options = OptimizeOptions(target=config.get("target", "portable"), calib=str(calib), **flags)
    if rank:
        options.compensation = f"eora:{rank}"
    joint.ENABLED = fit == "joint"
    started = time.perf_counter()
    try:
        result = optimize(source, out, options)
    finally:
        joint.ENABLED = True
    seconds = time.perf_counter() - started
    details = result.report.details
    record = details.get("quantize") or details.get("sparsify") or details.get("factorize")
    comp = getattr(record, "compensation", None)
    if "prune-eora" in details:  # pruning's own record stays its; the paths have their own
        comp = details["prune-eora"].record
    return {
        "seconds": seconds,
        "paths": len(comp.layers) if comp else 0,
        "params": comp.params if comp else 0,
        "flops_share": (comp.flops_added / comp.flops_before) if comp and comp.flops_before else 0,
    }


def smooth_images(count: int, seed: int) -> np.ndarray:
    """Seeded synthetic images [count, 3, 224, 224]: noise at 28×28 upsampled bilinearly,
    unit variance per channel (neighbouring pixels correlate, as in photographs)."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(seed)
    small = rng.standard_normal((count, 3, 28, 28))
    images = zoom(small, (1, 1, 8, 8), order=1)
    images = (images - images.mean(axis=(0, 2, 3), keepdims=True)) / images.std(
        axis=(0, 2, 3), keepdims=True
    )
    return images.astype(np.float32)


def logits(model: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + 8]})[0] for i in range(0, len(x), 8)]
    return np.concatenate(outs).reshape(len(x), -1)


def cnn_data(name: str, work: Path) -> tuple[Path, np.ndarray]:
    """(calibration npz, evaluation inputs) for a Conv model (see the module docstring)."""
    if name == "digits":
        from graphopt.models import digits

        return digits.write_calib_npz(work / "digits_calib.npz"), digits.data("test")[0]
    path = work / f"{name}_calib.npz"
    np.savez(path, input=smooth_images(RESNET_CALIB, 0))
    return path, smooth_images(RESNET_EVAL, 1)


def row(label, rank, fit, cos, gap, gap0, info) -> str:
    closed = "" if rank == 0 or not gap0 else f"{1 - gap / gap0:.1%}"
    comp = "none" if rank == 0 else f"eora:{rank} {fit}"
    return (
        f"| {label} | {comp} | {cos:.6f} | {gap:.3e} | {closed} | {info['paths']} | "
        f"{info['params']:,} | {info['flops_share']:.2%} | {info['seconds']:.0f} |"
    )


def sweep(label, source, config, calib, ranks, fits, work, score) -> list[str]:
    rows, gap0 = [], None
    runs = [(0, "plain")] + [(rank, fit) for rank in ranks for fit in fits]
    for rank, fit in runs:
        tag = label.replace(":", "x")
        out = work / f"{tag}_r{rank}_{fit}.onnx"
        info = run(source, out, config, calib, rank, fit)
        cos = score(out)
        gap = 1.0 - cos
        gap0 = gap if rank == 0 else gap0
        rows.append(row(label, rank, fit, cos, gap, gap0, info))
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--calib-sentences", type=int, default=160)
    parser.add_argument("--eval-sentences", type=int, default=250)
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=", ".join(CONFIGS))
    parser.add_argument("--fits", default=",".join(FITS), help=", ".join(FITS))
    parser.add_argument("--cnn-configs", default=DEFAULT_CNN, help=", ".join(CNN_CONFIGS))
    parser.add_argument("--cnn-ranks", default="8")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    fits = [f for f in args.fits.split(",") if f]
    work = args.work or Path(tempfile.mkdtemp(prefix="eora_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    configs = [c for c in args.configs.split(",") if c]
    if configs:
        source = Path(models.get("minilm"))
        calib = minilm_npz(work / "calib.npz", "calib", args.calib_sentences)
        reference = embed(source, "eval", args.eval_sentences)

        def minilm_score(out: Path) -> float:
            return mean_cosine(reference, embed(out, "eval", args.eval_sentences))

        for label in configs:
            rows += sweep(label, source, CONFIGS[label], calib, ranks, fits, work, minilm_score)
    cnn_rows = []
    cnn_ranks = [int(r) for r in args.cnn_ranks.split(",") if r]
    for label in [c for c in args.cnn_configs.split(",") if c]:
        name, config = CNN_CONFIGS[label]
        source = Path(models.get(name))
        calib, inputs = cnn_data(name, work)
        expected = logits(source, inputs)

        def cnn_score(out: Path, inputs=inputs, expected=expected) -> float:
            return mean_cosine(expected, logits(out, inputs))

        cnn_rows += sweep(label, source, config, calib, cnn_ranks, fits, work, cnn_score)
    command = "python bench/eora.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        "| config | compensation | mean cosine | gap 1-cos | gap closed | paths | "
        "added params | added FLOPs | optimize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(
        [
            "# EoRA compensation",
            "",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
            f"- command: `{command.strip()}`",
            f"- versions: graphopt {graphopt.__version__}, onnxruntime {ort.__version__}, "
            f"numpy {np.__version__}, Python {platform.python_version()}",
            f"- CPU: {cpu_model()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.1f}",
            f"- MiniLM: calibration {args.calib_sentences} calib-split sentences; fidelity: "
            f"mean embedding cosine to the float original on {args.eval_sentences} eval "
            "sentences",
            "- Conv models: digits = logits cosine on its test split (calibration: its calib "
            f"split); resnet18 = logits cosine on {RESNET_EVAL} synthetic smooth images "
            f"(calibration: {RESNET_CALIB} others)",
            "",
            *((header + rows + [""]) if rows else []),
            *((header + cnn_rows + [""]) if cnn_rows else []),
        ]
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
