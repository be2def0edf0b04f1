"""FFNs are found by structure (any elementwise nonlinearity between two projections, through
reshapes), and keep-last's classifier is a projection that feeds a graph output."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import models
from graphopt.io import load
from graphopt.passes.sparsity.layers import find_layers, select
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.models.cases import require

F = TensorProto.FLOAT
D, H = 16, 64


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _consts(**values: float) -> dict[str, np.ndarray]:
    return {name: np.array(value, np.float32) for name, value in values.items()}


def _tanh_gelu(x: str, y: str) -> list:
    """GPT-2's GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as torch exports it."""
    return [
        helper.make_node("Mul", [x, "half"], [f"{y}_h"]),
        helper.make_node("Pow", [x, "three"], [f"{y}_p"]),
        helper.make_node("Mul", [f"{y}_p", "coef"], [f"{y}_c"]),
        helper.make_node("Add", [x, f"{y}_c"], [f"{y}_s"]),
        helper.make_node("Mul", [f"{y}_s", "root"], [f"{y}_r"]),
        helper.make_node("Tanh", [f"{y}_r"], [f"{y}_t"]),
        helper.make_node("Add", [f"{y}_t", "one"], [f"{y}_a"]),
        helper.make_node("Mul", [f"{y}_h", f"{y}_a"], [y]),
    ]


