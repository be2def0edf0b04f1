"""The CPU-fast forms of --target ort: packed QKV Attention, 2-D mask_index, no SkipLayerNorm."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import models
from graphopt.inputs import make_inputs
from graphopt.io import load
from graphopt.output_errors import compare
from graphopt.passes.fusion.ort.attention import OrtAttentionPass
from graphopt.passes.fusion.ort.attention_mask import OrtAttentionMaskPass
from graphopt.passes.fusion.ort.packed_attention import OrtPackedAttentionPass
from graphopt.passes.fusion.ort.skip_layer_norm import OrtResidualSumPass, OrtSkipLayerNormPass
from graphopt.registry import PassContext
from graphopt.verify import run_model
from graphopt_tests.helpers import assert_same_outputs, op_types, roundtrip, run_pass

ORT = PassContext(target="ort")
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
HIDDEN, HEADS = 16, 2


def contrib_ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")


def padded_feeds(
    model, batch: int, length: int, seed: int = 3, left: bool = False
) -> dict[str, np.ndarray]:
    """Generated inputs with right-padded attention masks (row b loses its last 2·b tokens);
    ``left``: row b loses its first 2·b tokens and the last row all (fully masked rows)."""
    shapes = {
        v.name: (batch, length, *[d for d in v.shape.dims[2:] if isinstance(d, int)])
        for v in model.graph.inputs
    }
    feeds = make_inputs(model, shapes, seed=seed)
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        mask[b, : 2 * b] = 0 if left else 1
        mask[b, length - 2 * b :] = 1 if left else 0
    if left:
        mask[-1] = 0
    feeds["attention_mask"] = mask
    return feeds


def assert_same_padded(before, after, shapes=((2, 9), (3, 16)), left: bool = False) -> None:
    for batch, length in shapes:
        feeds = padded_feeds(before, batch, length, left=left)
        for i, (r, g) in enumerate(
            zip(run_model(before, feeds), run_model(after, feeds), strict=True)
        ):
            assert compare(str(i), r, g).max_rel <= 1e-4, (batch, length, i)


def mha_model(inverted_mask: bool = False):
    """Three bias-free projections of x into a MultiHeadAttention whose additive bias is built
    from a (batch, seq) 0/1 mask as (1 - mask)·-10000 (or, ``inverted``, mask·-10000)."""
    rng = np.random.default_rng(0)
    weights = {f"w{c}": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) for c in "qkv"}
    weights.update(
        one=np.array(1.0, np.float32),
        low=np.array(-10000.0, np.float32),
        axes=np.array([1, 2], np.int64),
        one_int=np.array([1], np.int64),
    )
    keep = "m" if not inverted_mask else "one_minus"
    nodes = [helper.make_node("MatMul", ["x", f"w{c}"], [c]) for c in "qkv"] + [
        helper.make_node("Cast", ["attention_mask"], ["m"], to=FLOAT),
        helper.make_node("Sub", ["one", "m"], ["one_minus"]),
        helper.make_node("Sub", ["one", keep], ["dropped"]),
        helper.make_node("Mul", ["dropped", "low"], ["bias2d"]),
        helper.make_node("Unsqueeze", ["bias2d", "axes"], ["bias_row"]),
        # (batch, 1, seq, seq) as transformers expands it: MHA wants the query axis in full.
        helper.make_node("Shape", ["attention_mask"], ["b"], start=0, end=1),
        helper.make_node("Shape", ["attention_mask"], ["s"], start=1, end=2),
        helper.make_node("Concat", ["b", "one_int", "s", "s"], ["shape4"], axis=0),
        helper.make_node("Expand", ["bias_row", "shape4"], ["bias4d"]),
        helper.make_node(
            "MultiHeadAttention",
            ["q", "k", "v", "", "", "bias4d"],
            ["y"],
            domain="com.microsoft",
            num_heads=HEADS,
        ),
    ]
    inputs = [
        helper.make_tensor_value_info("x", FLOAT, ["batch", "sequence", HIDDEN]),
        helper.make_tensor_value_info("attention_mask", INT64, ["batch", "sequence"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mha",
        inputs,
        [helper.make_tensor_value_info("y", FLOAT, ["batch", "sequence", HIDDEN])],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
    return load(proto).model


def test_bias_free_projections_pack_into_attention_and_mask_becomes_mask_index():
    model = mha_model()
    assert run_pass(model, OrtPackedAttentionPass)[1] == 0  # portable target: untouched
    packed, hits = run_pass(model, OrtPackedAttentionPass, ORT)
    assert hits == 1 and contrib_ops(packed) == {"Attention": 1}
    (attention,) = [n for n in packed.graph if n.op_type == "Attention"]
    assert attention.inputs[1].const_value.shape == (HIDDEN, 3 * HIDDEN)
    assert_same_padded(model, roundtrip(packed))

    masked, hits = run_pass(packed, OrtAttentionMaskPass, ORT)
    assert hits == 1
    (attention,) = [n for n in masked.graph if n.op_type == "Attention"]
    assert len(attention.inputs) == 4  # x, weights, bias, mask_index: no additive bias left
    assert attention.inputs[3].dtype.name == "INT32"
    assert "unidirectional" not in attention.attributes
    assert attention.attributes["mask_filter_value"].as_float() == -10000.0  # the bias's fill
    assert_same_padded(model, roundtrip(masked))
    assert_same_padded(model, roundtrip(masked), left=True)


def test_mask_that_is_not_a_padding_mask_is_refused():
    # mask·-10000 masks the kept tokens: the probes see it is not what mask_index means.
    model = mha_model(inverted_mask=True)
    packed, hits = run_pass(model, OrtPackedAttentionPass, ORT)
    assert hits == 1
    _, hits = run_pass(packed, OrtAttentionMaskPass, ORT)
    assert hits == 0


def test_skip_layer_norm_needs_force_on_cpu():
    model = load(models.get("bert_tiny_ts")).model
    assert run_pass(model, OrtSkipLayerNormPass, ORT)[1] == 0
    assert run_pass(model, OrtSkipLayerNormPass, ORT, force=True)[1] == 4


def test_residual_add_before_layer_norm_becomes_sum():
    model = load(models.get("bert_tiny_ts")).model
    assert run_pass(model, OrtResidualSumPass)[1] == 0
    summed, hits = run_pass(model, OrtResidualSumPass, ORT)
    assert hits == 5  # embeddings + 2 per layer
    for node in summed.graph:
        if node.op_type == "LayerNormalization":
            assert node.inputs[0].producer().op_type == "Sum"
    assert_same_outputs(model, roundtrip(summed), shapes=models.input_shapes("bert_tiny_ts"))


@pytest.mark.parametrize(
    ("name", "causal"),
    [("bert_tiny_ts", False), ("bert_tiny", False), ("gpt2_tiny", True), ("gpt2_tiny_ts", True)],
)
def test_exports_get_packed_attention_with_mask_index(name, causal):
    model = load(models.get(name)).model
    fused, _ = run_pass(model, OrtAttentionPass, ORT)
    fused, _ = run_pass(fused, OrtPackedAttentionPass, ORT)
    fused, hits = run_pass(fused, OrtAttentionMaskPass, ORT)
    assert hits == 2
    assert contrib_ops(fused) == {"Attention": 2}
    assert "MultiHeadAttention" not in op_types(fused)
    for node in fused.graph:
        if node.op_type == "Attention":
            assert len(node.inputs) == 4  # no additive bias input left
            assert bool(node.attributes.get("unidirectional")) == causal
    assert_same_padded(model, roundtrip(fused))
    # Fully masked query rows (left padding, an all-zero row): ORT's mask_filter_value and
    # its causal fill must give the bias's even spread there too.
    assert_same_padded(model, roundtrip(fused), left=True)


def test_pipeline_target_ort_packs_and_verifies_minilm():
    from graphopt import api

    source = models.get("minilm")
    result = api.optimize(source, None, api.OptimizeOptions(target="ort"))
    assert result.report.verification is not None and result.report.verification.ok
    assert not result.report.rolled_back
    ops = contrib_ops(result.model)
    assert ops == {"Attention": 6, "BiasGelu": 6}
    assert all(len(n.inputs) == 4 for n in result.model.graph if n.op_type == "Attention")
    assert_same_padded(load(source).model, result.model)
