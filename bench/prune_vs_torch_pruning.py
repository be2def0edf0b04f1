"""Structured pruning side by side: graphopt (on the ONNX graph) vs Torch-Pruning (on torch).

Real-weight models, no fine-tuning:

    digits   the CNN trained on scikit-learn's digits (graphopt.models.digits), FLOPs removed
             0.5; fidelity = test accuracy (360 held-out digits) and its drop in points
    minilm   all-MiniLM-L6-v2 with mean pooling, FLOPs removed 0.25, FFN intermediate
             channels; fidelity = mean cosine between original and pruned sentence
             embeddings on the 250 evaluation sentences (graphopt.models.sentences)

Methods:

    torch-pruning      tp.pruner.MagnitudePruner, group L2 importance
                       (tp.importance.GroupMagnitudeImportance(p=2)), uniform ratio found by
                       bisection so that tp.utils.count_ops_and_params MACs drop by the
                       target; once without and once with round_to; exported like the
                       catalog's models (torch.onnx.export, dynamo, opset 18)
    graphopt           graphopt.api.optimize(original ONNX, prune="flops=R") with criterion
                       activation + compensation lsq, and l2 + none; calibration data =
                       the calibration split (digits 256 images, MiniLM 431 sentences at 128)

Columns: FLOPs ratio (pruned / original, counted by graphopt.analysis.flops on both ONNX
files at the same shapes: digits 1x1x16x16, MiniLM 1x128); fidelity; ONNX Runtime CPU speed-up
vs the original at 1 and 2 intra-op threads (ORT_ENABLE_ALL, sequential, warm-up, then
``--pairs`` interleaved rounds each timing ``--inner`` runs of every model; the median of the
per-round ratios original/candidate). Speed inputs: digits a batch of ``--digits-batch`` test
images, MiniLM one evaluation sentence padded to 128 tokens.

Usage: python bench/prune_vs_torch_pruning.py [--models digits,minilm] [--pairs 20]
       [--inner 10] [--threads 1,2] [--markdown FILE] [--work DIR] [--no-graphopt]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing

from graphopt import models
from graphopt.analysis.flops import model_flops
from graphopt.io import load
from graphopt.models import digits, sentences

TARGETS = {"digits": 0.5, "minilm": 0.25}
REUSED = "reused from --work"
# Set by --reuse: keep pruned models already in the work folder (re-measure, not re-prune).
REUSE = False
# Set by --reuse-only: never prune, report methods missing from the work folder as missing.
REUSE_ONLY = False


def _reused(path: Path) -> bool:
    if (REUSE or REUSE_ONLY) and path.exists():
        return True
    if REUSE_ONLY:
        raise FileNotFoundError(f"{path.name} not in the work folder (--reuse-only)")
    return False


# Channel alignment tried on both sides: ORT's CPU kernels favour multiples of 8/16. With
# ORT_ENABLE_ALL, convolutions run in the NCHWc layout (block 16 on AVX-512, 8 on AVX2) only
# when channel counts are multiples of the block; measured on the digits CNN (AVX-512, 1
# thread, batch 64), widths 11/22/22 or 8/24/24 lose NCHWc and run slower than the original.
ROUND_TO = {"digits": 16, "minilm": 16}
# (criterion, compensation, allocation, align to ROUND_TO?)
GRAPHOPT_METHODS = (
    ("reconstruction", "lsq", "global", False),
    ("activation", "lsq", "uniform", False),
    ("l2", "none", "uniform", False),
    ("reconstruction", "lsq", "global", True),
)


@dataclass
class Row:
    model: str
    method: str
    path: Path | None
    flops_ratio: float | None = None
    fidelity: float | None = None
    drop: float | None = None  # accuracy points lost (digits) / 1 - cosine (MiniLM)
    speedup: dict[int, float] = field(default_factory=dict)
    widths: str = ""
    note: str = ""
    seconds: float = 0.0


# ---------------------------------------------------------------- Torch-Pruning side


def _tp_prune(module, example, ratio: float, round_to: int | None, **kwargs):
    import torch_pruning as tp

    pruned = copy.deepcopy(module)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    ignored = kwargs.pop("ignored")(pruned)
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        example,
        importance=importance,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
        **kwargs,
    )
    pruner.step()
    return pruned


def tp_prune_to_target(module, example, target: float, round_to: int | None, **kwargs):
    """Bisect TP's uniform pruning ratio until its MACs count drops by ``target``.

    Returns (pruned module, MACs ratio by TP's counter, the pruning ratio used).
    """
    import torch_pruning as tp

    base, _ = tp.utils.count_ops_and_params(module, example)
    low, high = 0.0, 0.95
    best: tuple[float, Any, float] | None = None
    for _ in range(12):
        middle = (low + high) / 2
        pruned = _tp_prune(module, example, middle, round_to, **dict(kwargs))
        macs, _ = tp.utils.count_ops_and_params(pruned, example)
        ratio = macs / base
        if best is None or abs(ratio - (1 - target)) < abs(best[0] - (1 - target)):
            best = (ratio, pruned, middle)
        if abs(ratio - (1 - target)) < 0.002:
            break
        if ratio > 1 - target:
            low = middle
        else:
            high = middle
    assert best is not None
    return best[1], best[0], best[2]


def tp_digits(work: Path, round_to: int | None) -> tuple[Path, str]:
    import torch

    from graphopt.models.export import export

    path = work / f"digits_tp_r{round_to or 0}.onnx"
    if _reused(path):
        return path, REUSED
    module = digits.build_torch_model()
    example = torch.from_numpy(digits.data("calib")[0][:1])
    pruned, macs, ratio = tp_prune_to_target(
        module, example, TARGETS["digits"], round_to, ignored=lambda m: [m[-1]]
    )
    batch = torch.from_numpy(digits.data("calib")[0][: digits.EXPORT_BATCH])
    export(
        pruned.eval(),
        (batch,),
        path,
        [digits.INPUT_NAME],
        [digits.OUTPUT_NAME],
        {digits.INPUT_NAME: {0: "batch"}},
    )
    channels = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    return path, f"TP MACs {macs:.3f}, ratio {ratio:.3f}, conv channels {channels}"


def minilm_torch():
    """MiniLM (real weights) wrapped exactly like the catalog's export (with mean pooling)."""
    import transformers as tf

    from graphopt.models.text import _encoder_wrapper, minilm_dir

    os.environ["HF_HUB_OFFLINE"] = "1"
    model = tf.AutoModel.from_pretrained(
        str(minilm_dir()), attn_implementation="eager", add_pooling_layer=False
    ).eval()
    return _encoder_wrapper(model, True)


def tp_minilm(work: Path, round_to: int | None) -> tuple[Path, str]:
    import torch

    from graphopt.models.export import export
    from graphopt.models.text import TEXT_DYNAMIC, _text_inputs

    path = work / f"minilm_tp_r{round_to or 0}.onnx"
    if _reused(path):
        return path, REUSED
    module = minilm_torch()
    feeds = sentences.tokenize(sentences.sentences("calib", 1), sentences.SEQ_LEN)
    example = tuple(torch.from_numpy(feeds[k]) for k in sentences.INPUT_NAMES)

    def ignored(wrapper):
        # Only FFN intermediate channels: every other layer keeps its output width (the
        # residual stream and attention heads stay whole).
        ffn = {id(layer.intermediate.dense) for layer in wrapper.model.encoder.layer}
        kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)
        return [m for m in wrapper.modules() if isinstance(m, kinds) and id(m) not in ffn]

    pruned, macs, ratio = tp_prune_to_target(
        module,
        example,
        TARGETS["minilm"],
        round_to,
        ignored=ignored,
        output_transform=lambda out: out[1].sum(),
    )
    names = list(sentences.INPUT_NAMES)
    export(
        pruned.eval(),
        _text_inputs(3),
        path,
        names,
        ["last_hidden_state", sentences.EMBEDDING_OUTPUT],
        dict.fromkeys(names, TEXT_DYNAMIC),
    )
    widths = sorted({layer.intermediate.dense.out_features for layer in pruned.model.encoder.layer})
    return path, f"TP MACs {macs:.3f}, ratio {ratio:.3f}, FFN width {widths}"


