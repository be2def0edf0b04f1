"""Which pruning settings should be the defaults when calibration data is given?

Prunes real-weight models with a small grid of (criterion, compensation, allocation) through
``graphopt.api.optimize`` exactly as a user would (verification on, default ``--round-to``),
each fitted on one calibration .npz per model that every setting shares, and measures:

    digits     the CNN trained on scikit-learn's digits (graphopt.models.digits), flops=0.5;
               calibration 256 images; fidelity = top-1 accuracy on the 360 test images
    minilm     all-MiniLM-L6-v2 (real weights) + mean pooling, flops=0.25; calibration 431
               sentences at length 128; fidelity = mean cosine between original and pruned
               sentence embeddings on the 250 evaluation sentences (graphopt.models.sentences)
    ppocr_rec  PP-OCRv4 text recognition (real weights from rapidocr-onnxruntime), flops=0.3;
               calibration 64 rendered word images 48x320 (graphopt.models.ocr.text_images,
               seed 0); fidelity = share of 128 other rendered images (seed 1) whose greedy
               CTC decoding equals the original model's, and mean cosine of the outputs

Columns: fidelity; FLOPs kept (pruned / original, graphopt's counter at the calibration
shapes); wall seconds of the ``optimize`` call; CPU seconds of this process during it (all
threads: on a shared machine wall time grows with other jobs' load, CPU time much less);
the compensation the result carries (lsq can fall back to bias or to none per run).

Setting ``default`` passes no criterion/compensation/allocation at all, so the row shows
what ``graphopt optimize --prune ... --calib FILE.npz`` resolves to and what it gives.

Usage: python bench/prune_defaults.py [--models digits,minilm,ppocr_rec]
       [--grid small|full | --settings CRITERION/COMPENSATION/ALLOCATION,...]
       [--no-default | --default-only] [--markdown FILE] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

TARGETS = {"digits": "flops=0.5", "minilm": "flops=0.25", "ppocr_rec": "flops=0.3"}
OCR_SHAPE = (1, 3, 48, 320)
OCR_CALIB, OCR_EVAL = 64, 128

# (criterion, compensation, allocation); None everywhere = the defaults graphopt resolves.
Setting = tuple[str | None, str | None, str | None]
DEFAULT: Setting = (None, None, None)
# The full 3 x 3 x 2 grid: affordable on the digits CNN (about a second a run) only.
FULL: tuple[Setting, ...] = tuple(
    (c, k, a)
    for c in ("l2", "activation", "reconstruction")
    for k in ("none", "bias", "lsq")
    for a in ("uniform", "global")
)
# The grid pruned to what a 2-core budget allows on MiniLM and PP-OCR rec (an lsq run costs
# about a minute there): today's data-free default, each data-aware ingredient alone, and the
# lsq combinations that the fidelity comparison with Torch-Pruning (BENCHMARKS.md) put at the
# top.
SMALL: tuple[Setting, ...] = (
    ("l2", "none", "uniform"),
    ("activation", "none", "uniform"),
    ("reconstruction", "none", "global"),
    ("l2", "lsq", "uniform"),
    ("activation", "bias", "uniform"),
    ("activation", "lsq", "uniform"),
    ("activation", "lsq", "global"),
    ("reconstruction", "bias", "global"),
    ("reconstruction", "lsq", "uniform"),
    ("reconstruction", "lsq", "global"),
)


@dataclass
class Row:
    model: str
    setting: Setting
    # (criterion, compensation, allocation) the run reported: what the defaults resolved to
    resolved: tuple[str, str, str] = ("", "", "")
    fidelity: float | None = None
    extra: str = ""  # a second fidelity number (ppocr_rec: mean cosine)
    flops_kept: float | None = None
    wall: float = 0.0
    cpu: float = 0.0
    used: str = ""
    error: str = ""


# ---------------------------------------------------------------- per-model data and metrics


class Model:
    """A catalog model with its calibration file and its held-out fidelity measure."""

    name: str

    def __init__(self, work: Path) -> None:
        from graphopt import models

        self.path = models.get(self.name)
        self.calib = work / f"{self.name}_calib.npz"
        self.write_calib(self.calib)

    def write_calib(self, path: Path) -> None:
        raise NotImplementedError

    def fidelity(self, pruned: Path) -> tuple[float, str]:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes FLOPs are counted at: one calibration sample."""
        with np.load(self.calib, allow_pickle=False) as data:
            return {k: (1, *data[k].shape[1:]) for k in data.files}


