"""One real-weight run: MiniLM factorized at 10% fewer FLOPs on a few real sentences."""

from __future__ import annotations

import pytest

from graphopt.api import OptimizeOptions, optimize
from graphopt.models import get
from graphopt_tests.helpers import import_or_skip


@pytest.mark.slow
def test_minilm_flops_drop_and_cosine_is_reported(tmp_path):
    import_or_skip("transformers", "MiniLM's tokenizer makes the sentences")
    from graphopt.models import sentences

    calib = str(sentences.minilm_npz(tmp_path / "calib.npz", "calib", 16, seq_len=32))
    options = OptimizeOptions(
        factorize="flops=0.1",
        factorize_layers="ffn",  # 12 of the 36 layers: the same code paths, a third the time
        calib=calib,
        factorize_speed_check="off",
        verify=False,
    )
    result = optimize(get("minilm"), tmp_path / "f.onnx", options)
    record = result.report.details["factorize"]
    assert record.layers and record.flops_after < record.flops_before
    assert record.flops_removed >= 0.1 - 1e-3
    assert {layer.kind for layer in record.layers} == {"ffn"}
    assert any("weighted by their measured effect" in note for note in record.notes)
    embedding = [f for f in record.fidelity["held-out"] if f.output == "sentence_embedding"]
    assert embedding and 0.0 < embedding[0].mean_cosine <= 1.0 + 1e-6
    assert "held-out" in record.fidelity_source or "held out" in record.fidelity_source
