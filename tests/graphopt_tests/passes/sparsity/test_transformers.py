"""Sparsifying transformer FFNs: reconstruction keeps the output closest.

The fast form runs BERT-tiny (random weights) on generated inputs; the slow one runs the real
MiniLM sentence encoder on real sentences and measures sentence-embedding cosine on held-out
ones, the setting bench/sparsity_fidelity.py measures in full.
"""

from __future__ import annotations

import pytest

from graphopt.api import OptimizeOptions, optimize
from graphopt.models import build
from graphopt_tests.helpers import import_or_skip


def _record(source, out, criterion: str, calib: str, pattern: str = "block:1x4=0.8"):
    options = OptimizeOptions(
        sparsity=pattern,
        sparsity_layers="ffn",
        sparsity_criterion=criterion,
        calib=calib,
        verify=False,
    )
    return optimize(source, out, options).report.details["sparsify"]


def test_bert_tiny_ffn_block_sparsity(tmp_path):
    source = build("bert_tiny")
    records = {
        c: _record(source, tmp_path / f"{c}.onnx", c, "random")
        for c in ("magnitude", "reconstruction")
    }
    for record in records.values():
        assert [layer.kind for layer in record.layers] == ["ffn"] * 4
        # Per-row quotas round: 26 of 32 tiles (81.3%) for K=128, 102 of 128 for K=512.
        assert all(layer.sparsity == pytest.approx(0.8, abs=0.02) for layer in record.layers)
    cosine = {c: min(f.mean_cosine for f in r.fidelity["held-out"]) for c, r in records.items()}
    assert cosine["reconstruction"] > cosine["magnitude"]


@pytest.mark.slow
def test_minilm_ffn_block_sparsity_on_real_sentences(tmp_path):
    import_or_skip("transformers", "MiniLM's tokenizer makes the sentences")
    from graphopt.models import sentences

    source = build("minilm")
    calib = str(sentences.minilm_npz(tmp_path / "calib.npz", "calib", 128))
    reference = sentences.embed(source, "eval", 64)
    cosine = {}
    for criterion in ("magnitude", "wanda", "reconstruction"):
        out = tmp_path / f"{criterion}.onnx"
        _record(source, out, criterion, calib)
        cosine[criterion] = sentences.mean_cosine(reference, sentences.embed(out, "eval", 64))
    assert cosine["reconstruction"] > cosine["wanda"] > cosine["magnitude"]
