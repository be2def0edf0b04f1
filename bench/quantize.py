"""Quantization side by side: graphopt's modes against ONNX Runtime's own tools, one run.

    python bench/quantize.py --models resnet50,mobilenet_v3_large,efficientnet_b0 \
        --batches 1,8 --pairs 20 --work /tmp/qb --markdown /tmp/qb/cnn.md
    python bench/quantize.py --models minilm,digits,ppocr_rec,ppocr_det --work /tmp/qb \
        --markdown /tmp/qb/real.md

Every row quantizes the same original float export with the same calibration data:

- CNNs with random seeded weights (resnet50, mobilenet_v3_large, efficientnet_b0): ORT's
  ``quantize_static`` per-channel over {QDQ, QOperator} x {U8, S8 activations} (MinMax, its
  default) against ``graphopt --quantize int8 --target ort`` (defaults). Calibration (32)
  and evaluation (16) inputs are different random crops of scikit-learn's two sample photos;
  with random weights, fidelity is agreement with fp32, not accuracy.
- digits (trained): top-1 accuracy on the 360 test images, calibration on 256 others.
- MiniLM (real weights): ORT ``quantize_dynamic`` (U8 and S8 weights), ORT's
  ``MatMulNBitsQuantizer`` (RTN, block 32) against graphopt int8-dynamic, int8 and int4-weight;
  fidelity = mean cosine of the sentence embeddings on the 250 evaluation sentences.
- PP-OCRv4 rec: greedy CTC decoding of rendered text-line crops prepared as rapidocr
  prepares the detector's boxes (``graphopt.models.ocr.text_lines``: whole lines, height 48,
  right-padded to 320; characters from the model's own dictionary); the share of lines whose
  decoded label sequence equals fp32's, and the share read exactly as rendered
  (``--rec-text random``: random words of dictionary letters; ``phrases``: runs of English
  words). Reference rows perturb the fp32 weights without quantizing (bf16 rounding, 0.1% and
  0.3% relative noise): the floor under "lines same" on those lines. PP-OCRv4
  det: IoU of the binarized (> 0.3) probability maps
  with fp32's on rendered pages.

Speed: ORT CPU, ORT_ENABLE_ALL, ``--threads`` (1 by default), warm-up, ``--pairs`` paired
interleaved rounds, median of time(fp32) / time(quantized) (``bench/timing.py``), in
``--invocations`` fresh processes (3 by default): the cell is the median of their medians,
with their range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from timing import invocation_speedups, session

CNNS = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "resnet18", "mobilenet_v2")
CALIB_COUNT = 32
EVAL_COUNT = 16
CALIB_SEED, EVAL_SEED = 0, 1


@dataclass
class Row:
    model: str
    method: str
    path: Path | None
    fidelity: str = ""
    size_ratio: float | None = None
    seconds: float | None = None
    speed: dict[str, float] = field(default_factory=dict)
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # over invocations
    note: str = ""
    score: float | None = None  # the fidelity as a number (higher is better), for "best"


def build(name: str) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "graphopt.models", "build", name],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def input_info(path: Path) -> list[tuple[str, list[int | str]]]:
    model = onnx.load(os.fspath(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    result = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in value.type.tensor_type.shape.dim
        ]
        result.append((value.name, dims))
    return result


# ---------------------------------------------------------------------------------------
# data per model


def image_data(path: Path, count: int, seed: int, side: int = 224) -> dict[str, np.ndarray]:
    """Random crops (random size, position and flip) of scikit-learn's two sample photos,
    ImageNet-normalized: natural image statistics without a dataset download."""
    from sklearn.datasets import load_sample_images

    ((name, _dims),) = input_info(path)
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w, _ = photo.shape
        size = int(rng.integers(side, min(h, w)))
        y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        index = np.arange(side) * size // side
        crop = photo[y : y + size, x : x + size][index][:, index].astype(np.float32) / 255
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(((crop - mean) / std).transpose(2, 0, 1))
    return {name: np.ascontiguousarray(np.stack(out), dtype=np.float32)}


# The texts rendered for the recognizer, by seed: the truth its readings are scored against.
REC_TEXTS: dict[int, list[str]] = {}


def ocr_data(path: Path, count: int, seed: int, text: str = "random") -> dict[str, np.ndarray]:
    from graphopt.models.ocr import rec_dictionary, text_images, text_lines

    ((name, _dims),) = input_info(path)
    if "rec" in path.stem:
        images, REC_TEXTS[seed] = text_lines(count, rec_dictionary(path), seed=seed, text=text)
        return {name: images}
    return {name: text_images(count, [count, 3, 480, 640], seed=seed)}


def minilm_data(split: str, count: int | None) -> dict[str, np.ndarray]:
    from graphopt.models import sentences

    return sentences.tokenize(sentences.sentences(split, count))


def save_npz(path: Path, data: dict[str, np.ndarray]) -> Path:
    np.savez(path, **data)
    return path


class Reader:
    """ORT's CalibrationDataReader over one sample at a time."""

    def __init__(self, data: dict[str, np.ndarray], batch: int = 1) -> None:
        count = len(next(iter(data.values())))
        self._items = iter(
            [{k: v[i : i + batch] for k, v in data.items()} for i in range(0, count, batch)]
        )

    def get_next(self):
        return next(self._items, None)


