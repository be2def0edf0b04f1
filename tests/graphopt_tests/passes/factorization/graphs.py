"""Small models for the factorize tests: an FFN with symbolic batch and sequence dims."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def ffn(seed: int = 0, width: int = 64, hidden: int = 128) -> ir.Model:
    """x [batch, seq, width] → MatMul → Add → Relu → MatMul → Add → y."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
        "w2": (rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(width)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="down"),
        helper.make_node("Add", ["o", "b2"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, ["batch", "seq", width])],
        [tensor_info("y", F, ["batch", "seq", width])],
        inits,
    )


def anisotropic(rng: np.random.Generator, shape: tuple[int, ...], rank: int = 6) -> np.ndarray:
    """Inputs of a few strong directions with very different scales, plus a little noise."""
    latent = rng.standard_normal((*shape[:-1], rank)) * np.geomspace(10.0, 0.5, rank)
    mix = rng.standard_normal((rank, shape[-1]))
    return (latent @ mix + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def cnn(seed: int = 0) -> ir.Model:
    """x [batch, 16, h, w] → Conv 3×3 (16→48) → Relu → Conv 3×3 stride 2 (48→64) → Relu →
    GlobalAveragePool → Flatten → Gemm (64→10)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {
        "c1": w(48, 16, 3, 3),
        "c1b": (0.1 * rng.standard_normal(48)).astype(np.float32),
        "c2": w(64, 48, 3, 3),
        "c2b": (0.1 * rng.standard_normal(64)).astype(np.float32),
        "fc": w(10, 64),
        "fcb": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1", "c1b"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node(
            "Conv", ["a1", "c2", "c2b"], ["h2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, ["batch", 16, "h", "w"])],
        [tensor_info("y", F, ["batch", 10])],
        inits,
    )
