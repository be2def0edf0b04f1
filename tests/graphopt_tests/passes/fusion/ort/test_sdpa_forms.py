"""--target ort on transformers' default (sdpa) attention exports: ``ort-sdpa-forms`` turns the
exporter's NaN-guarded SDPA into the form the attention fusions match, exactly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.io import load
from graphopt.passes.fusion.ort.attention import OrtAttentionPass
from graphopt.passes.fusion.ort.group_query_attention import OrtGroupQueryAttentionPass
from graphopt.passes.fusion.ort.rotary import OrtRotaryEmbeddingPass
from graphopt.passes.fusion.ort.sdpa_forms import OrtSdpaFormsPass
from graphopt.registry import PassContext
from graphopt.verify import run_model
from graphopt_tests.helpers import import_or_skip, make_model, tensor_info

ORT = PassContext(target="ort")
FLOAT = TensorProto.FLOAT
# The ORT passes the sdpa form must reach, in their pipeline order.
FUSIONS = (OrtRotaryEmbeddingPass, OrtGroupQueryAttentionPass, OrtAttentionPass)
TOLERANCE = 1e-5


def contrib_ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")


def fuse(model, forms: bool = True):
    """``model`` after ``ort-sdpa-forms`` (unless ``forms`` is False) and the ORT fusions."""
    for cls in ((OrtSdpaFormsPass,) if forms else ()) + FUSIONS:
        cls(ORT)(model)
    return model


def padded_feeds(batch: int, length: int) -> dict[str, np.ndarray]:
    """Token ids and a mask with a left-padded row, a right-padded row and a row masked
    entirely (its attention rows are fully masked: the NaN guard's case)."""
    rng = np.random.default_rng(batch * 100 + length)
    mask = np.ones((batch, length), np.int64)
    mask[0, :2] = 0
    mask[1, -3:] = 0
    mask[-1, :] = 0
    return {"input_ids": rng.integers(3, 100, (batch, length)), "attention_mask": mask}


def assert_exact(before, after, shapes=((3, 7), (4, 12))) -> None:
    """Same ORT outputs, no NaN, at two (batch, sequence) shapes with padding."""
    for batch, length in shapes:
        feeds = padded_feeds(batch, length)
        for ref, got in zip(run_model(before, feeds), run_model(after, feeds), strict=True):
            assert not np.isnan(ref).any() and not np.isnan(got).any()
            assert ref.shape == got.shape
            scale = max(float(np.abs(ref).max()), 1.0)
            assert float(np.abs(ref - got).max()) <= TOLERANCE * scale


def export_sdpa(kind: str, path: Path) -> Path:
    """A tiny transformers model with its default (sdpa) attention, TorchScript-exported."""
    torch = import_or_skip("torch", reason="needs torch")
    tf = import_or_skip("transformers", reason="needs transformers")
    torch.manual_seed(0)
    if kind == "roberta":
        config = tf.RobertaConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=72, attn_implementation="sdpa",
        )  # fmt: skip
        model, output = tf.RobertaModel(config), "last_hidden_state"
    else:  # GQA decoder: 4 query heads over 2 K/V heads
        config = tf.MistralConfig(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            attn_implementation="sdpa",
        )  # fmt: skip
        model, output = tf.MistralForCausalLM(config), "logits"

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.eval()

        def forward(self, input_ids, attention_mask):
            kwargs = {} if kind == "roberta" else {"use_cache": False}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return getattr(out, output)

    ids = torch.randint(3, 100, (2, 8))
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        Wrapper().eval(), (ids, torch.ones(2, 8, dtype=torch.long)), str(path),
        input_names=["input_ids", "attention_mask"], output_names=[output], opset_version=17,
        dynamic_axes={"input_ids": axes, "attention_mask": axes, output: axes}, dynamo=False,
    )  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("kind", "fused"),
    [("roberta", ("Attention", "MultiHeadAttention")), ("mistral", ("GroupQueryAttention",))],
)
def test_sdpa_export_fuses_exactly(tmp_path, kind, fused):
    path = export_sdpa(kind, tmp_path / f"{kind}.onnx")
    original = load(path).model
    # Before: the exporter's NaN guard ([0.0], not a scalar) stopped every attention rule.
    assert not any(contrib_ops(fuse(load(path).model, forms=False))[op] for op in fused)
    model = fuse(load(path).model)
    assert sum(contrib_ops(model)[op] for op in fused) == 2  # one per layer
    assert "IsNaN" not in {n.op_type for n in model.graph}
    assert_exact(original, model)


