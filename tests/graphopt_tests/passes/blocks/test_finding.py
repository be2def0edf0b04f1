"""Finding residual blocks: synthetic pre-norm, post-norm and ResNet-like graphs, and the
catalog's transformers and ResNet-18 as the pipeline hands them to the lossy passes."""

from __future__ import annotations

import itertools

import pytest

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.models import get
from graphopt.passes.blocks.finding import find_blocks
from graphopt_tests.passes.blocks.graphs import postnorm, prenorm, resnet_like


def test_prenorm_residual_units_are_blocks_of_their_own():
    blocks, refused = find_blocks(prenorm(layers=3).graph)
    assert [(b.kind, b.input, b.output) for b in blocks] == [
        ("residual", "x", "h0"),
        ("residual", "h0", "h1"),
        ("residual", "h1", "y"),
    ]
    assert refused == []
    # The branch (LN, two MatMuls, Relu) and the Add, in graph order.
    assert len(blocks[0].nodes) == 5 and blocks[0].channel_axis == -1


@pytest.mark.parametrize("decomposed", [False, True])
def test_postnorm_attention_and_ffn_pair_into_one_layer(decomposed):
    blocks, refused = find_blocks(postnorm(layers=2, decomposed=decomposed).graph)
    # The closing LayerNorm belongs to the block: its input is the previous layer's LN.
    assert [(b.kind, b.input, b.output) for b in blocks] == [
        ("transformer layer", "h", "layer0"),
        ("transformer layer", "layer0", "y"),
    ]
    assert refused == []
    # Named by its first node (unnamed here: by that node's output); every node of the layer.
    assert blocks[0].name == "Q0" and len(blocks[0].nodes) == 15 + 16 * decomposed


def test_projection_shortcut_is_refused_and_identity_block_found():
    blocks, refused = find_blocks(resnet_like().graph)
    assert [(b.kind, b.input, b.output, b.channel_axis) for b in blocks] == [
        ("residual", "r1", "y", 1)
    ]  # the closing Relu is part of the block
    assert len(refused) == 1 and "projection shortcut" in refused[0][1]


def _prepared(name: str, tmp_path):
    """The catalog model after the exact passes (what erase-blocks sees in a run)."""
    out = tmp_path / f"{name}.onnx"
    optimize(get(name), out, OptimizeOptions(verify=False))
    return io.load(out).model


@pytest.mark.parametrize(
    ("name", "count", "kind"),
    [("minilm", 6, "transformer layer"), ("bert_tiny", 2, "transformer layer"),
     ("gpt2_tiny", 2, "transformer layer")],
)  # fmt: skip
def test_catalog_transformers_have_one_block_per_layer(tmp_path, name, count, kind):
    blocks, _ = find_blocks(_prepared(name, tmp_path).graph)
    assert [b.kind for b in blocks] == [kind] * count
    # Consecutive layers: each block starts where the one before ends.
    assert all(a.output == b.input for a, b in itertools.pairwise(blocks))


def test_resnet18_identity_blocks_found_downsampling_refused(tmp_path):
    blocks, refused = find_blocks(_prepared("resnet18", tmp_path).graph)
    # 8 basic blocks: the first of stages 2-4 downsamples through a 1x1 projection.
    assert len(blocks) == 5 and all(b.kind == "residual" for b in blocks)
    assert len(refused) == 3
    assert all("projection shortcut" in why for _, why in refused)


def test_a_residual_sum_fused_into_a_gemm_is_a_block():
    """Gemm(r, B, h) is h + r·B: a residual unit ending in the Gemm (it used to be no block at
    all: "0 erasable residual block(s)"); Gemm(h, W, h) is h + h·W, a unit of one node. A
    Gemm scaling its C (beta != 1) has no identity skip path and is no unit."""
    import numpy as np

    from graphopt.passes.blocks.eraser import erase_all
    from graphopt.passes.blocks.erasing import Replacement
    from graphopt.verify import run_model
    from graphopt_tests.passes.blocks.graphs import gemm_residuals

    model = gemm_residuals(layers=2)
    blocks, refused = find_blocks(model.graph)
    assert [(b.input, b.output, len(b.nodes)) for b in blocks] == [
        ("x", "h0", 3),
        ("h0", "h1", 3),
        ("h1", "y", 1),
    ]
    assert refused == []
    # Erasing the middle block leaves the others computing from its input.
    erased = model.clone()
    erase_all(erased, [find_blocks(erased.graph)[0][1]], [Replacement("none")])
    assert [n.name for n in erased.graph] == ["up0", "act0", "down0", "self"]
    w = {name: np.asarray(v.const_value.numpy()) for name, v in model.graph.initializers.items()}
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    h0 = x + np.maximum(x @ w["a0"], 0) @ w["b0"]
    np.testing.assert_allclose(run_model(erased, {"x": x})[0], h0 + h0 @ w["w"], rtol=1e-5)
    assert find_blocks(gemm_residuals(layers=1, beta=0.5).graph)[0] == []
