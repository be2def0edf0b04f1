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
