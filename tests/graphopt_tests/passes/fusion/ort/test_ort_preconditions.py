"""--target ort fusions refuse what they cannot prove: each case fused wrongly before.

Every model here is checked against the original in ORT at several input shapes, among them
the one where the old rewrite went wrong (a broadcast batch of 1, a sequence longer than the
mask probes); where the fusion must still fire, a control case says so.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.io import load, to_proto
from graphopt.output_errors import compare
from graphopt.passes.fusion.ort._base import _merges_input_dims
from graphopt.passes.fusion.ort.attention import OrtAttentionPass
from graphopt.passes.fusion.ort.attention_mask import OrtAttentionMaskPass
from graphopt.passes.fusion.ort.gelu import OrtGeluPass
from graphopt.passes.fusion.ort.packed_attention import OrtPackedAttentionPass
from graphopt.passes.fusion.ort.skip_layer_norm import OrtSkipLayerNormPass, OrtSkipRmsNormPass
from graphopt.registry import PassContext
from graphopt.verify import run_model
from graphopt_tests.helpers import make_model, run_pass, tensor_info

ORT = PassContext(target="ort")
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
HEADS, HEAD_SIZE = 2, 4
HIDDEN = HEADS * HEAD_SIZE


def build(nodes, inputs, weights: dict[str, np.ndarray], opset: int = 17):
    """A model with output ``y`` of unknown shape: a fusion that changes it shows in ORT."""
    output = helper.make_tensor_value_info("y", FLOAT, None)
    graph = helper.make_graph(
        nodes, "test", inputs, [output], [numpy_helper.from_array(v, k) for k, v in weights.items()]
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return load(proto).model


def ops(model) -> Counter:
    return Counter(node.op_type for node in model.graph)


def assert_same(before, after, feeds: list[dict[str, np.ndarray]]) -> None:
    """Same output shapes and values (1e-4 relative) in ORT for every feed."""
    after = load(to_proto(after)).model  # what would be saved
    for feed in feeds:
        for value, ref, got in zip(
            before.graph.outputs, run_model(before, feed), run_model(after, feed), strict=True
        ):
            err = compare(value.name, ref, got)
            assert err.shape_ok, ({k: v.shape for k, v in feed.items()}, err.detail)
            assert err.max_rel <= 1e-4, ({k: v.shape for k, v in feed.items()}, err.max_rel)


def normal(*shape: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.5).astype(np.float32)


# --- A1: a sliding-window mask is not a causal one ---


def windowed_attention(window: int | None, fill: float = -1e9):
    """BERT-style attention whose additive bias keeps key j for query i when the 2-D mask
    keeps j, j <= i and (with ``window``) i - j < window; ``fill`` elsewhere."""
    nodes, weights = (
        [],
        {
            "rs": np.array([0, -1, HEADS, HEAD_SIZE]),
            "os": np.array([0, 0, HIDDEN]),
            "sc": np.array(HEAD_SIZE**-0.5, np.float32),
        },
    )
    for i, t in enumerate("qkv"):
        weights |= {f"W{t}": normal(HIDDEN, HIDDEN, seed=i), f"b{t}": normal(HIDDEN, seed=9 + i)}
        nodes += [
            helper.make_node("MatMul", ["x", f"W{t}"], [f"{t}0"]),
            helper.make_node("Add", [f"{t}0", f"b{t}"], [t]),
            helper.make_node("Reshape", [t, "rs"], [f"{t}r"]),
            helper.make_node("Transpose", [f"{t}r"], [f"{t}4"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q4", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "sc"], ["s1"]),
        helper.make_node("Shape", ["attention_mask"], ["ms"]),
        helper.make_node("Gather", ["ms", "i1"], ["S"], axis=0),
        helper.make_node("Range", ["i0", "S", "i1"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "a1"], ["qi"]),
        helper.make_node("Unsqueeze", ["pos", "a0"], ["ki"]),
        helper.make_node("LessOrEqual", ["ki", "qi"], ["causal"]),
    ]
    if window is not None:
        weights["W"] = np.array(window, np.int64)
        nodes += [
            helper.make_node("Sub", ["qi", "ki"], ["dist"]),
            helper.make_node("Less", ["dist", "W"], ["win"]),
            helper.make_node("And", ["causal", "win"], ["allowed"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["causal"], ["allowed"]))
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["mb"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["mb", "a12"], ["mb4"]),
        helper.make_node("And", ["mb4", "allowed"], ["keep"]),
        helper.make_node("Where", ["keep", "f0", "fneg"], ["bias"]),
        helper.make_node("Add", ["s1", "bias"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v4"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o3", "os"], ["y"]),
    ]
    weights |= {
        "i0": np.array(0, np.int64),
        "i1": np.array(1, np.int64),
        "a0": np.array([0]),
        "a1": np.array([1]),
        "a12": np.array([1, 2]),
        "f0": np.array(0, np.float32),
        "fneg": np.array(fill, np.float32),
    }
    inputs = [
        tensor_info("x", FLOAT, ["B", "S", HIDDEN]),
        tensor_info("attention_mask", INT64, ["B", "S"]),
    ]
    return make_model(nodes, inputs, [tensor_info("y", FLOAT, ["B", "S", HIDDEN])], weights)


def mask_feeds(lengths=(16, 150), left: bool = False) -> list[dict[str, np.ndarray]]:
    """Right padding in the second row (``left``: left padding, fully masked query rows)."""
    feeds = []
    for batch, length in zip((1, 2), lengths, strict=True):
        mask = np.ones((batch, length), np.int64)
        if left:
            mask[1:, :3] = 0
        else:
            mask[1:, length - 3 :] = 0
        feeds.append({"x": normal(batch, length, HIDDEN, seed=length), "attention_mask": mask})
    return feeds


def attention_with_mask_index(model):
    fused, hits = run_pass(model, OrtAttentionPass, ORT)
    assert hits == 1 and "Attention" in ops(fused)
    fused, _ = run_pass(fused, OrtPackedAttentionPass, ORT)
    return run_pass(fused, OrtAttentionMaskPass, ORT)


def test_sliding_window_mask_is_not_taken_for_causal():
    """The probes (lengths 7, 5, 12) saw a window of 100 as causal: unidirectional=1 then
    attended to every earlier key, 0.23 off at length 150. Its width is a constant in the
    mask computation, which the audit refuses."""
    model = windowed_attention(window=100)
    fused, hits = attention_with_mask_index(model)
    assert hits == 0
    (attention,) = [n for n in fused.graph if n.op_type == "Attention"]
    assert "unidirectional" not in attention.attributes
    assert_same(model, fused, mask_feeds())


def test_plain_causal_mask_still_becomes_unidirectional():
    # transformers' fill, float32's lowest: what ORT's causal part fills the later keys with.
    model = windowed_attention(window=None, fill=float(np.finfo(np.float32).min))
    fused, hits = attention_with_mask_index(model)
    assert hits == 1
    (attention,) = [n for n in fused.graph if n.op_type == "Attention"]
    assert attention.attributes["unidirectional"].as_int() == 1
    assert_same(model, fused, mask_feeds())
    assert_same(model, fused, mask_feeds(left=True))


def test_causal_mask_with_another_fill_is_refused():
    """A causal bias filled with -1e9: on a left-padded row's fully masked queries the bias
    spreads the weight by the scores over every key, ORT's unidirectional mask (later keys
    at lowest whatever mask_filter_value says) over the padded ones only."""
    model = windowed_attention(window=None)
    fused, hits = attention_with_mask_index(model)
    assert hits == 0
    assert_same(model, fused, mask_feeds(left=True))


# --- A2 / B1: dims are equal only when provably so ---


def rms_norm_nodes(x: str, eps: str = "eps", scale: str = "G") -> list:
    return [
        helper.make_node("Pow", [x, "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "ax"], ["ms"], keepdims=1, noop_with_empty_axes=0),
        helper.make_node("Add", ["ms", eps], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rt"]),
        helper.make_node("Reciprocal", ["rt"], ["rr"]),
        helper.make_node("Mul", [x, "rr"], ["nx"]),
        helper.make_node("Mul", ["nx", scale], ["y"]),
    ]


def rms_weights(eps: float | np.ndarray = 1e-5, scale=None) -> dict[str, np.ndarray]:
    return {
        "two": np.array(2, np.float32),
        "ax": np.array([-1]),
        "eps": np.asarray(eps, np.float32),
        "G": normal(HIDDEN, seed=3) if scale is None else scale,
    }


def residual_feeds(batches) -> list[dict[str, np.ndarray]]:
    return [
        {"x": normal(bx, 4, HIDDEN, seed=bx), "s": normal(bs, 4, HIDDEN, seed=7 + bs)}
        for bx, bs in batches
    ]


@pytest.mark.parametrize(("batch_x", "batch_s"), [(None, None), ("B", "B2")])
def test_skip_rms_norm_needs_provably_equal_residual_shapes(batch_x, batch_s):
    """onnxscript called two unknown batch dims equal: x batch 3 + s batch 1 came out as
    batch 1. ORT's symbolic shapes (the retry) merge either pair, unknown or B and B2, into
    one name: that retry must not count them equal either."""
    nodes = [helper.make_node("Add", ["x", "s"], ["h"]), *rms_norm_nodes("h")]
    inputs = [
        tensor_info("x", FLOAT, [batch_x, 4, HIDDEN]),
        tensor_info("s", FLOAT, [batch_s, 4, HIDDEN]),
    ]
    model = build(nodes, inputs, rms_weights(), opset=18)
    fused, _ = run_pass(model, OrtSkipRmsNormPass, ORT)
    assert "SkipSimplifiedLayerNormalization" not in ops(fused)
    assert_same(model, fused, residual_feeds([(3, 3), (3, 1), (1, 3)]))


def test_skip_rms_norm_still_fuses_named_batch():
    nodes = [helper.make_node("Add", ["x", "s"], ["h"]), *rms_norm_nodes("h")]
    inputs = [tensor_info(n, FLOAT, ["batch", 4, HIDDEN]) for n in ("x", "s")]
    model = build(nodes, inputs, rms_weights(), opset=18)
    fused, hits = run_pass(model, OrtSkipRmsNormPass, ORT)
    assert hits == 1 and ops(fused)["SkipSimplifiedLayerNormalization"] == 1
    assert_same(model, fused, residual_feeds([(1, 1), (3, 3)]))


def test_skip_layer_norm_needs_provably_equal_residual_shapes():
    """The same flaw in the LayerNormalization form (fused with ``force``)."""
    nodes = [
        helper.make_node("Add", ["x", "s"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "G", "beta"], ["y"], axis=-1),
    ]
    inputs = [tensor_info(n, FLOAT, [None, 4, HIDDEN]) for n in ("x", "s")]
    weights = {"G": normal(HIDDEN, seed=1), "beta": normal(HIDDEN, seed=2)}
    model = build(nodes, inputs, weights)
    fused, hits = run_pass(model, OrtSkipLayerNormPass, ORT, force=True)
    assert hits == 0 and "SkipLayerNormalization" not in ops(fused)
    assert_same(model, fused, residual_feeds([(3, 3), (3, 1)]))


def cross_attention(memory_batch: str):
    """Q from x (B, 3, D), K and V from ``mem`` (memory_batch, 3, D)."""
    weights = {
        "rs": np.array([0, 0, HEADS, HEAD_SIZE]),
        "os": np.array([0, 0, HIDDEN]),
        "sc": np.array(HEAD_SIZE**-0.5, np.float32),
    }
    nodes = []
    for i, (t, source) in enumerate((("q", "x"), ("k", "mem"), ("v", "mem"))):
        weights[f"W{t}"] = normal(HIDDEN, HIDDEN, seed=i)
        nodes += [
            helper.make_node("MatMul", [source, f"W{t}"], [t]),
            helper.make_node("Reshape", [t, "rs"], [f"{t}r"]),
            helper.make_node("Transpose", [f"{t}r"], [f"{t}4"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q4", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "sc"], ["s1"]),
        helper.make_node("Softmax", ["s1"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v4"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o3", "os"], ["y"]),
    ]
    inputs = [
        tensor_info("x", FLOAT, ["B", 3, HIDDEN]),
        tensor_info("mem", FLOAT, [memory_batch, 3, HIDDEN]),
    ]
    return build(nodes, inputs, weights)


def test_cross_attention_with_its_own_memory_batch_is_not_fused():
    """ONNX's shapes refused it, but the retry on ORT's symbolic shapes (auto_merge made B2
    into B at the broadcasting Q·Kᵀ) fused it; MultiHeadAttention then failed on a memory of
    batch 1 ("query, key and value shall have same dim 0")."""
    model = cross_attention("B2")
    fused, hits = run_pass(model, OrtAttentionPass, ORT)
    assert hits == 0
    feeds = [
        {"x": normal(b, 3, HIDDEN), "mem": normal(m, 3, HIDDEN, seed=1)}
        for b, m in ((2, 2), (2, 1))
    ]
    assert_same(model, fused, feeds)


def test_cross_attention_sharing_the_batch_dim_still_fuses():
    model = cross_attention("B")
    fused, hits = run_pass(model, OrtAttentionPass, ORT)
    assert hits == 1 and "Softmax" not in ops(fused)
    feeds = [{"x": normal(b, 3, HIDDEN), "mem": normal(b, 3, HIDDEN, seed=1)} for b in (1, 3)]
    assert_same(model, fused, feeds)


def test_merged_graph_input_dims_are_detected():
    """The check behind the cross-attention case, on its own: renaming an unknown dim is no
    merge, making two dims (two unknowns, or B and B2) one is, and so is pinning one."""
    before = {"x": ir.Shape(["B", None, 8]), "m": ir.Shape(["B2", None, 8])}

    def graph(x_dims, m_dims):
        inputs = [ir.Value(name=n, shape=ir.Shape(d)) for n, d in (("x", x_dims), ("m", m_dims))]
        return ir.Graph(inputs, [], nodes=[])

    assert not _merges_input_dims(before, graph(["B", "u0", 8], ["B2", "u1", 8]))
    assert _merges_input_dims(before, graph(["B", "u0", 8], ["B", "u1", 8]))
    assert _merges_input_dims(before, graph(["B", "u0", 8], ["B2", "u0", 8]))
    assert _merges_input_dims(before, graph(["B", 3, 8], ["B2", "u1", 8]))


# --- B2: BiasGelu only for a bias along x's last axis ---


def erf_gelu_nodes(h: str) -> list:
    return [
        helper.make_node("Div", [h, "sqrt2"], ["t1"]),
        helper.make_node("Erf", ["t1"], ["t2"]),
        helper.make_node("Add", ["t2", "one"], ["t3"]),
        helper.make_node("Mul", [h, "t3"], ["t4"]),
        helper.make_node("Mul", ["t4", "half"], ["y"]),
    ]


GELU_CONSTANTS = {
    "sqrt2": np.array(math.sqrt(2), np.float32),
    "one": np.array(1, np.float32),
    "half": np.array(0.5, np.float32),
}


def test_bias_gelu_refuses_a_bias_that_broadcasts():
    """Add(x[N], b[M]) then erf Gelu became BiasGelu, which fails at M = 1 (ORT: "Input 1
    dimension 0 should have same length as the last dimension of input 0")."""
    nodes = [helper.make_node("Add", ["x", "b"], ["h"]), *erf_gelu_nodes("h")]
    inputs = [tensor_info("x", FLOAT, ["N"]), tensor_info("b", FLOAT, ["M"])]
    model = build(nodes, inputs, GELU_CONSTANTS)
    fused, hits = run_pass(model, OrtGeluPass, ORT)
    assert hits == 1 and "BiasGelu" not in ops(fused) and ops(fused)["Gelu"] == 1
    feeds = [{"x": normal(4), "b": normal(m, seed=1)} for m in (4, 1)]
    assert_same(model, fused, feeds)


@pytest.mark.parametrize(("x_dims", "bias"), [(["N", 8], [1]), (["N", 1], [8])])
def test_bias_gelu_refuses_a_constant_bias_of_another_length(x_dims, bias):
    """ONNX-20 Gelu after Add(x, b) with b of shape [1] on x [N, 8], or [8] on x [N, 1]."""
    nodes = [helper.make_node("Add", ["x", "b"], ["h"]), helper.make_node("Gelu", ["h"], ["y"])]
    weights = {"b": normal(*bias, seed=2)}
    model = build(nodes, [tensor_info("x", FLOAT, x_dims)], weights, 20)
    fused, _ = run_pass(model, OrtGeluPass, ORT)
    assert "BiasGelu" not in ops(fused)
    assert_same(model, fused, [{"x": normal(n, x_dims[1], seed=n)} for n in (2, 5)])


# --- C: shapes the fused ops keep ---


@pytest.mark.parametrize(
    ("eps", "scale"),
    [(np.full((1, 1, 1), 1e-5, np.float32), None), (np.float32(1e-5), normal(3, 1, HIDDEN))],
    ids=["epsilon-1x1x1", "scale-3x1xD"],
)
def test_rms_norm_keeps_the_original_shape(eps, scale):
    """An epsilon of more axes than x, or a scale of more than the normalized axis, broadcast
    the original ((1, N, 8) resp. (3, N, 8)); SimplifiedLayerNormalization gave (N, 8)."""
    model = build(
        rms_norm_nodes("x"),
        [tensor_info("x", FLOAT, ["N", HIDDEN])],
        rms_weights(eps, scale),
        opset=18,
    )
    fused, hits = run_pass(model, OrtSkipRmsNormPass, ORT)
    assert hits == 0 and "SimplifiedLayerNormalization" not in ops(fused)
    assert_same(model, fused, [{"x": normal(n, HIDDEN, seed=n)} for n in (2, 4)])


def test_rms_norm_with_vector_scale_still_fuses():
    model = build(
        rms_norm_nodes("x"),
        [tensor_info("x", FLOAT, ["N", 4, HIDDEN])],
        rms_weights(),
        opset=18,
    )
    fused, hits = run_pass(model, OrtSkipRmsNormPass, ORT)
    assert hits == 1 and ops(fused)["SimplifiedLayerNormalization"] == 1
    assert_same(model, fused, [{"x": normal(n, 4, HIDDEN, seed=n)} for n in (1, 3)])


def self_attention(
    out_shape=(0, 0, -1),
    key_path: str = "transpose",
    mask: np.ndarray | None = None,
    length=3,
    q_bias_size: int = HIDDEN,
):
    """Self-attention over x (B, length, D) with a static length, as the probes built it.

    ``key_path``: Kᵀ as one Transpose, or through 3-D: "heads" merges (B, H) and splits them
    back, "mixed" flattens (H, S) together, which mixes the heads' keys.
    """
    weights = {
        "rs": np.array([0, 0, HEADS, HEAD_SIZE]),
        "os": np.array(out_shape),
        "sc": np.array(HEAD_SIZE**-0.5, np.float32),
        "bq": normal(q_bias_size, seed=5),
    }
    nodes = []
    for i, t in enumerate("qkv"):
        weights[f"W{t}"] = normal(HIDDEN, HIDDEN, seed=i)
        projection = [helper.make_node("MatMul", ["x", f"W{t}"], [f"{t}0" if t == "q" else t])]
        if t == "q":  # a biased query, as in BERT
            projection.append(helper.make_node("Add", ["q0", "bq"], ["q"]))
        nodes += [
            *projection,
            helper.make_node("Reshape", [t, "rs"], [f"{t}r"]),
            helper.make_node("Transpose", [f"{t}r"], [f"{t}4"], perm=[0, 2, 1, 3]),
        ]
    if key_path == "transpose":
        nodes.append(helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 1, 3, 2]))
    else:
        flat, back = {
            "heads": ([-1, length, HEAD_SIZE], [-1, HEADS, HEAD_SIZE, length]),
            "mixed": ([0, -1, HEAD_SIZE], [0, HEADS, HEAD_SIZE, -1]),
        }[key_path]
        weights |= {"k3s": np.array(flat), "k4s": np.array(back)}
        nodes += [
            helper.make_node("Reshape", ["k4", "k3s"], ["k3"]),
            helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
            helper.make_node("Reshape", ["k3t", "k4s"], ["kt"]),
        ]
    nodes += [
        helper.make_node("MatMul", ["q4", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "sc"], ["s1"]),
    ]
    scores = "s1"
    if mask is not None:
        weights["mask"] = mask
        nodes.append(helper.make_node("Add", ["s1", "mask"], ["s2"]))
        scores = "s2"
    nodes += [
        helper.make_node("Softmax", [scores], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v4"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o3", "os"], ["y"]),
    ]
    inputs = [tensor_info("x", FLOAT, ["B", length, HIDDEN])]
    return build(nodes, inputs, weights)