# ---------------------------------------------------------------------------------------
# quantizers


def ort_static(src: Path, dst: Path, data, fmt: str, act: str) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        os.fspath(src),
        os.fspath(dst),
        Reader(data),
        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
        activation_type=QuantType.QUInt8 if act == "u8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )


def ort_dynamic(src: Path, dst: Path, weight: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        os.fspath(src),
        os.fspath(dst),
        weight_type=QuantType.QUInt8 if weight == "u8" else QuantType.QInt8,
    )


def ort_nbits(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(os.fspath(src))
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
    quantizer.process()
    onnx.save(quantizer.model.model, os.fspath(dst))


def graphopt_quantize(src: Path, dst: Path, **flags) -> str:
    from graphopt.api import OptimizeOptions, optimize

    result = optimize(src, dst, OptimizeOptions(verify=False, **flags))
    record = result.report.details.get("quantize")
    return record.headline() if record is not None else ""


def timed(make) -> tuple[float, str]:
    start = time.perf_counter()
    note = make() or ""
    return time.perf_counter() - start, note


# ---------------------------------------------------------------------------------------
# fidelity


def outputs(path: Path, data: dict[str, np.ndarray], batch: int = 8) -> list[np.ndarray]:
    s = session(path, threads=0)
    names = [i.name for i in s.get_inputs()]
    count = len(next(iter(data.values())))
    chunks = [
        s.run(None, {k: data[k][i : i + batch] for k in names}) for i in range(0, count, batch)
    ]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(1) / np.maximum(na * nb, 1e-30)))


def ctc_labels(logits: np.ndarray) -> list[tuple[int, ...]]:
    best = logits.argmax(-1)  # [N, T]
    labels = []
    for row in best:
        seq, previous = [], -1
        for index in row:
            if index != previous and index != 0:
                seq.append(int(index))
            previous = index
        labels.append(tuple(seq))
    return labels


