"""How much do the sparsify pass's patterns and criteria cost in fidelity, without retraining?

Runs ``graphopt.api.optimize`` with ``--sparsity`` exactly as a user would, on real-weight
models, and measures:

    minilm   all-MiniLM-L6-v2 (real weights) + mean pooling; calibration: the 431 calibration
             sentences at length 128 (graphopt.models.sentences); fidelity: mean cosine
             between the dense and sparse sentence embeddings on the 250 evaluation
             sentences (disjoint from calibration). Rows: block:1x4=0.8 in the FFN and in
             FFN + attention projections, and 2:4 everywhere, per criterion.
    digits   the CNN trained on scikit-learn's digits; calibration 256 images; fidelity:
             top-1 accuracy on the 360 test images (dense: see the first row). 2:4 and
             unstructured=0.5 per criterion.
    resnet18 torchvision's resnet18 with seeded random weights (no trained CNN of that size
             ships here), --calib random (32 generated images, 8 held out); fidelity: mean
             logits cosine on the held-out generated images, from the pass's own report.
             2:4 per criterion. Not part of the default --models (minutes per row).

Columns: fidelity, the share of zero weights in the sparsified layers, and the wall seconds
of the ``optimize`` call (noisy on a shared machine).

Usage: python bench/sparsity_fidelity.py [--models minilm,digits,resnet18] [--quick] [--work DIR]
       [--criteria magnitude,wanda,reconstruction] [--allocations uniform,global]
       (--quick: 64 calibration sentences, 100 evaluation sentences; for a smoke run)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

CRITERIA = ("magnitude", "wanda", "reconstruction")
# (pattern, layers, criteria, allocation)
MINILM_ROWS = (
    ("block:1x4=0.8", "ffn", CRITERIA, "uniform"),
    ("block:1x4=0.8", "ffn", ("reconstruction",), "global"),
    ("block:1x4=0.8", "ffn,attention", CRITERIA, "uniform"),
    ("block:1x4=0.8", "ffn,attention", ("reconstruction",), "global"),
    ("2:4", "all", CRITERIA, "uniform"),
    ("2:4", "ffn", ("magnitude", "reconstruction"), "uniform"),
)
DIGITS_ROWS = (
    ("2:4", "all", CRITERIA, "uniform"),
    ("unstructured=0.5", "all", CRITERIA, "uniform"),
    ("block:1x4=0.75", "all", CRITERIA, "uniform"),
    ("block:1x4=0.75", "all", ("magnitude", "reconstruction"), "global"),
)


def sparsify(
    source: Path,
    out: Path,
    pattern: str,
    layers: str,
    criterion: str,
    calib: Path,
    allocation: str = "uniform",
):
    """One optimize call; returns (seconds, record)."""
    from graphopt.api import OptimizeOptions, PassSpec, optimize

    options = {
        "pattern": pattern,
        "layers": layers,
        "criterion": criterion,
        "allocation": allocation,
        "calib": str(calib),
        "holdout": 0.0,
    }
    spec = PassSpec("sparsify", options)
    started = time.perf_counter()
    result = optimize(source, out, OptimizeOptions(lossy=[spec], verify=False))
    return time.perf_counter() - started, result.report.details["sparsify"]


def zero_share(record) -> str:
    return f"{record.zeros / record.params:.1%}" if record.params else "-"


def run_minilm(
    work: Path, quick: bool, only: tuple[str, ...] = CRITERIA, allocations=("uniform", "global")
) -> list[str]:
    from graphopt.models import build, sentences

    source = Path(build("minilm"))
    calib = sentences.minilm_npz(work / "minilm_calib.npz", "calib", 64 if quick else None)
    n_eval = 100 if quick else None
    reference = sentences.embed(source, "eval", n_eval)
    header = "| pattern | layers | criterion | allocation | eval cosine | zeros | seconds |"
    lines = [header, "|---" * 7 + "|"]
    for pattern, layers, criteria, allocation in MINILM_ROWS:
        if allocation not in allocations:
            continue
        for criterion in (c for c in criteria if c in only):
            out = work / "minilm_sparse.onnx"
            args = (source, out, pattern, layers, criterion, calib, allocation)
            seconds, record = sparsify(*args)
            cosine = sentences.mean_cosine(reference, sentences.embed(out, "eval", n_eval))
            row = f"| {pattern} | {layers} | {criterion} | {allocation} | {cosine:.4f} | "
            lines.append(row + f"{zero_share(record)} | {seconds:.1f} |")
            print(lines[-1], flush=True)
    return lines


def run_digits(
    work: Path, only: tuple[str, ...] = CRITERIA, allocations=("uniform", "global")
) -> list[str]:
    import onnxruntime as ort

    from graphopt.models import build, digits

    source = Path(build("digits"))
    calib = digits.write_calib_npz(work / "digits_calib.npz", "calib")
    x, y = digits.data("test")

    def accuracy(path: Path) -> float:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return 100.0 * digits.accuracy(session.run(None, {digits.INPUT_NAME: x})[0], y)

    header = "| pattern | criterion | allocation | test accuracy | zeros | seconds |"
    lines = [header, "|---" * 6 + "|", f"| dense | - | - | {accuracy(source):.1f}% | 0 | - |"]
    print(lines[-1], flush=True)
    for pattern, layers, criteria, allocation in DIGITS_ROWS:
        if allocation not in allocations:
            continue
        for criterion in (c for c in criteria if c in only):
            out = work / "digits_sparse.onnx"
            args = (source, out, pattern, layers, criterion, calib, allocation)
            seconds, record = sparsify(*args)
            share = zero_share(record)
            row = f"| {pattern} | {criterion} | {allocation} | {accuracy(out):.1f}% | {share} | "
            lines.append(row + f"{seconds:.1f} |")
            print(lines[-1], flush=True)
    return lines


def run_resnet18(work: Path, only: tuple[str, ...] = CRITERIA) -> list[str]:
    from graphopt.models import build

    source = Path(build("resnet18"))
    lines = ["| pattern | criterion | held-out cosine | zeros | seconds |", "|---" * 5 + "|"]
    for criterion in (c for c in CRITERIA if c in only):
        from graphopt.api import OptimizeOptions, optimize

        options = OptimizeOptions(
            sparsity="2:4", sparsity_criterion=criterion, calib="random", verify=False
        )
        started = time.perf_counter()
        result = optimize(source, work / "resnet18_sparse.onnx", options)
        seconds = time.perf_counter() - started
        record = result.report.details["sparsify"]
        cosine = min(f.mean_cosine for f in record.fidelity["held-out"])
        row = f"| 2:4 | {criterion} | {cosine:.4f} | {zero_share(record)} | {seconds:.1f} |"
        lines.append(row)
        print(row, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,digits")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--criteria", default=",".join(CRITERIA), help="rows of these only")
    parser.add_argument("--allocations", default="uniform,global", help="rows of these only")
    args = parser.parse_args()
    np.set_printoptions(precision=4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        criteria = tuple(args.criteria.split(","))
        allocations = tuple(args.allocations.split(","))
        for name in args.models.split(","):
            print(f"\n## {name}\n", flush=True)
            if name == "minilm":
                run_minilm(work, args.quick, criteria, allocations)
            elif name == "digits":
                run_digits(work, criteria, allocations)
            elif name == "resnet18":
                run_resnet18(work, criteria)
            else:
                raise SystemExit(f"unknown model {name!r}")


if __name__ == "__main__":
    main()
