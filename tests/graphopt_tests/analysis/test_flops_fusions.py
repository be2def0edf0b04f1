"""FLOPs of fused ops: a fusion leaves a model's FLOPs as they were (or slightly lower).

The ops graphopt's own fusions produce (Swish, opset-23 Attention and RMSNormalization, ORT's
com.microsoft Attention / MultiHeadAttention / GroupQueryAttention / RotaryEmbedding / Gelu
family / SkipLayerNormalization / MatMulNBits, ...) used to count 0, and ORT's contrib ops
have no ONNX shape inference, so everything after the first of them had an unknown shape:
``optimize --target ort`` made a BERT seem to lose 99.9% of its FLOPs. Each is now counted
as the unfused pattern it replaces, and shapes reach past them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import api, models
from graphopt.analysis.flops import model_flops
from graphopt.io import load
from graphopt.registry import PassContext
from graphopt_tests.helpers import run_pass, tensor_info
from graphopt_tests.passes.fusion.ort.test_ort_fusions import cached

F = TensorProto.FLOAT
MS = "com.microsoft"
ORT = PassContext(target="ort")


def _ops(model: ir.Model) -> set[str]:
    return {
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph
    }


def _assert_flops_kept(before: ir.Model, after: ir.Model, name: str, fused: set[str]) -> None:
    shapes = models.input_shapes(name)
    old, new = model_flops(before, shapes), model_flops(after, shapes)
    assert fused <= _ops(after), _ops(after)
    # Every fused op counted, with its shapes known (not "not counted", not "unknown shape").
    assert not new.not_counted, new.not_counted
    assert not fused & set(new.unknown_shape), new.unknown_shape
    # No MatMul's cost dropped; the elementwise rest unchanged or slightly lower.
    assert new.macs >= old.macs
    assert 0.97 * old.total <= new.total <= old.total * 1.0001, (old.by_op, new.by_op)


@pytest.mark.parametrize(
    ("name", "options", "fused"),
    [
        ("bert_tiny_ts", {"target": "ort"}, {f"{MS}.Attention", f"{MS}.Gelu"}),
        ("gpt2_tiny", {"target": "ort"}, {f"{MS}.Attention", f"{MS}.FastGelu"}),
        ("minilm", {"target": "ort"}, {f"{MS}.Attention", f"{MS}.BiasGelu"}),
        ("llama_tiny", {"target": "ort"}, {f"{MS}.RotaryEmbedding", f"{MS}.GroupQueryAttention"}),
        ("bert_tiny", {"opset": 24}, {"Attention", "Gelu", "LayerNormalization"}),
        ("llama_tiny", {"opset": 24}, {"Attention", "RMSNormalization", "Swish"}),
        (
            "bert_tiny",
            {"target": "ort", "quantize": "int4-weight"},
            {f"{MS}.MatMulNBits", f"{MS}.MultiHeadAttention"},
        ),
    ],
)
def test_optimize_keeps_flops(name: str, options: dict, fused: set[str]) -> None:
    source = models.get(name)
    result = api.optimize(source, None, api.OptimizeOptions(verify=False, **options))
    _assert_flops_kept(load(source).model, result.model, name, fused)


def test_ort_fusions_one_by_one_keep_flops() -> None:
    """The fusions a pipeline run does not show: forced SkipLayerNormalization, the RMSNorm
    forms and MultiHeadAttention (before GroupQueryAttention takes it over)."""
    from graphopt.passes.fusion.ort.attention import OrtAttentionPass
    from graphopt.passes.fusion.ort.rotary import OrtRotaryEmbeddingPass
    from graphopt.passes.fusion.ort.skip_layer_norm import (
        OrtSkipLayerNormPass,
        OrtSkipRmsNormPass,
    )

    model = cached("bert_tiny_ts")
    fused, _ = run_pass(model, OrtSkipLayerNormPass, ORT, force=True)
    _assert_flops_kept(model, fused, "bert_tiny_ts", {f"{MS}.SkipLayerNormalization"})

    model = cached("llama_tiny")
    fused, _ = run_pass(model, OrtSkipRmsNormPass, ORT)
    expected = {f"{MS}.SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
    _assert_flops_kept(model, fused, "llama_tiny", expected)
    fused, _ = run_pass(model, OrtRotaryEmbeddingPass, ORT)
    fused, _ = run_pass(fused, OrtAttentionPass, ORT)
    expected = {f"{MS}.RotaryEmbedding", f"{MS}.MultiHeadAttention"}
    _assert_flops_kept(model, fused, "llama_tiny", expected)

    model = cached("gpt2_tiny")
    fused, _ = run_pass(model, OrtAttentionPass, ORT)
    _assert_flops_kept(model, fused, "gpt2_tiny", {f"{MS}.MultiHeadAttention"})


def _contrib(nodes, inputs, inits=None) -> ir.Model:
    """A model of ``nodes`` (com.microsoft ones among them) ending in a Relu on ``r``: the
    Relu's FLOPs show whether shapes reach past the contrib op."""
    out = helper.make_tensor_value_info("y", F, None)
    graph = helper.make_graph(
        [*nodes, helper.make_node("Relu", ["r"], ["y"])],
        "c",
        inputs,
        [out],
        [onnx.numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    return load(helper.make_model(graph, opset_imports=opsets, ir_version=10)).model


def _contrib_flops(node, inputs, inits=None) -> tuple[int, int, int]:
    """(the contrib op's FLOPs, its MACs, the Relu's FLOPs after it)."""
    report = model_flops(_contrib([node], inputs, inits))
    assert not report.unknown_shape and not report.not_counted
    key = f"{MS}.{node.op_type}"
    return report.by_op[key], report.macs, report.by_op["Relu"]


def test_fused_matmul_counts_its_transposes_and_alpha() -> None:
    node = helper.make_node("FusedMatMul", ["a", "b"], ["r"], domain=MS, transB=1, alpha=0.5)
    inputs = [tensor_info("a", F, [2, 4, 6]), tensor_info("b", F, [2, 5, 6])]
    flops, macs, relu = _contrib_flops(node, inputs)
    assert macs == 2 * 4 * 5 * 6
    assert flops == 2 * macs + 2 * 4 * 5  # alpha: one Mul per output
    assert relu == 2 * 4 * 5


def test_matmul_nbits_counts_as_matmul_with_bias() -> None:
    k, n = 16, 4
    node = helper.make_node(
        "MatMulNBits",
        ["a", "w", "s", "", "", "bias"],
        ["r"],
        domain=MS,
        K=k,
        N=n,
        bits=4,
        block_size=16,
    )
    inits = {
        "w": np.zeros((n, 1, 8), np.uint8),
        "s": np.ones(n, np.float32),
        "bias": np.zeros(n, np.float32),
    }
    flops, macs, relu = _contrib_flops(node, [tensor_info("a", F, [1, 3, k])], inits)
    assert macs == 3 * k * n and flops == 2 * macs + 3 * n and relu == 3 * n


def test_packed_group_query_attention() -> None:
    # query (1, 5, (4 + 2·2)·8): 4 heads of 8, K/V of 2 heads packed after it.
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "", "", "", "", "seqlens", "total"],
        ["r"],
        domain=MS,
        num_heads=4,
        kv_num_heads=2,
    )
    inits = {"seqlens": np.array([4], np.int32), "total": np.array(5, np.int32)}
    flops, macs, relu = _contrib_flops(node, [tensor_info("q", F, [1, 5, 64])], inits)
    scores = 4 * 5 * 5
    assert macs == scores * (8 + 8)
    # Softmax 3, the default 1/√D scale and the causal mask 1 each, per score.
    assert flops == 2 * macs + 5 * scores
    assert relu == 5 * 32  # the output (1, 5, 4·8), past the stand-in