def guarded_attention(
    mask_low: float, mask_heads: int = 1, merge: str = "3d", scalar_zero: bool = False
):
    """Q·Kᵀ·scale + Where(m, 0, ``mask_low``) → Softmax → NaN guard → ·V → heads merged.

    x (B, S, 16) is Q, K and V (2 heads of 8); m (B, ``mask_heads``, S, S) is a bool input.
    ``merge``: "3d" reshapes to (B, S, 16), "flat" to (B·S, 16) as GPT-2's Conv1D does.
    """
    target = [0, 0, 16] if merge == "3d" else [-1, 16]
    weights = {
        "split": np.array([0, 0, 2, 8], np.int64),
        "merge": np.array(target, np.int64),
        "scale": np.array(0.5, np.float32),
        # The exporter's shape-[1] zero (``scalar_zero``: the form onnxscript's rule accepts).
        "zero": np.array(0.0 if scalar_zero else [0.0], np.float32),
        "low": np.array([mask_low], np.float32),
    }
    nodes = [
        helper.make_node("Reshape", ["x", "split"], ["x4"]),
        helper.make_node("Transpose", ["x4"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["x4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["q", "scale"], ["qs"]),
        helper.make_node("Mul", ["kt", "scale"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
        helper.make_node("Where", ["m", "zero", "low"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "p"], ["pg"]),
        helper.make_node("MatMul", ["pg", "q"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "merge"], ["merged"]),
        helper.make_node("Relu", ["merged"], ["y"]),
    ]
    inputs = [
        tensor_info("x", FLOAT, ["B", "S", 16]),
        tensor_info("m", TensorProto.BOOL, ["B", mask_heads, "S", "S"]),
    ]
    out = tensor_info("y", FLOAT, ["B", "S", 16] if merge == "3d" else ["BS", 16])
    return make_model(nodes, inputs, [out], weights)


def guarded_feeds(batch: int, length: int, heads: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(length)
    mask = rng.random((batch, heads, length, length)) > 0.4
    mask[0, :, 1, :] = False  # a fully masked query row
    mask[-1] = False  # a fully masked batch row
    return {"x": rng.standard_normal((batch, length, 16)).astype(np.float32), "m": mask}


@pytest.mark.parametrize("merge", ["3d", "flat"])
def test_minus_inf_mask_rows_zeroed_exactly(merge):
    model = guarded_attention(-np.inf, merge=merge)
    before = model.clone()
    assert OrtSdpaFormsPass(ORT)(model).modified
    types = Counter(n.op_type for n in model.graph)
    assert types["IsNaN"] == 0 and types["IsInf"] == 1
    for batch, length in ((2, 5), (3, 9)):
        feeds = guarded_feeds(batch, length)
        ref, got = run_model(before, feeds)[0], run_model(model, feeds)[0]
        assert not np.isnan(ref).any()
        np.testing.assert_array_equal(ref, got)  # nothing recomputed: bit-equal
    fuse(model, forms=False)
    assert contrib_ops(model)["MultiHeadAttention"] == 1
    for batch, length in ((2, 5), (3, 9)):
        feeds = guarded_feeds(batch, length)
        ref, got = run_model(before, feeds)[0], run_model(model, feeds)[0]
        assert not np.isnan(got).any()  # ORT's kernel gives NaN rows there: zeroed after
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_finite_mask_guard_just_goes():
    """A finfo.min mask (the dynamo exporter's) never makes a NaN row: no row zeroing."""
    model = guarded_attention(float(np.finfo(np.float32).min))
    before = model.clone()
    assert OrtSdpaFormsPass(ORT)(model).modified
    types = Counter(n.op_type for n in model.graph)
    assert types["IsNaN"] == 0 and types["IsInf"] == 0
    feeds = guarded_feeds(2, 6)
    feeds["m"][-1] = True  # every row keeps a key: the original has no fully masked row
    feeds["m"][0, :, 1, :] = True
    np.testing.assert_array_equal(run_model(before, feeds)[0], run_model(model, feeds)[0])


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: guarded_attention(-np.inf, mask_heads=2), id="per-head mask"),
        pytest.param(lambda: guarded_attention(np.inf), id="+inf mask"),
    ],
)
def test_unproven_forms_left_alone(model):
    """A per-head -inf mask (fully masked rows are not per (b, s)) or a mask with +inf (not a
    mask) keeps its guard."""
    built = model()
    assert not OrtSdpaFormsPass(ORT)(built).modified
    assert "IsNaN" in {n.op_type for n in built.graph}


def test_a_guard_left_in_place_keeps_its_attention_unfused():
    """onnxscript's SDPA rule took a scalar-zero NaN guard into the fused op, whose kernel
    returns NaN on a fully masked row where the model returns 0 (a per-head mask, which
    ort-sdpa-forms leaves alone)."""
    model = guarded_attention(-np.inf, mask_heads=2, scalar_zero=True)
    before = model.clone()
    fuse(model)
    assert "IsNaN" in {n.op_type for n in model.graph} and not contrib_ops(model)
    feeds = guarded_feeds(2, 5, heads=2)
    got = run_model(model, feeds)[0]
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got, run_model(before, feeds)[0])
