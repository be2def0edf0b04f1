"""PP-OCR models shipped inside the ``rapidocr_onnxruntime`` wheel (Paddle2ONNX exports).

Copied, not re-exported: they are real third-party graphs (weights in Constant nodes,
opset 11/12) and a good test of what graphopt meets in the wild. Their H/W axes are
dynamic, so the sidecar records the shapes tests and verification should bind.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import cache, partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.models.catalog import ModelSpec, register, versions

RAPIDOCR_PACKAGE = "rapidocr_onnxruntime"

# name -> (file in the package's models/ folder, input shape for tests, description).
# det needs H and W divisible by 32. On seeded Gaussian inputs its sigmoid map is ~1e-6
# everywhere at 64x64..160x160, which makes the relative error measure (error / largest
# output) pure rounding noise: ORT's own graph optimizations move it by 3e-2 there. At
# 224x224 the map has real peaks (0.02-0.5 for seeds 0-2), so verification means something.
# rec is trained on height 48; cls on 48x192.
OCR_MODELS: dict[str, tuple[str, list[int], str]] = {
    "ppocr_det": (
        "ch_PP-OCRv4_det_infer.onnx",
        [1, 3, 224, 224],
        "PP-OCRv4 text detection (DBNet)",
    ),
    "ppocr_rec": (
        "ch_PP-OCRv4_rec_infer.onnx",
        [1, 3, 48, 320],
        "PP-OCRv4 text recognition (SVTR-LCNet, 6625 classes)",
    ),
    "ppocr_cls": (
        "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        [1, 3, 48, 192],
        "PP-OCR mobile v2.0 text direction classifier",
    ),
}


def rapidocr_models_dir() -> Path:
    """The ``models/`` folder of the installed ``rapidocr_onnxruntime`` (not imported)."""
    found = find_spec(RAPIDOCR_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"{RAPIDOCR_PACKAGE} is not installed")
    return Path(next(iter(found.submodule_search_locations))) / "models"


def build_ocr(name: str, path: Path) -> dict[str, Any]:
    filename, shape, _ = OCR_MODELS[name]
    source = rapidocr_models_dir() / filename
    shutil.copyfile(source, path)
    return {
        "exporter": "Paddle2ONNX (shipped prebuilt in rapidocr_onnxruntime)",
        "source": f"{RAPIDOCR_PACKAGE}/models/{filename}",
        "versions": versions("rapidocr-onnxruntime"),
        "test_shapes": {"x": shape},
    }


for _name, (_file, _shape, _label) in OCR_MODELS.items():
    register(
        ModelSpec(
            name=_name,
            family="ppocr",
            description=f"{_label}; test input x:{'x'.join(map(str, _shape))}",
            builder=partial(build_ocr, _name),
            requires=(RAPIDOCR_PACKAGE,),
            slow=_name != "ppocr_cls",
        )
    )


# PP-OCR's preprocessing (rapidocr config.yaml): pixels / 255, then (x - 0.5) / 0.5.
OCR_MEAN, OCR_STD = 0.5, 0.5
_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789"


def text_images(count: int, shape: list[int] | tuple[int, ...], seed: int = 0) -> np.ndarray:
    """``count`` rendered images of printed words, ``[count, 3, H, W]`` float32, normalized as
    PP-OCR expects: data a text detector or recognizer responds to, where seeded noise leaves
    the detector's probability map at ~0 everywhere (nothing to compare, nothing to fit).

    Dark random words in Pillow's built-in font, 1-6 lines at random sizes and positions on
    a light background with mild noise; one line filling the height for a recognizer-sized
    (48-pixel) input. Needs Pillow (a torchvision dependency).
    """
    from PIL import Image, ImageDraw, ImageFont

    _, channels, height, width = shape
    rng = np.random.default_rng(seed)
    out = np.empty((count, channels, height, width), np.float32)
    single_line = height <= 64
    for i in range(count):
        background = int(rng.integers(190, 256))
        image = Image.new("RGB", (width, height), (background,) * 3)
        draw = ImageDraw.Draw(image)
        lines = 1 if single_line else int(rng.integers(1, 7))
        for _ in range(lines):
            size = int(rng.integers(28, 40)) if single_line else int(rng.integers(12, 36))
            font = ImageFont.load_default(size)
            words = [
                "".join(rng.choice(list(_GLYPHS), int(rng.integers(2, 9))))
                for _ in range(int(rng.integers(1, 5)))
            ]
            ink = tuple(int(v) for v in rng.integers(0, 90, 3))
            x = int(rng.integers(0, max(1, width // 4)))
            y = (height - size) // 2 if single_line else int(rng.integers(0, height - size))
            draw.text((x, y), " ".join(words), fill=ink, font=font)
        pixels = np.asarray(image, np.float32) + rng.normal(0.0, 4.0, (height, width, 3))
        pixels = np.clip(pixels, 0, 255) / 255.0
        out[i] = ((pixels - OCR_MEAN) / OCR_STD).transpose(2, 0, 1)[:channels]
    return out


# Share of rendered words that end in a punctuation mark (text_lines).
PUNCTUATION_RATE = 0.15


def rec_dictionary(path: str | Path) -> list[str]:
    """The recognizer's label characters (index 1..n; 0 is the CTC blank), from the
    ``character`` entry rapidocr's exports carry in their metadata."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "character":
            return prop.value.splitlines()
    raise ValueError(f"{path}: no 'character' metadata (not a rapidocr PP-OCR recognizer)")