def test_packed_multi_head_attention() -> None:
    node = helper.make_node("MultiHeadAttention", ["q"], ["r"], domain=MS, num_heads=4)
    flops, macs, relu = _contrib_flops(node, [tensor_info("q", F, [1, 5, 4, 3, 8])])
    scores = 4 * 5 * 5
    assert macs == scores * 16 and flops == 2 * macs + 4 * scores
    assert relu == 5 * 32


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_packed_attention_counts_a_real_bias(bias: float) -> None:
    """A packed Attention's bias is the Q/K/V projections' Adds when the model had them
    (BERT); zeros are what packing gives projections that had none (GPT-2). The Adds were
    never counted, where MultiHeadAttention counted them."""
    hidden, heads, seq = 16, 2, 5
    node = helper.make_node("Attention", ["x", "w", "b"], ["r"], domain=MS, num_heads=heads)
    inits = {
        "w": np.zeros((hidden, 3 * hidden), np.float32),
        "b": np.full(3 * hidden, bias, np.float32),
    }
    flops = _contrib_flops(node, [tensor_info("x", F, [1, seq, hidden])], inits)[0]
    zero = _contrib_flops(
        node, [tensor_info("x", F, [1, seq, hidden])], {**inits, "b": inits["b"] * 0}
    )[0]
    assert flops - zero == (seq * 3 * hidden if bias else 0)


def test_skip_layer_norm_feeds_its_residual_sum_on() -> None:
    nodes = [
        helper.make_node(
            "SkipLayerNormalization",
            ["x", "skip", "gamma", "beta"],
            ["n", "", "", "r"],
            domain=MS,
        )
    ]
    inputs = [tensor_info("x", F, [2, 3, 8]), tensor_info("skip", F, [2, 3, 8])]
    inits = {"gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32)}
    report = model_flops(_contrib(nodes, inputs, inits))
    assert report.by_op[f"{MS}.SkipLayerNormalization"] == (1 + 5) * 48  # Add + LayerNorm
    assert report.by_op["Relu"] == 48  # output 3, the sum the next block reads


@pytest.mark.parametrize(
    ("op", "attributes", "per_element"),
    [
        ("Swish", {}, 2),  # Sigmoid, Mul
        ("Gelu", {}, 5),  # x/√2, Erf, +1, ·x, ·0.5
        ("Gelu", {"approximate": "tanh"}, 8),
        ("HardSwish", {}, 2),  # HardSigmoid, Mul
        ("Mish", {}, 3),  # Softplus, Tanh, Mul
    ],
)
def test_activation_formulas(op: str, attributes: dict, per_element: int) -> None:
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["r"], **attributes), helper.make_node("Relu", ["r"], ["y"])],
        "a",
        [tensor_info("x", F, [2, 8])],
        [helper.make_tensor_value_info("y", F, None)],
    )
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])).model
    report = model_flops(model)
    assert report.by_op[op] == per_element * 16
    assert report.by_op["Relu"] == 16 and report.macs == 0


def test_macs_count_multiply_adds_only() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "m",
        [tensor_info("x", F, [2, 8])],
        [helper.make_tensor_value_info("y", F, None)],
        [onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w")],
    )
    report = model_flops(load(helper.make_model(graph)).model)
    assert report.macs == 2 * 8 * 4  # not (2·2·8·4 + 2·4) / 2: the Relu has none
    assert report.total == 2 * report.macs + 2 * 4
