"""--target ort fusions: contrib ops appear only for target=ort, outputs match in ORT."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import models
from graphopt.io import load, to_proto
from graphopt.passes.fusion.ort.attention import OrtAttentionPass
from graphopt.passes.fusion.ort.gelu import OrtGeluPass
from graphopt.passes.fusion.ort.rotary import OrtRotaryEmbeddingPass
from graphopt.passes.fusion.ort.skip_layer_norm import OrtSkipLayerNormPass, OrtSkipRmsNormPass
from graphopt.registry import PassContext
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

ORT = PassContext(target="ort")
FLOAT = TensorProto.FLOAT
HIDDEN = 16


def contrib_ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")


def output_names(model) -> list[str]:
    return [v.name for v in model.graph.outputs]


def skip_layer_norm_model():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Add", ["x", "skip"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1),
    ]
    weights = {
        "gamma": rng.standard_normal(HIDDEN).astype(np.float32),
        "beta": rng.standard_normal(HIDDEN).astype(np.float32),
    }
    inputs = [tensor_info("x", FLOAT, [1, 8, HIDDEN]), tensor_info("skip", FLOAT, [1, 8, HIDDEN])]
    return make_model(nodes, inputs, [tensor_info("y", FLOAT, [1, 8, HIDDEN])], weights)


def gelu_model(tanh: bool):
    """Add(x, bias) followed by the erf Gelu formula, or the tanh approximation."""
    rng = np.random.default_rng(1)
    weights = {"bias": rng.standard_normal(HIDDEN).astype(np.float32)}
    nodes = [helper.make_node("Add", ["x", "bias"], ["h"])]
    if tanh:
        consts = {"three": 3.0, "c": 0.044715, "k": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}
        nodes += [
            helper.make_node("Pow", ["h", "three"], ["t1"]),
            helper.make_node("Mul", ["c", "t1"], ["t2"]),
            helper.make_node("Add", ["h", "t2"], ["t3"]),
            helper.make_node("Mul", ["k", "t3"], ["t4"]),
            helper.make_node("Tanh", ["t4"], ["t5"]),
            helper.make_node("Add", ["t5", "one"], ["t6"]),
            helper.make_node("Mul", ["half", "t6"], ["t7"]),
            helper.make_node("Mul", ["h", "t7"], ["y"]),
        ]
    else:
        consts = {"sqrt2": math.sqrt(2), "one": 1.0, "half": 0.5}
        nodes += [
            helper.make_node("Div", ["h", "sqrt2"], ["t1"]),
            helper.make_node("Erf", ["t1"], ["t2"]),
            helper.make_node("Add", ["t2", "one"], ["t3"]),
            helper.make_node("Mul", ["h", "t3"], ["t4"]),
            helper.make_node("Mul", ["t4", "half"], ["y"]),
        ]
    weights.update({k: np.array(v, np.float32) for k, v in consts.items()})
    inputs = [tensor_info("x", FLOAT, [2, 8, HIDDEN])]
    return make_model(nodes, inputs, [tensor_info("y", FLOAT, [2, 8, HIDDEN])], weights)


def test_skip_layer_norm_fuses_only_for_ort():
    model = skip_layer_norm_model()
    portable, hits = run_pass(model, OrtSkipLayerNormPass)
    assert hits == 0 and op_types(portable) == op_types(model)
    # force: on ORT's CPU the fused kernel is slower (see test_ort_cpu_forms), so opt-in.
    fused, hits = run_pass(model, OrtSkipLayerNormPass, ORT, force=True)
    assert hits == 1
    assert contrib_ops(fused) == {"SkipLayerNormalization": 1}
    assert "LayerNormalization" not in op_types(fused)
    assert output_names(fused) == ["y"]
    assert fused.graph.opset_imports["com.microsoft"] == 1
    assert_same_outputs(model, roundtrip(fused))


def test_erf_gelu_with_bias_becomes_bias_gelu():
    model = gelu_model(tanh=False)
    assert run_pass(model, OrtGeluPass)[1] == 0
    fused, hits = run_pass(model, OrtGeluPass, ORT)
    assert hits == 1
    assert contrib_ops(fused) == {"BiasGelu": 1}
    assert output_names(fused) == ["y"]
    assert_same_outputs(model, roundtrip(fused))


def test_tanh_gelu_becomes_fast_gelu():
    model = gelu_model(tanh=True)
    assert run_pass(model, OrtGeluPass)[1] == 0
    fused, hits = run_pass(model, OrtGeluPass, ORT)
    assert hits == 1
    assert contrib_ops(fused) == {"FastGelu": 1}
    assert output_names(fused) == ["y"]
    assert_same_outputs(model, roundtrip(fused))


def test_nothing_to_fuse_leaves_model_untouched():
    # No residual Add: the pass must not hand back its constant-folded working copy.
    model = gelu_model(tanh=False)
    fused, hits = run_pass(model, OrtSkipLayerNormPass, ORT, force=True)
    assert hits == 0 and op_types(fused) == op_types(model)
    assert "com.microsoft" not in fused.graph.opset_imports


# --- model level, on the cached tiny exports ---


def cached(name: str):
    """The cached export with trained-looking weights in place of its uniform ones.

    The builders keep the frameworks' initialisation: LayerNorm/RMSNorm scales of 1 and
    biases of 0. graphopt's cleanup (which now prepares the ORT rules, as it does in the
    pipeline) rightly removes Mul-by-one and Add-of-zero, and the rules then see a norm
    without its scale or a projection without its bias, unlike any trained model. Seeded noise
    on every uniform float tensor gives the shapes of real weights.
    """
    model = load(models.get(name)).model
    rng = np.random.default_rng(0)
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype.kind == "f" and array.size > 1 and np.all(array == array.flat[0]):
            noisy = array + 0.05 * rng.standard_normal(array.shape).astype(array.dtype)
            value.const_value = ir.tensor(noisy, name=value.name)
    return model


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bert_tiny", {"Attention": 2}),  # dynamo export, packed QKV with biases
        ("minilm", {"Attention": 6}),
        ("gpt2_tiny", {"MultiHeadAttention": 2}),  # needs the (B*S, D) reshape put back
    ],
)
def test_attention_on_exports(name, expected):
    model = cached(name)
    assert run_pass(model, OrtAttentionPass)[1] == 0
    fused, hits = run_pass(model, OrtAttentionPass, ORT)
    assert contrib_ops(fused) == expected
    assert hits == sum(expected.values())
    assert output_names(fused) == output_names(model)
    assert "Softmax" not in op_types(fused)
    assert_same_outputs(model, roundtrip(fused), shapes=models.input_shapes(name))


@pytest.mark.parametrize("name", ["bert_tiny_ts"])
def test_skip_layer_norm_and_gelu_on_exports(name):
    model = cached(name)
    fused, hits = run_pass(model, OrtSkipLayerNormPass, ORT, force=True)
    layers = 2 if "tiny" in name else 6
    assert hits == 2 * layers
    fused, hits = run_pass(fused, OrtGeluPass, ORT)
    assert hits == layers
    assert contrib_ops(fused)["BiasGelu"] == layers
    assert output_names(fused) == output_names(model)
    assert_same_outputs(model, roundtrip(fused), shapes=models.input_shapes(name))


def test_skip_rms_norm_on_llama():
    model = cached("llama_tiny")
    assert run_pass(model, OrtSkipRmsNormPass)[1] == 0
    fused, hits = run_pass(model, OrtSkipRmsNormPass, ORT)
    ops = Counter(n.op_type for n in fused.graph)
    assert ops["SkipSimplifiedLayerNormalization"] == 4
    assert hits == ops["SkipSimplifiedLayerNormalization"] + ops["SimplifiedLayerNormalization"]
    # ORT registers SimplifiedLayerNormalization in the default domain, which onnx.checker
    # rejects; graphopt's own save/load round trip is what matters.
    reloaded = load(to_proto(fused)).model
    assert_same_outputs(model, reloaded, shapes=models.input_shapes("llama_tiny"))


@pytest.mark.parametrize("name", ["llama_tiny", "qwen2_tiny"])
def test_rotary_then_attention_on_exports(name):
    model = cached(name)
    assert run_pass(model, OrtRotaryEmbeddingPass)[1] == 0
    fused, hits = run_pass(model, OrtRotaryEmbeddingPass, ORT)
    assert hits == 4  # q and k in each of 2 layers
    fused, hits = run_pass(fused, OrtAttentionPass, ORT)
    assert hits == 2
    assert contrib_ops(fused) == {"RotaryEmbedding": 4, "MultiHeadAttention": 2}
    assert not any(d.startswith("ai.onnxruntime._fusion") for d in fused.graph.opset_imports)
    fused = roundtrip(fused)
    assert_same_outputs(model, fused, shapes=models.input_shapes(name))
    # The cos/sin cache is computed in the graph: other batch sizes and lengths hold too.
    assert_same_outputs(model, fused, shapes={k: (2, 7) for k in models.input_shapes(name)})


def test_pipeline_target_ort_verifies():
    # TorchScript export: attention is only found with ORT's symbolic shapes (second try).
    from graphopt import api

    source = models.get("bert_tiny_ts")
    result = api.optimize(source, None, api.OptimizeOptions(target="ort"))
    assert result.report.verification is not None and result.report.verification.ok
    assert not result.report.rolled_back
    ops = contrib_ops(result.model)
    # Packed QKV Attention with the 2-D mask; residual Adds as Sum rather than the (on CPU
    # slower) SkipLayerNormalization.
    assert ops == {"Attention": 2, "Gelu": 2}
    assert op_types(result.model).count("Sum") == 5
    assert not contrib_ops(api.optimize(source, None, api.OptimizeOptions()).model)


def test_gpt2_tanh_gelu_becomes_fast_gelu():
    # GPT-2's gelu_new is exported as (0.5·x)·(1 + tanh(…)), not onnxscript's association.
    model = cached("gpt2_tiny")
    fused, hits = run_pass(model, OrtGeluPass, ORT)
    assert hits == 2
    assert contrib_ops(fused) == {"FastGelu": 2}
    assert "Tanh" not in op_types(fused)
    assert_same_outputs(model, roundtrip(fused), shapes=models.input_shapes("gpt2_tiny"))