# ---------------------------------------------------------------- graphopt side


def calib_file(name: str, work: Path) -> Path:
    path = work / f"{name}_calib.npz"
    if not path.exists():
        if name == "digits":
            digits.write_calib_npz(path, "calib")
        else:
            sentences.minilm_npz(path, "calib", seq_len=sentences.SEQ_LEN)
    return path


def graphopt_prune(
    name: str,
    original: Path,
    work: Path,
    criterion: str,
    compensation: str,
    allocation: str,
    round_to: int,
) -> tuple[Path, str]:
    from graphopt import api

    path = work / f"{name}_graphopt_{criterion}_{compensation}_{allocation}_r{round_to}.onnx"
    if _reused(path):
        return path, REUSED
    options = api.OptimizeOptions(
        prune=f"flops={TARGETS[name]}",
        criterion=criterion,
        compensation=compensation,
        allocation=allocation,
        round_to=round_to or None,
        calib=str(calib_file(name, work)),
    )
    result = api.optimize(str(original), str(path), options)
    notes = [n for n in result.report.notes if n.startswith("prune")]
    return path, notes[0] if notes else ""


# ---------------------------------------------------------------- measurements


def shapes_of(name: str) -> dict[str, tuple[int, ...]]:
    if name == "digits":
        return {digits.INPUT_NAME: (1, 1, digits.SIDE, digits.SIDE)}
    return dict.fromkeys(sentences.INPUT_NAMES, (1, sentences.SEQ_LEN))


