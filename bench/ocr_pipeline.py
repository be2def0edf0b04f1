"""PP-OCRv4 rec INT8 on the crops rapidocr's own pipeline makes: page -> det -> crop -> rec.

    python bench/ocr_pipeline.py --pages 30 --work /tmp/ocr_pipe

``bench/quantize.py`` feeds the recognizer line crops it renders itself. Here text lines are
drawn on pages (Pillow's built-in font, English phrases or random words from the model's
dictionary, ``graphopt.models.ocr.line_maker``), rapidocr-onnxruntime's detector (fp32) finds
the lines, and rapidocr's own code crops them (``get_crop_img_list``) and prepares each crop
for the recognizer (``resize_norm_img``: height 48, aspect kept, at least 320 wide; one crop
per run, so no batch-mate widens it). Each crop is read greedily by the fp32 recognizer and
by graphopt's ``--quantize int8 --target ort`` under several calibration sets (``--calib``:
``lines:SEED``, the 32 rendered line crops bench/quantize.py calibrates on; ``crops:SEED``, 48
detector crops of 8 other pages padded to the widest), to show how much the score moves with
the calibration samples; ORT's ``quantize_static`` QDQ U8/S8 (per-channel) run on the first
set. ``--settings`` runs other int8 flags on every set too (``SETTINGS``). The score is the
share of crops whose decoded label sequence equals fp32's, and with spaces ignored
(PaddleOCR's ``RecMetric`` convention); and on the same crops cut at the text's width, where
no padding is left. As a floor, it also reads the crops with fp32 after adding Gaussian noise
of a fraction of a gray level (``NOISE_LEVELS``) to the text's columns or to the zero padding
on their right (``with_noise``). Nothing is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
import quantize as qb

CALIB_CROPS = 48
CALIB_SOURCES = {
    "lines": "32 rendered lines (bench/quantize.py's)",
    "crops": "48 detector crops of 8 other pages",
}
PAGE_W, PAGE_H = 640, 480
# --settings: graphopt's int8 flags compared on every calibration set (name: (flags, options)).
SETTINGS: dict[str, tuple[str, dict]] = {
    "default": ("", {}),
    "minmax": (" --calib-method minmax", {"calib_method": "minmax"}),
    "percentile": (" --calib-method percentile", {"calib_method": "percentile"}),
    "entropy": (" --calib-method entropy", {"calib_method": "entropy"}),
    "rtn": (" --int8-weights rtn", {"int8_weights": "rtn"}),
    "no-bias-correction": (" --bias-correction false", {"bias_correction": False}),
}


def rendered_crops(engine, line_text, pages: int, seed: int) -> list[np.ndarray]:
    """Crops (uint8 BGR) rapidocr's detector and cropper make from ``pages`` rendered pages."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    for _ in range(pages):
        background = int(rng.integers(200, 256))
        image = Image.new("RGB", (PAGE_W, PAGE_H), (background,) * 3)
        draw = ImageDraw.Draw(image)
        y = int(rng.integers(10, 40))
        while True:
            size = int(rng.integers(20, 40))
            font = ImageFont.load_default(size)
            text, x = line_text(rng), int(rng.integers(10, 80))
            _, _, right, bottom = font.getbbox(text)
            if y + bottom > PAGE_H - 10:
                break
            if x + right <= PAGE_W - 10:  # a line too long for the page is not drawn
                ink = tuple(int(v) for v in rng.integers(0, 80, 3))
                draw.text((x, y), text, fill=ink, font=font)
            y += int(size * rng.uniform(1.6, 2.4))
        noise = rng.normal(0.0, 4.0, (PAGE_H, PAGE_W, 3))
        pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
        bgr = np.ascontiguousarray(pixels[:, :, ::-1])
        prepared, ratio_h, ratio_w = engine.preprocess(bgr)
        record = {"preprocess": {"ratio_h": ratio_h, "ratio_w": ratio_w}}
        prepared, _ = engine.maybe_add_letterbox(prepared, record)
        boxes, _ = engine.auto_text_det(prepared)
        if boxes is not None:
            crops += engine.get_crop_img_list(prepared, boxes)
    return crops


def readings(path: Path, inputs: list[np.ndarray]) -> list[tuple[int, ...]]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [qb.ctc_labels(session.run(None, {name: x})[0])[0] for x in inputs]


# The floor rows: fp32 on its own inputs plus Gaussian noise of these standard deviations, in
# gray levels of the 8-bit image (one level is 2/255 after rapidocr's normalization).
NOISE_LEVELS = (0.5, 2.0)
GRAY_LEVEL = 2.0 / 255.0