class Digits(Model):
    name = "digits"

    def write_calib(self, path: Path) -> None:
        from graphopt.models import digits

        digits.write_calib_npz(path, "calib")

    def fidelity(self, pruned: Path) -> tuple[float, str]:
        from graphopt.models import digits

        x, y = digits.data("test")
        logits = _session(pruned).run(None, {digits.INPUT_NAME: x})[0]
        return 100.0 * digits.accuracy(logits, y), ""


class MiniLM(Model):
    name = "minilm"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        from graphopt.models import sentences

        # Sessions use every core the job has (2 here); the reference is embedded once.
        self.reference = sentences.embed(self.path, "eval")

    def write_calib(self, path: Path) -> None:
        from graphopt.models import sentences

        sentences.minilm_npz(path, "calib")

    def fidelity(self, pruned: Path) -> tuple[float, str]:
        from graphopt.models import sentences

        return sentences.mean_cosine(self.reference, sentences.embed(pruned, "eval")), ""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        from graphopt.models import sentences

        return dict.fromkeys(sentences.INPUT_NAMES, (1, sentences.SEQ_LEN))


class OcrRec(Model):
    name = "ppocr_rec"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        from graphopt.models.ocr import text_images

        # Seed 1: other words than the calibration images (seed 0).
        self.images = text_images(OCR_EVAL, OCR_SHAPE, seed=1)
        self.reference = self._run(self.path)
        self.reference_text = [_ctc(p) for p in self.reference]

    def write_calib(self, path: Path) -> None:
        from graphopt.models.ocr import text_images

        np.savez(path, x=text_images(OCR_CALIB, OCR_SHAPE, seed=0))

    def _run(self, path: Path) -> np.ndarray:
        session = _session(path)
        return np.concatenate(
            [session.run(None, {"x": self.images[i : i + 16]})[0] for i in range(0, OCR_EVAL, 16)]
        )

    def fidelity(self, pruned: Path) -> tuple[float, str]:
        out = self._run(pruned)
        same = np.mean([_ctc(p) == r for p, r in zip(out, self.reference_text, strict=True)])
        a = self.reference.reshape(len(out), -1)
        b = out.reshape(len(out), -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        return 100.0 * float(same), f"cos {float(cos.mean()):.4f}"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"x": OCR_SHAPE}


MODELS: dict[str, Callable[[Path], Model]] = {
    "digits": Digits,
    "minilm": MiniLM,
    "ppocr_rec": OcrRec,
}


