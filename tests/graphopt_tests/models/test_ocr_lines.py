"""Rendered text-line crops for the PP-OCR recognizer (``graphopt.models.ocr.text_lines``)."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.models.ocr import OCR_MEAN, OCR_STD, text_lines
from graphopt_tests.helpers import import_or_skip

LETTERS = list("abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ0123456789")
MARKS = list(".,:;!?")
CJK = ["一", "中"]  # in PP-OCR's dictionary, but not in Pillow's built-in font


@pytest.fixture(scope="module")
def lines() -> tuple[np.ndarray, list[str]]:
    import_or_skip("PIL", "Pillow renders the lines")
    return text_lines(24, LETTERS + MARKS + CJK, seed=3)


def test_lines_are_whole_crops_padded_with_zeros(lines) -> None:
    images, texts = lines
    assert images.shape == (24, 3, 48, 320) and images.dtype == np.float32
    assert len(texts) == 24
    lo, hi = (0.0 - OCR_MEAN) / OCR_STD, (1.0 - OCR_MEAN) / OCR_STD
    assert images.min() >= lo and images.max() <= hi
    # A line narrower than the input ends in zero padding (rapidocr's); lines shortened to
    # fit still come close to the right edge.
    widths = [int(np.flatnonzero(np.abs(img).sum(axis=(0, 1)) > 0).max()) + 1 for img in images]
    assert min(widths) < 320 and max(widths) > 0.9 * 320
    for img, width in zip(images, widths, strict=True):
        assert not img[:, :, width:].any()


def test_texts_use_drawable_dictionary_characters_only(lines) -> None:
    _, texts = lines
    used = set("".join(texts)) - {" "}
    assert used <= set(LETTERS + MARKS)  # no CJK: it would render as the missing-glyph box
    assert used & set(LETTERS) and any(t[-1] in MARKS for w in texts for t in w.split())


def test_same_seed_same_lines_other_seed_other_lines(lines) -> None:
    images, texts = lines
    again, texts_again = text_lines(24, LETTERS + MARKS + CJK, seed=3)
    other, texts_other = text_lines(24, LETTERS + MARKS + CJK, seed=4)
    assert np.array_equal(images, again) and texts == texts_again
    assert texts != texts_other and not np.array_equal(images, other)


def test_a_long_line_loses_words_from_its_end_until_its_crop_fits() -> None:
    pil = import_or_skip("PIL.ImageFont", "Pillow renders the lines")
    from graphopt.models.ocr import fitted_line

    font = pil.load_default(40)
    text = "several words that cannot all fit"
    fitted, (_, _, box_w, box_h) = fitted_line(font, text, (4, 3), 320 / 48)
    assert text.startswith(fitted) and fitted != text  # a prefix of whole words
    assert box_w <= 320 / 48 * box_h  # resized to height 48 it is not squeezed
    longer = " ".join(text.split()[: len(fitted.split()) + 1])  # one word more would not fit
    left, top, right, bottom = font.getbbox(longer)
    assert right - left + 8 > 320 / 48 * (bottom - top + 6)
    # One word is kept whatever its width (it is then squeezed), and a short line is whole.
    assert fitted_line(font, "W" * 40, (4, 3), 320 / 48)[0] == "W" * 40
    assert fitted_line(font, "two words", (4, 3), 320 / 48)[0] == "two words"


def test_no_drawable_letter_is_an_error() -> None:
    import_or_skip("PIL", "Pillow renders the lines")
    with pytest.raises(ValueError, match="none of the letters"):
        text_lines(1, CJK)


def test_dictionary_comes_from_the_recognizer_metadata() -> None:
    import_or_skip("rapidocr_onnxruntime", "the PP-OCR models ship in rapidocr-onnxruntime")
    from graphopt import models
    from graphopt.models.ocr import rec_dictionary

    characters = rec_dictionary(models.get("ppocr_rec"))
    assert len(characters) == 6623  # 6625 classes: the CTC blank, these, and the space
    assert {"a", "Z", "7", "中"} <= set(characters)
    with pytest.raises(ValueError, match="no 'character' metadata"):
        rec_dictionary(models.get("ppocr_cls"))


def test_phrases_are_runs_of_sentence_words_in_drawable_characters() -> None:
    import_or_skip("PIL", "Pillow renders the lines")
    from graphopt.models import sentences

    alphabet = [chr(c) for c in range(33, 127)]  # printable ASCII, as the built-in font draws
    images, texts = text_lines(16, alphabet + CJK, seed=5, text="phrases")
    assert images.shape == (16, 3, 48, 320) and len(texts) == 16
    corpus = " " + " ".join(sentences.sentences("calib") + sentences.sentences("eval")) + " "
    for text in texts:
        assert 1 <= len(text.split()) <= 5 and set(text) <= set(alphabet) | {" "}
        assert f" {text} " in corpus  # consecutive words, in order
    # Fewer drawable characters: only the words spelled entirely with them.
    _, lower = text_lines(16, list("abcdefghijklmnopqrstuvwxyz"), seed=5, text="phrases")
    assert all(set(t) <= set("abcdefghijklmnopqrstuvwxyz ") for t in lower)
    with pytest.raises(ValueError, match="text='poems'"):
        text_lines(1, LETTERS, text="poems")