def flops(path: Path, name: str) -> int:
    return model_flops(load(path).model, shapes_of(name)).total


def widths(path: Path, name: str) -> str:
    """Kept widths read from the ONNX weights: conv output channels; MiniLM's [384, k] weights.

    MiniLM's original has 24 weights [384, 384] (Q, K, V, attention output) and 6 [384, 1536]
    (FFN in); "288x18" means 18 of them kept 288 columns (e.g. Q/K/V of 6 layers).
    """
    tensors = load(path).model.graph.initializers.values()
    if name == "digits":
        convs = [t.shape[0] for t in tensors if t.shape is not None and len(t.shape) == 4]
        return "conv " + "/".join(str(int(c)) for c in convs)
    hidden = 384
    counts = Counter(
        int(t.shape[1])
        for t in tensors
        if t.shape is not None and len(t.shape) == 2 and int(t.shape[0]) == hidden
    )
    return "[384,k]: " + ", ".join(f"{k}x{n}" for k, n in sorted(counts.items()))


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def digits_accuracy(path: Path) -> float:
    x, y = digits.data("test")
    return 100.0 * digits.accuracy(session(path, 2).run(None, {digits.INPUT_NAME: x})[0], y)


def speed_feeds(name: str, batch: int) -> dict[str, np.ndarray]:
    if name == "digits":
        return {digits.INPUT_NAME: digits.data("test")[0][:batch]}
    return sentences.tokenize(sentences.sentences("eval")[-1:], sentences.SEQ_LEN)


def paired_speedups(
    original: Path, candidates: list[Path], feeds: dict[str, np.ndarray], threads: int,
    pairs: int, inner: int,
) -> list[float]:  # fmt: skip
    """Median over interleaved rounds of time(original) / time(candidate), per candidate
    (bench/timing.py); each model gets only the feeds it declares as inputs."""
    import onnx

    paths = [original, *candidates]
    bound = []
    for path in paths:
        graph = onnx.load(path, load_external_data=False).graph
        names = {i.name for i in graph.input} - {t.name for t in graph.initializer}
        bound.append({k: v for k, v in feeds.items() if k in names})
    return timing.paired_speedups(paths, bound, threads, pairs, inner)


# ---------------------------------------------------------------- driver