def fidelity(name: str, original: Path, candidate: Path, data) -> tuple[str, float]:
    if name == "digits":
        from graphopt.models import digits

        images, labels = digits.data("test")
        (logits,) = outputs(candidate, {digits.INPUT_NAME: images}, batch=64)
        acc = digits.accuracy(logits, labels)
        return f"{acc:.2%} acc", acc
    if name == "minilm":
        from graphopt.models import sentences

        cos = sentences.fidelity(original, candidate)
        return f"{cos:.4f} cos", cos
    ref, got = outputs(original, data), outputs(candidate, data)
    if name == "ppocr_rec":
        a, b = ctc_labels(ref[0]), ctc_labels(got[0])
        same, unspaced = lines_same(original, a, b)
        read = read_right(original, b, REC_TEXTS[EVAL_SEED])
        return (
            f"{same:.1%} lines same ({unspaced:.1%} ignoring spaces), {read:.1%} read right",
            same,
        )
    if name == "ppocr_det":
        a, b = ref[0] > 0.3, got[0] > 0.3
        iou = float((a & b).sum() / max((a | b).sum(), 1))
        return f"{iou:.4f} IoU", iou
    cos = cosine_rows(ref[0], got[0])
    agree = float(np.mean(ref[0].argmax(-1) == got[0].argmax(-1)))
    return f"{cos:.4f} cos, top-1 {agree:.0%}", cos


def lines_same(
    model: Path, a: list[tuple[int, ...]], b: list[tuple[int, ...]]
) -> tuple[float, float]:
    """Shares of lines whose greedy label sequences are equal: strictly, and with spaces
    removed, as PaddleOCR's own RecMetric compares (ignore_space=True, its default; shown
    beside the strict count, which stays the score)."""
    from graphopt.models.ocr import rec_dictionary

    space = len(rec_dictionary(model)) + 1  # the space PP-OCR appends, 1-based
    pairs = list(zip(a, b, strict=True))
    same = float(np.mean([x == y for x, y in pairs]))
    unspaced = [[i for i in x if i != space] == [i for i in y if i != space] for x, y in pairs]
    return same, float(np.mean(unspaced))


def read_right(model: Path, labels: list[tuple[int, ...]], texts: list[str]) -> float:
    """Share of lines whose greedy reading is the rendered text (the recognizer's accuracy;
    index ``len(dictionary) + 1`` is the space PP-OCR appends to its dictionary)."""
    from graphopt.models.ocr import rec_dictionary

    characters = [*rec_dictionary(model), " "]
    readings = ["".join(characters[i - 1] for i in line) for line in labels]
    return float(np.mean([r == t for r, t in zip(readings, texts, strict=True)]))