def with_noise(
    inputs: list[np.ndarray], text_widths: list[int], level: float, region: str
) -> list[np.ndarray]:
    """``inputs`` plus Gaussian noise of ``level`` gray levels on the text's columns or on the
    zero padding to their right (seed 0)."""
    rng = np.random.default_rng(0)
    noisy = []
    for x, width in zip(inputs, text_widths, strict=True):
        noise = rng.normal(0.0, level * GRAY_LEVEL, x.shape).astype(np.float32)
        columns = slice(0, width) if region == "text" else slice(width, None)
        y = x.copy()
        y[..., columns] += noise[..., columns]
        noisy.append(y)
    return noisy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=30, help="evaluation pages")
    parser.add_argument("--text", choices=("phrases", "random"), default="phrases")
    parser.add_argument(
        "--calib",
        default="lines:0,lines:2,crops:1000,crops:2000,crops:3000",
        help="calibration sets, KIND:SEED comma-separated (KIND: lines or crops); ORT's "
        "tools run on the first",
    )
    parser.add_argument(
        "--settings",
        default="default",
        help=f"graphopt int8 settings to run on each set, comma-separated ({', '.join(SETTINGS)})",
    )
    parser.add_argument("--show", type=int, default=8, help="differing crops shown per method")
    parser.add_argument("--work", default="/tmp/graphopt-ocr-pipeline")
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    if unknown := sorted(set(settings) - set(SETTINGS)):
        parser.error(f"--settings: unknown {', '.join(unknown)}")
    from rapidocr_onnxruntime import RapidOCR

    from graphopt.models.ocr import line_maker, rec_dictionary

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = qb.build("ppocr_rec")
    dictionary = rec_dictionary(src)
    line_text = line_maker(dictionary, args.text)
    engine = RapidOCR()
    prepare = engine.text_rec.resize_norm_img
    crops = rendered_crops(engine, line_text, args.pages, seed=0)
    inputs = [prepare(c, max(320 / 48, c.shape[1] / c.shape[0]))[None] for c in crops]
    reference = readings(src, inputs)
    characters = [*dictionary, " "]

    def text(labels: tuple[int, ...]) -> str:
        return "".join(characters[i - 1] for i in labels)

    def calibration(source: str) -> dict[str, np.ndarray]:
        kind, seed = source.split(":")
        if kind == "lines":  # bench/quantize.py's: rendered line crops, right-padded to 320
            return qb.ocr_data(src, qb.CALIB_COUNT, seed=int(seed), text=args.text)
        found = rendered_crops(engine, line_text, 8, seed=int(seed))[:CALIB_CROPS]
        # One shape for the file: every crop padded to the widest, as rapidocr pads a batch.
        ratio = max(320 / 48, *(c.shape[1] / c.shape[0] for c in found))
        return {"x": np.stack([prepare(c, ratio) for c in found]).astype(np.float32)}

    notes: list[str] = []
    print(f"{args.pages} pages, {len(crops)} crops ({args.text}), onnxruntime {ort.__version__}")
    print(
        "\n| calibration | method | crops read as fp32 | ignoring spaces | unpadded crops |"
        "\n|---|---|---|---|---|"
    )
    # The text's width in each prepared crop (as resize_norm_img resizes); the rest is padding.
    text_widths = [
        min(x.shape[-1], int(np.ceil(48 * crop.shape[1] / crop.shape[0])))
        for x, crop in zip(inputs, crops, strict=True)
    ]
    # The same crops cut at the text's width (rounded up to the recognizer's stride of 8
    # columns): no padding for int8 to perturb.
    unpadded = [
        np.ascontiguousarray(x[..., : min(x.shape[-1], -(-width // 8) * 8)])
        for x, width in zip(inputs, text_widths, strict=True)
    ]
    reference_unpadded = readings(src, unpadded)
    for level in NOISE_LEVELS:
        for region in ("text", "padding"):
            noisy = with_noise(inputs, text_widths, level, region)
            same, unspaced = qb.lines_same(src, reference, readings(src, noisy))
            label = f"fp32, input + N(0, {level} gray level) on the {region}"
            print(f"| (none: the floor) | {label} | {same:.1%} | {unspaced:.1%} | - |", flush=True)
    for source in args.calib.split(","):
        calib = calibration(source)
        calib_npz = qb.save_npz(work / f"calib.{source.replace(':', '')}.npz", calib)
        methods = {f"graphopt int8 --target ort{SETTINGS[name][0]}": name for name in settings}
        if source in args.calib.split(",")[:1]:  # the peers once: they are far behind
            methods |= {f"ORT quantize_static QDQ {k.upper()} act.": k for k in ("u8", "s8")}
        for label, kind in methods.items():
            dst = work / f"rec.{kind}.{source.replace(':', '')}.onnx"
            if kind in SETTINGS:
                options = SETTINGS[kind][1]
                qb.graphopt_quantize(
                    src, dst, quantize="int8", target="ort", calib=str(calib_npz), **options
                )
            else:
                qb.ort_static(src, dst, calib, "qdq", kind)
            got = readings(dst, inputs)
            same, unspaced = qb.lines_same(src, reference, got)
            same_unpadded, _ = qb.lines_same(src, reference_unpadded, readings(dst, unpadded))
            described = CALIB_SOURCES[source.split(":")[0]] + f", seed {source.split(':')[1]}"
            print(
                f"| {described} | {label} | {same:.1%} | {unspaced:.1%} | {same_unpadded:.1%} |",
                flush=True,
            )
            differ = [(a, b) for a, b in zip(reference, got, strict=True) if a != b]
            shown = "; ".join(f"{text(a)!r} -> {text(b)!r}" for a, b in differ[: args.show])
            if shown and kind in SETTINGS:
                notes.append(f"{label}, {source}: {len(differ)} crops differ, e.g. {shown}")
    print("\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