def run_model(name: str, args: argparse.Namespace, work: Path) -> list[Row]:
    original = models.get(name)
    rows = [Row(name, "original", original)]
    tp_builder = tp_digits if name == "digits" else tp_minilm
    for round_to in (None, ROUND_TO[name]):
        label = f"torch-pruning group-L2{f' round_to={round_to}' if round_to else ''}"
        rows.append(_attempt(name, label, lambda r=round_to: tp_builder(work, r)))
    if args.graphopt:
        for criterion, compensation, allocation, align in GRAPHOPT_METHODS:
            round_to = ROUND_TO[name] if align else 0
            label = f"graphopt {criterion} + {compensation}, {allocation}"
            label += f" round_to={round_to}" if round_to else ""
            rows.append(
                _attempt(
                    name,
                    label,
                    lambda c=criterion, k=compensation, a=allocation, r=round_to: graphopt_prune(
                        name, original, work, c, k, a, r
                    ),
                )
            )
    base_flops = flops(original, name)
    if name == "digits":
        base_accuracy = digits_accuracy(original)
    else:
        reference = sentences.embed(original, "eval", threads=2)
    for row in rows:
        if row.path is None:
            continue
        row.flops_ratio = flops(row.path, name) / base_flops
        row.widths = widths(row.path, name)
        if name == "digits":
            row.fidelity = digits_accuracy(row.path)
            row.drop = base_accuracy - row.fidelity
        else:
            row.fidelity = sentences.mean_cosine(
                reference, sentences.embed(row.path, "eval", threads=2)
            )
    done = [r for r in rows[1:] if r.path is not None]
    feeds = speed_feeds(name, args.digits_batch)
    for threads in args.threads:
        speedups = paired_speedups(
            original, [r.path for r in done], feeds, threads, args.pairs, args.inner
        )
        rows[0].speedup[threads] = 1.0
        for row, value in zip(done, speedups, strict=True):
            row.speedup[threads] = value
    return rows


def _attempt(name: str, label: str, make) -> Row:
    start = time.perf_counter()
    try:
        path, note = make()
        if note == REUSED:
            return Row(name, label, path, note=note)
    except Exception as exc:  # report the failure in the table instead of stopping the run
        logging.getLogger(__name__).debug("%s", traceback.format_exc())
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return Row(name, label, None, note=f"FAILED: {type(exc).__name__}: {first}")
    return Row(name, label, path, note=note, seconds=time.perf_counter() - start)


def markdown(rows: list[Row], threads: list[int], args: argparse.Namespace) -> str:
    head = ["model", "method", "FLOPs ratio", "fidelity", "drop"]
    head += [f"speed-up {t}T" for t in threads]
    head += ["widths", "prune s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.model == "digits":
            fid = f"{row.fidelity:.2f}% acc" if row.fidelity is not None else "-"
            drop = f"{row.drop:+.2f} pt" if row.drop is not None else "-"
        else:
            fid = f"{row.fidelity:.4f} cos" if row.fidelity is not None else "-"
            drop = f"{1 - row.fidelity:.4f}" if row.fidelity is not None else "-"
        cells = [
            row.model,
            row.method,
            f"{row.flops_ratio:.3f}" if row.flops_ratio is not None else "-",
            fid,
            drop,
            *[f"{row.speedup[t]:.2f}x" if t in row.speedup else "-" for t in threads],
            row.widths,
            f"{row.seconds:.1f}" if row.seconds else "-",
            row.note.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"FLOPs by graphopt.analysis.flops (digits 1x1x16x16, MiniLM 1x128); targets: digits "
        f"{TARGETS['digits']}, MiniLM {TARGETS['minilm']} removed. Speed: ORT "
        f"{ort.__version__} CPU, ORT_ENABLE_ALL, median of {args.pairs} interleaved pairs x "
        f"{args.inner} runs; digits batch {args.digits_batch}, MiniLM batch 1 x 128 tokens. "
        "Digits fidelity: top-1 accuracy on 360 test images (drop in points vs the original "
        "ONNX); MiniLM: mean cosine of sentence embeddings on 250 evaluation sentences."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--digits-batch", type=int, default=64)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--work", type=Path, help="keep the pruned models here")
    parser.add_argument("--no-graphopt", dest="graphopt", action="store_false")
    parser.add_argument(
        "--reuse", action="store_true", help="measure pruned models already in --work again"
    )
    parser.add_argument(
        "--reuse-only", action="store_true", help="like --reuse, and prune nothing new"
    )
    args = parser.parse_args(argv)
    global REUSE, REUSE_ONLY
    REUSE, REUSE_ONLY = args.reuse, args.reuse_only
    args.threads = [int(t) for t in args.threads.split(",")]
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="prune_vs_tp.") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[Row] = []
        for name in args.models.split(","):
            rows += run_model(name, args, work)
            print(markdown(rows, args.threads, args), flush=True)
    table = markdown(rows, args.threads, args)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0 if all(r.path is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