def gpt2_like() -> ir.Model:
    """[b, s, D] -> Reshape -> Gemm(c_fc) -> Reshape -> tanh GELU -> Reshape -> Gemm(c_proj)
    -> Reshape -> + x -> LayerNorm -> MatMul(·, Transpose(wte)) -> logits: the classifier's
    weight is the tied embedding (no constant), so the last FFN projection is the last
    layer."""
    rng = np.random.default_rng(0)
    inits = {
        "fc_w": _w(rng, D, H),
        "proj_w": _w(rng, H, D),
        "wte": _w(rng, 50, D),
        "ln_g": np.ones(D, np.float32),
        "ln_b": np.zeros(D, np.float32),
        "rows_d": np.array([-1, D], np.int64),
        "rows_h": np.array([-1, H], np.int64),
        "seq_d": np.array([2, 3, D], np.int64),
        "seq_h": np.array([2, 3, H], np.int64),
        **_consts(half=0.5, three=3.0, coef=0.044715, root=0.7978845608, one=1.0),
    }
    nodes = [
        helper.make_node("Reshape", ["x", "rows_d"], ["x2"]),
        helper.make_node("Gemm", ["x2", "fc_w"], ["fc"], name="c_fc"),
        helper.make_node("Reshape", ["fc", "seq_h"], ["fc3"]),
        *_tanh_gelu("fc3", "g"),
        helper.make_node("Reshape", ["g", "rows_h"], ["g2"]),
        helper.make_node("Gemm", ["g2", "proj_w"], ["pr"], name="c_proj"),
        helper.make_node("Reshape", ["pr", "seq_d"], ["pr3"]),
        helper.make_node("Add", ["x", "pr3"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "ln_g", "ln_b"], ["ln"], axis=-1),
        helper.make_node("Transpose", ["wte"], ["wte_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["ln", "wte_t"], ["logits"], name="lm_head"),
    ]
    x = tensor_info("x", F, [2, 3, D])
    return make_model(nodes, [x], [tensor_info("logits", F, [2, 3, 50])], inits)


def gated_mlp() -> ir.Model:
    """LLaMA's MLP: down(silu(gate(x)) * up(x)), SiLU as x·sigmoid(x); then lm_head."""
    rng = np.random.default_rng(0)
    inits = {n: _w(rng, D, H) for n in ("gate_w", "up_w")}
    inits |= {"down_w": _w(rng, H, D), "head_w": _w(rng, D, 50)}
    nodes = [
        helper.make_node("MatMul", ["x", "gate_w"], ["g"], name="gate_proj"),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["silu"]),
        helper.make_node("MatMul", ["x", "up_w"], ["u"], name="up_proj"),
        helper.make_node("Mul", ["silu", "u"], ["gu"]),
        helper.make_node("MatMul", ["gu", "down_w"], ["d"], name="down_proj"),
        helper.make_node("Add", ["x", "d"], ["res"]),
        helper.make_node("MatMul", ["res", "head_w"], ["logits"], name="lm_head"),
    ]
    x = tensor_info("x", F, [2, 3, D])
    return make_model(nodes, [x], [tensor_info("logits", F, [2, 3, 50])], inits)


def _kinds(model: ir.Model) -> dict[str, str]:
    layers, _ = find_layers(model.graph)
    return {layer.name: layer.kind for layer in layers}


def test_tanh_gelu_between_reshaped_gemms_is_an_ffn() -> None:
    model = gpt2_like()
    assert _kinds(model) == {"c_fc": "ffn", "c_proj": "ffn"}
    layers, _ = find_layers(model.graph)
    chosen, left = select(layers, ("ffn",), keep_last=True)
    assert [layer.name for layer in chosen] == ["c_fc", "c_proj"] and not left


def test_the_last_ffn_projection_feeding_a_tied_classifier_is_no_classifier() -> None:
    """c_proj is the last layer (lm_head's weight is no constant), on [rows, hidden] 2-D
    input as GPT-2's Gemm; it reaches the output only through lm_head: sparsified."""
    layers, _ = find_layers(gpt2_like().graph)
    chosen, left = select(layers, ("all",), keep_last=True)
    assert [layer.name for layer in chosen] == ["c_fc", "c_proj"] and not left


def test_a_gated_mlp_is_an_ffn_and_lm_head_the_classifier() -> None:
    model = gated_mlp()
    assert _kinds(model) == {
        "gate_proj": "ffn",
        "up_proj": "ffn",
        "down_proj": "ffn",
        "lm_head": "",
    }
    layers, _ = find_layers(model.graph)
    chosen, left = select(layers, ("all",), keep_last=True)
    assert [layer.name for layer in chosen] == ["gate_proj", "up_proj", "down_proj"]
    assert left == [("lm_head", "the last layer (classifier): --sparsity-keep-last false")]


def test_a_residual_into_the_next_projection_is_no_ffn() -> None:
    """x -> P1 -> + x -> P2, with a Tanh on a side branch of x that P2 does not read: no
    nonlinearity between P1 and P2, so no FFN (a path's own nonlinearity, not any path's)."""
    rng = np.random.default_rng(0)
    inits = {"w1": _w(rng, D, D), "w2": _w(rng, D, D)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="p1"),
        helper.make_node("Tanh", ["a"], ["side"]),
        helper.make_node("Add", ["a", "x"], ["b"]),
        helper.make_node("MatMul", ["b", "w2"], ["y"], name="p2"),
    ]
    outputs = [tensor_info("y", F, [2, 3, D]), tensor_info("side", F, [2, 3, D])]
    model = make_model(nodes, [tensor_info("x", F, [2, 3, D])], outputs, inits)
    assert _kinds(model) == {"p1": "", "p2": ""}


@pytest.mark.torch
@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("gpt2_tiny", None),  # the classifier is tied to the embedding: no layer
        ("gpt2_tiny_ts", "/model/lm_head/MatMul"),
        ("llama_tiny", "node_linear_14"),
        ("llama_tiny_ts", "/model/lm_head/MatMul"),
    ],
)
def test_decoder_kinds(name: str, head: str | None) -> None:
    require(name)
    layers, _ = find_layers(load(models.get(name)).model.graph)
    kinds = [layer.kind for layer in layers]
    blocks = 2
    gated = name.startswith("llama")
    assert kinds.count("ffn") == (3 if gated else 2) * blocks
    # q, k, v (one packed c_attn in GPT-2) and the output projection per block.
    assert kinds.count("attention") == (4 if gated else 2) * blocks
    assert kinds.count("") == (head is not None)
    _, left = select(layers, ("all",), keep_last=True)
    expected = [] if head is None else [head]
    assert [name for name, why in left if "classifier" in why] == expected