def file_size(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


# ---------------------------------------------------------------------------------------
# one model


def methods(name: str, src: Path, work: Path, calib: dict, calib_npz: Path):
    """(label, output path, function that writes it) per method, peers first."""
    out = []
    if name == "minilm":
        for weight in ("u8", "s8"):
            dst = work / f"{name}.ort_dynamic_{weight}.onnx"
            out.append(
                (
                    f"ORT quantize_dynamic {weight.upper()} weights",
                    dst,
                    lambda d=dst, w=weight: ort_dynamic(src, d, w),
                )
            )
        dst = work / f"{name}.ort_nbits.onnx"
        out.append(("ORT MatMulNBits RTN block 32", dst, lambda d=dst: ort_nbits(src, d)))
        for mode in ("int8-dynamic", "int8", "int8 --min-cosine 0.995", "int4-weight", "fp16"):
            dst = work / f"{name}.graphopt_{mode.split()[0]}{'_mixed' if ' ' in mode else ''}.onnx"
            flags = {"quantize": mode.split()[0], "target": "ort", "calib": os.fspath(calib_npz)}
            if "--min-cosine" in mode:
                flags["min_cosine"] = 0.995
            if mode == "int4-weight":
                flags["quantize_embeddings"] = True
            out.append(
                (
                    f"graphopt {mode} --target ort",
                    dst,
                    lambda d=dst, f=flags: graphopt_quantize(src, d, **f),
                )
            )
        return out
    for fmt in ("qdq", "qoperator"):
        for act in ("u8", "s8"):
            dst = work / f"{name}.ort_{fmt}_{act}.onnx"
            label = f"ORT quantize_static {fmt.upper()} {act.upper()} act."
            out.append((label, dst, lambda d=dst, f=fmt, a=act: ort_static(src, d, calib, f, a)))
    dst = work / f"{name}.graphopt_int8.onnx"
    flags = {"quantize": "int8", "target": "ort", "calib": os.fspath(calib_npz)}
    out.append(
        ("graphopt int8 --target ort", dst, lambda d=dst: graphopt_quantize(src, d, **flags))
    )
    # The default rounds the int8 codes by GPTQ with a calibration file; round-to-nearest
    # beside it shows what that buys.
    dst = work / f"{name}.graphopt_int8_rtn.onnx"
    rtn = {**flags, "int8_weights": "rtn"}
    out.append(
        (
            "graphopt int8 --int8-weights rtn --target ort",
            dst,
            lambda d=dst: graphopt_quantize(src, d, **rtn),
        )
    )
    if name == "ppocr_rec":
        # A CTC decoder's user sees the argmax per time step: mixed precision on agreement.
        dst = work / f"{name}.graphopt_int8_agree.onnx"
        agree = {**flags, "min_agreement": 0.9995}
        out.append(
            (
                "graphopt int8 --min-agreement 0.9995 --target ort",
                dst,
                lambda d=dst: graphopt_quantize(src, d, **agree),
            )
        )
    if name == "ppocr_rec":
        # No quantization, only perturbed weights: how often the greedy text flips when the
        # weights move by less than any int8 (or bf16) rounding does, i.e. the floor under
        # "lines same" on these lines.
        for kind, label in PERTURBATIONS.items():
            dst = work / f"{name}.reference_{kind}.onnx"
            out.append((label, dst, lambda d=dst, k=kind: perturbed_weights(src, d, k)))
    if name in CNNS:
        dst = work / f"{name}.graphopt_fp16.onnx"
        fp16 = {"quantize": "fp16", "target": "ort", "calib": os.fspath(calib_npz)}
        out.append(("graphopt fp16", dst, lambda d=dst: graphopt_quantize(src, d, **fp16)))
    return out


# Reference rows (ppocr_rec): fp32 with perturbed weights, no quantization.
PERTURBATIONS = {
    "bf16": "reference: fp32, weights rounded to bf16",
    "noise0.001": "reference: fp32, weights x (1 + N(0, 0.1%))",
    "noise0.003": "reference: fp32, weights x (1 + N(0, 0.3%))",
}


def perturbed_weights(src: Path, dst: Path, kind: str) -> str:
    """``src`` with its weights (float tensors of rank >= 2, initializers or Constant nodes,
    after graphopt's exact passes fold the batch norms) rounded to bfloat16 (to nearest even)
    or multiplied by 1 + a seeded Gaussian of relative size ``noise<σ>``; nothing else
    changes."""
    from onnx import numpy_helper

    from graphopt.api import OptimizeOptions, optimize

    folded = dst.with_suffix(".folded.onnx")
    optimize(src, folded, OptimizeOptions(verify=False))
    model = onnx.load(folded)
    rng = np.random.default_rng(0)
    tensors = list(model.graph.initializer) + [
        a.t
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    changed = 0
    for tensor in tensors:
        w = numpy_helper.to_array(tensor)
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        if kind == "bf16":
            bits = w.view(np.uint32)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            new = rounded.astype(np.uint32).view(np.float32)
        else:
            sigma = float(kind.removeprefix("noise"))
            new = (w * (1 + sigma * rng.standard_normal(w.shape))).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
        changed += 1
    onnx.save(model, os.fspath(dst))
    return f"{changed} weight tensors perturbed ({kind}), no quantization"


def speed_feeds(name: str, src: Path, batch: int) -> dict[str, np.ndarray]:
    if name == "minilm":
        return minilm_data("eval", batch)
    if name.startswith("ppocr"):
        return ocr_data(src, batch, seed=99)
    if name == "digits":
        from graphopt.models import digits

        images, _ = digits.data("test")
        return {digits.INPUT_NAME: images[:batch]}
    return image_data(src, batch, seed=99)


def run_model(name: str, args, work: Path) -> list[Row]:
    src = build(name)
    if name == "minilm":
        calib, evaluation = minilm_data("calib", 128), None
    elif name == "digits":
        from graphopt.models import digits

        images, _ = digits.data("calib")
        calib, evaluation = {digits.INPUT_NAME: images}, None
    elif name.startswith("ppocr"):
        calib = ocr_data(src, CALIB_COUNT, seed=CALIB_SEED, text=args.rec_text)
        evaluation = ocr_data(src, args.ocr_eval, seed=EVAL_SEED, text=args.rec_text)
    else:
        calib = image_data(src, CALIB_COUNT, seed=0)
        evaluation = image_data(src, EVAL_COUNT, seed=1)
    calib_npz = save_npz(work / f"{name}.calib.npz", calib)
    rows = [Row(name, "fp32 original", src, size_ratio=1.0)]
    rows[0].fidelity, rows[0].score = fidelity(name, src, src, evaluation)
    for label, dst, make in methods(name, src, work, calib, calib_npz):
        row = Row(name, label, dst)
        try:
            row.seconds, row.note = timed(make)
            row.fidelity, row.score = fidelity(name, src, dst, evaluation)
            row.size_ratio = file_size(dst) / file_size(src)
        except Exception as exc:  # a peer or a mode that fails is a row, not a crash
            row.path = None
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
        print(f"{name}: {label}: {row.fidelity} {row.note}", flush=True)
    done = [r for r in rows[1:] if r.path is not None]
    for batch in args.batches:
        feeds = speed_feeds(name, src, batch)
        for threads in args.threads:
            runs = invocation_speedups(
                [src] + [r.path for r in done], feeds, threads, args.pairs, args.invocations
            )
            for r, ratios in zip(done, runs, strict=True):
                r.speed[f"b{batch} t{threads}"] = statistics.median(ratios)
                r.spread[f"b{batch} t{threads}"] = (min(ratios), max(ratios))
    rows[0].speed = {f"b{b} t{t}": 1.0 for b in args.batches for t in args.threads}
    return rows


def speed_cell(row: Row, key: str) -> str:
    """The median over invocations, with their range when there were several."""
    if key not in row.speed:
        return "-"
    low, high = row.spread.get(key, (row.speed[key], row.speed[key]))
    cell = f"{row.speed[key]:.2f}x"
    return cell if low == high else f"{cell} ({low:.2f}-{high:.2f})"


def markdown(rows: list[Row], args) -> str:
    keys = [f"b{b} t{t}" for b in args.batches for t in args.threads]
    lines = [
        "| model | method | fidelity vs fp32 | size | "
        + " | ".join(keys)
        + " | quantize s | notes |",
        "|---" * (6 + len(keys)) + "|",
    ]
    for r in rows:
        speeds = [speed_cell(r, k) for k in keys]
        size = f"{r.size_ratio:.2f}" if r.size_ratio is not None else "-"
        secs = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        note = r.note.replace("|", "/")
        lines.append(
            f"| {r.model} | {r.method} | {r.fidelity} | {size} | "
            + " | ".join(speeds)
            + f" | {secs} | {note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument(
        "--invocations",
        type=int,
        default=3,
        help="fresh processes the timing runs in; a speed is the median of their paired "
        "medians, shown with their range",
    )
    parser.add_argument("--ocr-eval", type=int, default=200, help="rendered lines/pages")
    parser.add_argument(
        "--rec-text",
        choices=("random", "phrases"),
        default="random",
        help="ppocr_rec lines: random words of dictionary letters, or runs of English words "
        "(graphopt.models.ocr.LINE_TEXTS)",
    )
    parser.add_argument("--work", default="/tmp/graphopt-quant-bench")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += run_model(name, args, work)
    text = (
        f"{time.strftime('%Y-%m-%d')}, onnxruntime {ort.__version__}, load "
        f"{os.getloadavg()[0]:.1f}\n\n" + markdown(rows, args)
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
