"""Which tensors get int8 scales, which share one, and which nodes stay float (and why)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from graphopt.passes.quantization.placement import place
from graphopt.passes.quantization.settings import QuantSettings
from graphopt_tests.helpers import make_model, tensor_info

RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32) * np.float32(0.1)


def concat_model():
    """x → Conv a → Relu, x → Conv b, Concat → Reshape → MaxPool → Conv c → y."""
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a_relu", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("Reshape", ["cat", "shape"], ["reshaped"], name="reshape"),
        helper.make_node("MaxPool", ["reshaped"], ["pooled"], name="pool", kernel_shape=[2, 2]),
        helper.make_node("Conv", ["pooled", "wc"], ["y"], name="conv_c"),
    ]
    inits = {
        "wa": _w(4, 3, 3, 3),
        "ba": _w(4),
        "wb": _w(4, 3, 3, 3),
        "shape": np.array([1, 8, 8, 8], np.int64),
        "wc": _w(2, 8, 1, 1),
    }
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [tensor_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        inits,
    )


def transformer_block():
    """x → LayerNorm → MatMul q, MatMul k → MatMul(q, kᵀ) → Softmax → MatMul v → out."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "beta"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "wq"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["n", "wk"], ["k"], name="mm_k"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[1, 0]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="mm_scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "n"], ["mixed"], name="mm_mix"),
        helper.make_node("MatMul", ["mixed", "wo"], ["out"], name="mm_out"),
    ]
    inits = {
        "g": np.ones(8, np.float32),
        "beta": np.zeros(8, np.float32),
        "wq": _w(8, 8),
        "wk": _w(8, 8),
        "wo": _w(8, 8),
    }
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [6, 8])],
        [tensor_info("out", TensorProto.FLOAT, [6, 8])],
        inits,
    )


def test_data_movement_shares_one_scale_through_concat_reshape_and_maxpool():
    placement = place(concat_model(), QuantSettings("int8").excluded)
    groups = placement.tensors
    # The Relu epilogue: its output is quantized, not the Conv output before it.
    assert "a_relu" in groups and "a" not in groups
    # One scale for Concat's inputs and output, kept through Reshape and MaxPool.
    shared = {groups[t] for t in ("a_relu", "b", "cat", "reshaped", "pooled")}
    assert len(shared) == 1
    assert groups["x"] != groups["cat"]  # the input has its own scale
    assert "y" not in groups  # a graph output stays float
    for node in ("concat", "reshape", "pool"):
        assert placement.compute[node] == "int8 (shares its input's scale)"
    assert "fused" in placement.compute["relu_a"]
    assert placement.weights == {"conv_a": (1, 0), "conv_b": (1, 0), "conv_c": (1, 0)}
    assert placement.compute["conv_c"].endswith("float output")
    # For ORT the graph output is quantized too: DQ→Conv→Q is what it fuses.
    placement = place(concat_model(), QuantSettings("int8").excluded, outputs_too=True)
    assert "y" in placement.tensors


def test_softmax_and_layernorm_stay_float_and_matmuls_are_int8():
    placement = place(transformer_block(), QuantSettings("int8").excluded)
    assert "sensitive" in placement.floats["softmax"]
    assert "sensitive" in placement.floats["ln"]
    for name in ("mm_q", "mm_k", "mm_out"):
        assert placement.weights[name] == (1, 1)  # per output column
    assert placement.compute["mm_scores"] == "int8 (both inputs)"
    assert "kt" in placement.tensors and placement.tensors["kt"] == placement.tensors["k"]
    # Softmax output feeds a MatMul: quantized there, while the Softmax itself ran in float.
    assert "probs" in placement.tensors
    assert "out" not in placement.tensors


def test_exclude_by_op_type_and_by_name_glob():
    settings = QuantSettings("int8", exclude=("MaxPool", "conv_b*"))
    placement = place(concat_model(), settings.excluded)
    assert placement.floats["pool"] == "kept in float (--exclude)"
    assert placement.floats["conv_b"] == "kept in float (--exclude)"
    assert "conv_b" not in placement.weights and "conv_a" in placement.weights
    # Concat's second input is no longer int8, so Concat is float too: no int8 island.
    assert "concat" in placement.floats
    # Mixed precision's float set works the same way (by node name).
    placement = place(concat_model(), QuantSettings("int8").excluded, frozenset({"conv_a"}))
    assert "mixed precision" in placement.floats["conv_a"]
    assert "relu_a" not in placement.compute  # no epilogue without its Conv
