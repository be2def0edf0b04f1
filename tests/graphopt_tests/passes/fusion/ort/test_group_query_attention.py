"""--target ort: attention over repeated K/V heads → com.microsoft GroupQueryAttention."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt import models
from graphopt.inputs import make_inputs
from graphopt.io import load
from graphopt.output_errors import compare
from graphopt.passes.fusion.ort.group_query_attention import OrtGroupQueryAttentionPass
from graphopt.passes.fusion.ort.rotary import OrtRotaryEmbeddingPass
from graphopt.registry import PassContext
from graphopt.verify import run_model
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)
from graphopt_tests.models.cases import require

ORT = PassContext(target="ort")
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
HIDDEN, HEADS, KV_HEADS, HEAD = 16, 4, 2, 8
TOLERANCE = 1e-4


def contrib_ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")


def gqa_model(
    repeat_axis: int = 2, kv_heads: int = KV_HEADS, head: int = HEAD, nan_guard: bool = False
):
    """Decomposed causal attention of x with K/V projected to ``kv_heads`` heads and repeated.

    ``repeat_axis=2`` repeats each K/V head G times in a row (transformers' ``repeat_kv``: query
    head h reads K/V head h // G, GroupQueryAttention's grouping); ``repeat_axis=1`` tiles the
    K/V heads (head h reads h % Hkv), which GroupQueryAttention cannot express.
    """
    rng = np.random.default_rng(0)
    group = HEADS // kv_heads
    kv_hidden = kv_heads * head
    weights = {
        "wq": rng.standard_normal((HIDDEN, HEADS * head)).astype(np.float32),
        "wk": rng.standard_normal((HIDDEN, kv_hidden)).astype(np.float32),
        "wv": rng.standard_normal((HIDDEN, kv_hidden)).astype(np.float32),
        "q_shape": np.array([0, 0, HEADS, head], np.int64),
        "kv_shape": np.array([0, 0, kv_heads, head], np.int64),
        "axes": np.array([repeat_axis], np.int64),
        "out_shape": np.array([0, 0, HEADS * head], np.int64),
        "scale": np.array(1 / np.sqrt(head), np.float32),
        "zero": np.array(0.0, np.float32),
        "low": np.array(np.finfo(np.float32).min, np.float32),
        "ones": np.array(1.0, np.float32),
        "two_axes": np.array([1, 2], np.int64),
    }

    def heads(name: str, shape: str) -> list:
        return [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_bsd"]),
            helper.make_node("Reshape", [f"{name}_bsd", shape], [f"{name}_bshd"]),
            helper.make_node("Transpose", [f"{name}_bshd"], [f"{name}_bhsd"], perm=[0, 2, 1, 3]),
        ]

    def repeat(name: str) -> list:
        return [
            helper.make_node("Unsqueeze", [f"{name}_bhsd", "axes"], [f"{name}_5d"]),
            # Target (…, G, …) from the shape, as exporters build it: Shape slices + Concat.
            helper.make_node("Shape", [f"{name}_5d"], [f"{name}_lead"], start=0, end=repeat_axis),
            helper.make_node("Shape", [f"{name}_5d"], [f"{name}_tail"], start=repeat_axis + 1),
            helper.make_node(
                "Concat", [f"{name}_lead", "group", f"{name}_tail"], [f"{name}_target"], axis=0
            ),
            helper.make_node("Expand", [f"{name}_5d", f"{name}_target"], [f"{name}_g"]),
            helper.make_node("Shape", ["q_bhsd"], [f"{name}_rep_shape"]),
            helper.make_node("Reshape", [f"{name}_g", f"{name}_rep_shape"], [f"{name}_rep"]),
        ]

    weights["group"] = np.array([group], np.int64)
    nodes = heads("q", "q_shape") + heads("k", "kv_shape") + heads("v", "kv_shape")
    nodes += repeat("k") + repeat("v")
    # Causal and padding mask from the (batch, seq) 0/1 mask, as an additive (B, 1, S, S) bias.
    nodes += [
        # Lower-triangular (S, S) from the mask's shape (Expand + Trilu: shapes stay known).
        helper.make_node("Shape", ["attention_mask"], ["s"], start=1, end=2),
        helper.make_node("Concat", ["s", "s"], ["ss"], axis=0),
        helper.make_node("Expand", ["ones", "ss"], ["square"]),
        helper.make_node("Trilu", ["square"], ["tril"], upper=0),
        helper.make_node("Cast", ["tril"], ["causal"], to=TensorProto.BOOL),
        helper.make_node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["keep", "two_axes"], ["keep4"]),
        helper.make_node("And", ["causal", "keep4"], ["allowed"]),
        helper.make_node("Where", ["allowed", "zero", "low"], ["bias"]),
        helper.make_node("Transpose", ["k_rep"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_bhsd", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
    ]
    if nan_guard:  # the NaN guard onnxscript's SDPA rule absorbs: NaN rows become 0
        nodes += [
            helper.make_node("IsNaN", ["probs"], ["nan"]),
            helper.make_node("Where", ["nan", "zero", "probs"], ["weights"]),
        ]
    nodes += [
        helper.make_node("MatMul", ["weights" if nan_guard else "probs", "v_rep"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_bshd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_bshd", "out_shape"], ["y"]),
    ]
    inputs = [
        tensor_info("x", FLOAT, ["batch", "sequence", HIDDEN]),
        tensor_info("attention_mask", INT64, ["batch", "sequence"]),
    ]
    outputs = [tensor_info("y", FLOAT, ["batch", "sequence", HEADS * head])]
    return make_model(nodes, inputs, outputs, weights, opset=18)


def padded_feeds(model, batch: int, length: int, side: str) -> dict[str, np.ndarray]:
    """Generated inputs; row b of the 0/1 mask loses 2·b tokens on the right or the left."""
    shapes = {
        v.name: (batch, length, *[d for d in v.shape.dims[2:] if isinstance(d, int)])
        for v in model.graph.inputs
    }
    feeds = make_inputs(model, shapes, seed=3)
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        if side == "right":
            mask[b, length - 2 * b :] = 0
        else:
            mask[b, : 2 * b] = 0
    feeds["attention_mask"] = mask
    return feeds


def assert_same_padded(before, after, side: str, shapes=((2, 9), (3, 16))) -> None:
    for batch, length in shapes:
        feeds = padded_feeds(before, batch, length, side)
        ref, got = run_model(before, feeds), run_model(after, feeds)
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            assert compare(str(i), r, g).max_rel <= TOLERANCE, (side, batch, length, i)


# --- hand-built ---


def test_gqa_fuses_only_for_ort_and_keeps_outputs():
    model = gqa_model()
    portable, hits = run_pass(model, OrtGroupQueryAttentionPass)
    assert hits == 0 and op_types(portable) == op_types(model)
    fused, hits = run_pass(model, OrtGroupQueryAttentionPass, ORT)
    assert hits == 1
    assert contrib_ops(fused) == {"GroupQueryAttention": 1}
    (node,) = [n for n in fused.graph if n.op_type == "GroupQueryAttention"]
    assert node.attributes["num_heads"].value == HEADS
    assert node.attributes["kv_num_heads"].value == KV_HEADS
    assert node.attributes["causal"].value == 0  # the bias carries the causal part
    assert abs(node.attributes["scale"].value - 1 / np.sqrt(HEAD)) < 1e-7
    # GQA reads the (B, S, ·) projections with Hkv K/V heads: the head transposes, the K/V
    # repetition and the softmax are gone.
    assert not {"Transpose", "Softmax"} & set(op_types(fused))
    assert op_types(fused).count("Reshape") == 0
    fused = roundtrip(fused)
    assert_same_outputs(model, fused, shapes={"x": (2, 7, HIDDEN), "attention_mask": (2, 7)})
    # The model's mask goes in whole as attention_bias: any padding is applied as before.
    assert_same_padded(model, fused, "right")
    assert_same_padded(model, fused, "left")


def test_tiled_kv_heads_are_not_fused():
    # Unsqueeze at axis 1 tiles the K/V heads (h → h % Hkv): not GQA's grouping, no match.
    model = gqa_model(repeat_axis=1)
    fused, hits = run_pass(model, OrtGroupQueryAttentionPass, ORT)
    assert hits == 0
    assert not contrib_ops(fused)
    assert op_types(fused) == op_types(model)  # the prepared working copy is not adopted


def test_head_size_not_multiple_of_8_is_not_fused():
    # ORT's GroupQueryAttention refuses such heads at run time: the pattern is left alone.
    model = gqa_model(head=4)
    fused, hits = run_pass(model, OrtGroupQueryAttentionPass, ORT)
    assert hits == 0 and not contrib_ops(fused)


def test_nan_guarded_softmax_is_not_fused():
    # Where(IsNaN(p), 0, p) zeroes fully masked rows; GQA would return NaN or uniform there.
    model = gqa_model(nan_guard=True)
    fused, hits = run_pass(model, OrtGroupQueryAttentionPass, ORT)
    assert hits == 0 and not contrib_ops(fused)


def test_equal_head_counts_are_not_fused():
    # Hkv == H: the "repeat" is by 1, plain multi-head attention (left to ort-attention).
    model = gqa_model(kv_heads=HEADS)
    fused, hits = run_pass(model, OrtGroupQueryAttentionPass, ORT)
    assert hits == 0 and not contrib_ops(fused)


# --- the cached LLaMA / Qwen2 exports (GQA: 4 query heads, 2 K/V heads, 2 layers) ---


def cached(name: str):
    require(name)
    return load(models.get(name)).model


def layers(name: str) -> int:
    return models.read_sidecar(models.get(name))["config"]["num_hidden_layers"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_tiny", "qwen2_tiny"])
def test_rotary_then_gqa_on_dynamo_exports(name):
    model = cached(name)
    rotated, hits = run_pass(model, OrtRotaryEmbeddingPass, ORT)
    assert hits == 2 * layers(name)
    fused, hits = run_pass(rotated, OrtGroupQueryAttentionPass, ORT)
    assert hits == layers(name)
    # Rotary stays separate (applied to the 3-D projections), attention is GQA.
    assert contrib_ops(fused) == {"RotaryEmbedding": 2 * layers(name), "GroupQueryAttention": 2}
    assert "Softmax" not in op_types(fused)
    assert not any(d.startswith("ai.onnxruntime._fusion") for d in fused.graph.opset_imports)
    fused = roundtrip(fused)
    assert_same_outputs(model, fused, shapes=models.input_shapes(name))
    assert_same_outputs(model, fused, shapes={k: (2, 7) for k in models.input_shapes(name)})
    assert_same_padded(model, fused, "right")
    assert_same_padded(model, fused, "left")


@pytest.mark.slow
def test_gqa_on_torchscript_llama():
    # ort-rotary does not recognize this export's RoPE; GQA takes the rotated heads back to
    # (B, S, ·) itself (the match needs ORT's symbolic shapes: the pass's second try).
    name = "llama_tiny_ts"
    model = cached(name)
    fused, hits = run_pass(model, OrtGroupQueryAttentionPass, ORT)
    assert hits == layers(name)
    assert contrib_ops(fused) == {"GroupQueryAttention": layers(name)}
    fused = roundtrip(fused)
    assert_same_outputs(model, fused, shapes=models.input_shapes(name))
    assert_same_padded(model, fused, "right")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_tiny", "llama_tiny_ts"])
def test_pipeline_target_ort_emits_gqa_and_verifies(name):
    # The TorchScript export too: after RotaryEmbedding, GQA no longer matched it (0 instead
    # of 2), so there ort-rotary leaves the rotation as it is and says why.
    from graphopt import api

    require(name)
    source = models.get(name)
    result = api.optimize(source, None, api.OptimizeOptions(target="ort"))
    assert result.report.verification is not None and result.report.verification.ok
    assert not result.report.rolled_back
    ops = contrib_ops(result.model)
    assert ops["GroupQueryAttention"] == layers("llama_tiny")
    assert "MultiHeadAttention" not in ops
    if name == "llama_tiny":
        assert ops["RotaryEmbedding"] == 2 * layers("llama_tiny")
    else:
        assert "RotaryEmbedding" not in ops
        assert any("RoPE left unfused" in note for note in result.report.notes)
    # Our own output optimized again is unchanged: the choice holds when GQA is already there
    # (fusing the rotation then, the TorchScript export grew by 13 nodes for no speed).
    again = api.optimize(result.model, None, api.OptimizeOptions(target="ort", verify=False))
    assert contrib_ops(again.model) == ops
    assert [n.op_type for n in again.model.graph] == [n.op_type for n in result.model.graph]