def _ctc(probs: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC decoding: best class per step, repeats merged, blanks (0) dropped."""
    best = probs.argmax(-1)
    return tuple(int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1]))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- runs


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_setting(model: Model, setting: Setting, work: Path) -> Row:
    from graphopt import api
    from graphopt.analysis.flops import model_flops
    from graphopt.io import load

    criterion, compensation, allocation = setting
    row = Row(model.name, setting)
    out = work / f"{model.name}_{criterion}_{compensation}_{allocation}.onnx"
    fields = {"criterion": criterion, "compensation": compensation, "allocation": allocation}
    # Only the fields the setting names: the others stay at OptimizeOptions' defaults, which
    # is what a user who leaves the flags out gets.
    given = {k: v for k, v in fields.items() if v is not None}
    options = api.OptimizeOptions(prune=TARGETS[model.name], calib=str(model.calib), **given)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    try:
        result = api.optimize(str(model.path), str(out), options)
    except Exception as exc:  # a failed setting is a row of the table, not the end of the run
        logging.getLogger(__name__).debug("%s", traceback.format_exc())
        row.error = f"{type(exc).__name__}: {str(exc).strip()[:120]}"
        return row
    row.wall, row.cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    record = result.report.details["prune"]
    row.resolved = (record.criterion, record.compensation, record.allocation)
    row.used = record.compensation_used or ("-" if record.compensation == "none" else "reverted")
    shapes = model.shapes()
    before = model_flops(load(model.path).model, shapes).total
    row.flops_kept = model_flops(load(out).model, shapes).total / before
    row.fidelity, row.extra = model.fidelity(out)
    out.unlink(missing_ok=True)
    return row


# ---------------------------------------------------------------- table


def _unit(model: str) -> str:
    return {"digits": "% acc", "minilm": " cos", "ppocr_rec": "% same text"}[model]


def markdown(rows: list[Row], originals: dict[str, str]) -> str:
    head = [
        "model", "criterion", "compensation", "allocation", "fidelity", "FLOPs kept",
        "wall s", "CPU s", "kept method", "notes",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, text in originals.items():
        lines.append(f"| {name} | original | | | {text} | 1.000 | | | | |")
    for row in rows:
        criterion, compensation, allocation = (
            row.resolved if row.setting == DEFAULT else [v or "-" for v in row.setting]
        )
        if row.setting == DEFAULT:
            # What a user who sets none of the three gets (resolved by graphopt itself).
            criterion = f"**default**: {criterion or '?'}"
        if row.error:
            cells = [row.model, criterion, compensation, allocation, "-", "-", "-", "-", "-"]
            cells.append(f"FAILED {row.error}".replace("|", "/"))
        else:
            unit = _unit(row.model)
            fid = f"{row.fidelity:.4f}" if unit == " cos" else f"{row.fidelity:.2f}"
            cells = [
                row.model, criterion, compensation, allocation, fid + unit,
                f"{row.flops_kept:.3f}", f"{row.wall:.1f}", f"{row.cpu:.1f}", row.used, row.extra,
            ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _setting(text: str) -> Setting:
    criterion, compensation, allocation = text.strip().split("/")
    return criterion, compensation, allocation


def _versions() -> str:
    from importlib.metadata import version

    from graphopt import __version__

    parts = [f"graphopt {__version__}"]
    for package in ("onnx", "onnxruntime", "onnx-ir", "numpy", "rapidocr-onnxruntime"):
        try:
            parts.append(f"{package} {version(package)}")
        except Exception:  # an optional package missing is said, not fatal
            parts.append(f"{package} (absent)")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm,ppocr_rec")
    parser.add_argument(
        "--grid",
        choices=("small", "full"),
        default="small",
        help="settings per model; digits always runs the full grid (it is cheap)",
    )
    parser.add_argument(
        "--settings",
        help="instead of the grids (digits too): criterion/compensation/allocation,...",
    )
    parser.add_argument(
        "--no-default", dest="default", action="store_false", help="skip the `default` row"
    )
    parser.add_argument(
        "--default-only", action="store_true", help="only the `default` row (after a grid run)"
    )
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--work", type=Path, help="keep calibration files here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    header = (
        f"{datetime.date.today().isoformat()}; {_versions()}; "
        f"python bench/prune_defaults.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    rows: list[Row] = []
    originals: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="prune_defaults.") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            model = MODELS[name](work)
            fidelity, _ = model.fidelity(model.path)
            digits = 4 if name == "minilm" else 2
            originals[name] = f"{fidelity:.{digits}f}{_unit(name)}"
            grid = FULL if name == "digits" or args.grid == "full" else SMALL
            if args.settings:
                grid = tuple(_setting(text) for text in args.settings.split(","))
            if args.default_only:
                grid = ()
            for setting in (*grid, DEFAULT) if args.default else grid:
                row = run_setting(model, setting, work)
                rows.append(row)
                print(
                    f"{name} {setting}: {'/'.join(row.resolved)} fidelity {row.fidelity} "
                    f"{row.extra} kept {row.flops_kept} wall {row.wall:.1f} cpu {row.cpu:.1f} "
                    f"{row.used} {row.error}",
                    flush=True,
                )
    table = header + "\n\n" + markdown(rows, originals)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0 if not any(r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