def batch_feeds(length=3) -> list[dict[str, np.ndarray]]:
    return [{"x": normal(b, length, HIDDEN, seed=b)} for b in (1, 3)]


def test_attention_keeps_an_output_reshape_that_is_not_b_s_d():
    """The MHA rule absorbed a final Reshape to (B, S·H, Dh) as if it were (B, S, D)."""
    model = self_attention(out_shape=(0, 3 * HEADS, HEAD_SIZE))
    fused, hits = run_pass(model, OrtAttentionPass, ORT)
    assert hits == 1 and "Softmax" not in ops(fused)
    assert_same(model, fused, batch_feeds())


@pytest.mark.parametrize(("key_path", "fuses"), [("mixed", False), ("heads", True)])
def test_attention_checks_the_keys_3d_detour(key_path, fuses):
    """Kᵀ as Reshape [0, -1, Dh] → Transpose → Reshape [0, H, Dh, -1] mixes the heads' keys;
    the SDPA rule took it for Kᵀ (0.58 off). The per-head detour is still fused."""
    model = self_attention(key_path=key_path)
    fused, hits = run_pass(model, OrtAttentionPass, ORT)
    assert hits == int(fuses)
    assert_same(model, fused, batch_feeds())


@pytest.mark.parametrize(
    ("mask_shape", "fuses"),
    [((1, 1, 3, 1), False), ((1, HEADS, 3, 3), True), ((1, 1, 1, 3), True), ((3, 3), True)],
)
def test_attention_mask_must_fit_attention_bias(mask_shape, fuses):
    """A (1, 1, S, 1) mask, broadcast over the keys by the Add, became MHA's attention_bias,
    which ORT rejects ("dimension 3 should be same as total_sequence_length")."""
    model = self_attention(mask=normal(*mask_shape, seed=4) * 6)
    fused, hits = run_pass(model, OrtAttentionPass, ORT)
    assert hits == int(fuses)
    assert_same(model, fused, batch_feeds())


def test_attention_packs_only_bias_vectors_of_the_hidden_size():
    """A query bias of shape [1] (broadcast by its Add) went into MHA's packed bias input as
    if it were [D], making a bias of 2·D + 1 values; it stays a separate Add now."""
    model = self_attention(q_bias_size=1)
    fused, hits = run_pass(model, OrtAttentionPass, ORT)
    assert hits == 1 and "Softmax" not in ops(fused)
    assert_same(model, fused, batch_feeds())