@cache
def _drawable(characters: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The characters Pillow's built-in font draws as themselves, not as its missing-glyph
    box: a line of tofu is no test of a recognizer."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size)

    def bitmap(text: str) -> bytes:
        image = Image.new("L", (2 * size, 2 * size), 0)
        ImageDraw.Draw(image).text((size // 2, size // 2), text, fill=255, font=font)
        return image.tobytes()

    missing = bitmap("\u4e00")  # a CJK ideograph: the built-in font has none
    blank = bitmap(" ")
    return tuple(
        c for c in characters if c.strip() and len(c) == 1 and bitmap(c) not in (missing, blank)
    )


def random_words(drawable: tuple[str, ...]) -> Callable[[np.random.Generator], str]:
    """Lines of 1-4 words of 1-8 letters and digits drawn from ``drawable``, a word ending in
    one of the drawable punctuation marks now and then (``PUNCTUATION_RATE``), as printed text
    does: lines of random symbols are ambiguous to any reader."""
    letters = [c for c in drawable if c.isalnum()]
    marks = [c for c in drawable if not c.isalnum()]
    if not letters:
        raise ValueError("none of the letters can be drawn with Pillow's built-in font")

    def line(rng: np.random.Generator) -> str:
        words = []
        for _ in range(int(rng.integers(1, 5))):
            word = "".join(rng.choice(letters, int(rng.integers(1, 9))))
            if marks and rng.random() < PUNCTUATION_RATE:
                word += str(rng.choice(marks))
            words.append(word)
        return " ".join(words)

    return line


def phrases(drawable: tuple[str, ...]) -> Callable[[np.random.Generator], str]:
    """Lines of 1-5 consecutive words of graphopt's locally generated English sentences
    (:mod:`graphopt.models.sentences`, both splits) whose characters are all in ``drawable``:
    text with the casing, spelling and punctuation a reader meets in print."""
    from graphopt.models import sentences

    allowed = set(drawable) | {" "}
    words = [
        w for split in ("calib", "eval") for s in sentences.sentences(split) for w in s.split()
    ]
    words = [w for w in words if set(w) <= allowed]
    if not words:
        raise ValueError("no word of the sentences can be drawn with the dictionary")

    def line(rng: np.random.Generator) -> str:
        start, length = int(rng.integers(0, len(words))), int(rng.integers(1, 6))
        return " ".join(words[start : start + length])

    return line


# text_lines(text=...): how a line's text is made (each maker returns a per-line function).
LINE_TEXTS = {"random": random_words, "phrases": phrases}


def line_maker(characters: list[str], text: str = "random") -> Callable[[np.random.Generator], str]:
    """The per-line text function ``text_lines`` uses (``LINE_TEXTS[text]``), over the
    characters of ``characters`` Pillow's built-in font draws."""
    if text not in LINE_TEXTS:
        raise ValueError(f"text={text!r}: expected one of {', '.join(LINE_TEXTS)}")
    return LINE_TEXTS[text](_drawable(tuple(characters), 32))


def fitted_line(
    font: Any, text: str, margins: tuple[int, int], max_aspect: float
) -> tuple[str, tuple[int, int, int, int]]:
    """``text`` less as many words from its end as it takes for its crop (the ink's box plus
    ``margins`` on each side) to be at most ``max_aspect`` times as wide as high; one word
    is kept whatever its width. Returns the text and its crop as (left, top, width, height),
    left and top being the ink's offset from the drawing origin."""
    words = text.split(" ")
    while True:
        text = " ".join(words)
        left, top, right, bottom = font.getbbox(text)
        box_w, box_h = right - left + 2 * margins[0], bottom - top + 2 * margins[1]
        if len(words) == 1 or box_w <= max_aspect * box_h:
            return text, (left, top, box_w, box_h)
        words.pop()


def text_lines(
    count: int,
    characters: list[str],
    height: int = 48,
    width: int = 320,
    seed: int = 0,
    text: str = "random",
) -> tuple[np.ndarray, list[str]]:
    """``count`` rendered text-line crops, ``[count, 3, height, width]`` float32, prepared as
    rapidocr prepares the detector's boxes for the recognizer: a tight crop of one whole line,
    resized to ``height`` keeping its aspect, then padded on the right with zeros after
    normalization. A line too long for ``width`` loses words from its end until it fits
    (:func:`fitted_line`): rapidocr widens a batch for long lines rather than squeeze them,
    so only a single word too long is squeezed. Returns the images and their texts
    (the truth a reading is scored against).

    Text: only characters of ``characters`` (the model's dictionary) that Pillow's built-in
    font can draw; ``text`` picks how lines are made (``LINE_TEXTS``): ``random`` words of
    random letters and digits (:func:`random_words`) or ``phrases`` of English sentences
    (:func:`phrases`). Dark ink on a light background, random size, small margins, mild
    noise. Needs Pillow (a torchvision dependency).
    """
    from PIL import Image, ImageDraw, ImageFont

    make_line = line_maker(characters, text)
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 3, height, width), np.float32)
    texts: list[str] = []
    for i in range(count):
        size = int(rng.integers(24, 48))
        font = ImageFont.load_default(size)
        line_text = make_line(rng)
        margin_x, margin_y = (int(v) for v in rng.integers(2, max(3, size // 4), 2))
        line_text, (left, top, box_w, box_h) = fitted_line(
            font, line_text, (margin_x, margin_y), width / height
        )
        texts.append(line_text)
        background = int(rng.integers(190, 256))
        image = Image.new("RGB", (box_w, box_h), (background,) * 3)
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        ImageDraw.Draw(image).text(
            (margin_x - left, margin_y - top), line_text, fill=ink, font=font
        )
        pixels = np.asarray(image, np.float32) + rng.normal(0.0, 4.0, (box_h, box_w, 3))
        line = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        resized_w = min(width, int(np.ceil(height * box_w / box_h)))
        line = line.resize((resized_w, height), Image.Resampling.BILINEAR)
        normalized = (np.asarray(line, np.float32) / 255.0 - OCR_MEAN) / OCR_STD
        out[i, :, :, :resized_w] = normalized.transpose(2, 0, 1)
    return out, texts
