"""Pattern fusions on real exported models: the fused op appears, outputs stay within 1e-4."""

from __future__ import annotations

import pytest

from graphopt import models
from graphopt.api import OptimizeOptions, optimize
from graphopt_tests.models.cases import require

CASES = [
    # model, --opset, {pass: hits}, fused ops that must appear
    (
        "ppocr_rec",
        17,
        {"fuse-layer-norm": 5, "fuse-activations": 28},
        ("LayerNormalization", "HardSwish"),
    ),
    ("gpt2_tiny", 20, {"fuse-gelu": 2}, ("Gelu",)),
    (
        "qwen2_tiny",
        23,
        {"fuse-rms-norm": 5, "fuse-attention": 2},
        ("RMSNormalization", "Attention"),
    ),
    (
        "llama_tiny",
        23,
        {"fuse-rms-norm": 5, "fuse-attention": 2},
        ("RMSNormalization", "Attention"),
    ),
    ("bert_tiny", 23, {"fuse-gelu": 2, "fuse-attention": 2}, ("Gelu", "Attention")),
]


@pytest.mark.parametrize(("name", "opset", "hits", "fused_ops"), CASES, ids=[c[0] for c in CASES])
def test_model_fusions(name, opset, hits, fused_ops):
    require(name)  # a missing extra skips with its reason; a failing build fails the test
    source = models.get(name)
    result = optimize(
        source, None, OptimizeOptions(opset=opset, input_shapes=models.input_shapes(name))
    )
    report = result.report
    assert report.verification is not None and report.verification.ok
    got = {s.name: s.hits for s in report.stats if s.name in hits}
    assert got == hits
    ops = {n.op_type for n in result.model.graph}
    assert set(fused_ops) <= ops
