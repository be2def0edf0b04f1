"""Small synthetic models with residual blocks for the erase-blocks tests."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _weights(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def prenorm(layers: int = 2, width: int = 8, zero_layer: int | None = None) -> ir.Model:
    """h + W2·relu(W1·LN(h)) per layer; layer ``zero_layer``'s W2 is all zeros."""
    rng = np.random.default_rng(0)
    nodes, inits = [], {"g": np.ones(width, np.float32), "b": np.zeros(width, np.float32)}
    h = "x"
    for i in range(layers):
        inits[f"w1_{i}"] = _weights(rng, (width, 2 * width))
        inits[f"w2_{i}"] = _weights(rng, (2 * width, width)) * (i != zero_layer)
        nodes += [
            helper.make_node("LayerNormalization", [h, "g", "b"], [f"ln{i}"], axis=-1),
            helper.make_node("MatMul", [f"ln{i}", f"w1_{i}"], [f"up{i}"]),
            helper.make_node("Relu", [f"up{i}"], [f"act{i}"]),
            helper.make_node("MatMul", [f"act{i}", f"w2_{i}"], [f"down{i}"]),
            helper.make_node("Add", [h, f"down{i}"], [f"h{i}" if i < layers - 1 else "y"]),
        ]
        h = f"h{i}"
    return make_model(
        nodes, [tensor_info("x", F, ["n", 4, width])], [tensor_info("y", F, ["n", 4, width])], inits
    )


def _layer_norm(source: str, out: str, decomposed: bool) -> list:
    """LayerNormalization of ``source``, or its unfused ReduceMean/Sub/Pow/... form."""
    if not decomposed:
        return [helper.make_node("LayerNormalization", [source, "g", "b"], [out], axis=-1)]
    p = f"{out}_"
    return [
        helper.make_node("ReduceMean", [source], [p + "mean"], axes=[-1]),
        helper.make_node("Sub", [source, p + "mean"], [p + "centered"]),
        helper.make_node("Pow", [p + "centered", "two"], [p + "square"]),
        helper.make_node("ReduceMean", [p + "square"], [p + "var"], axes=[-1]),
        helper.make_node("Add", [p + "var", "eps"], [p + "var_eps"]),
        helper.make_node("Sqrt", [p + "var_eps"], [p + "std"]),
        helper.make_node("Div", [p + "centered", p + "std"], [p + "normed"]),
        helper.make_node("Mul", [p + "normed", "g"], [p + "scaled"]),
        helper.make_node("Add", [p + "scaled", "b"], [out]),
    ]


def postnorm(layers: int = 2, width: int = 8, decomposed: bool = False) -> ir.Model:
    """BERT-like: LN(h + attention(h)) then LN(h + ffn(h)), after an input LayerNorm."""
    rng = np.random.default_rng(1)
    inits = {"g": np.ones(width, np.float32), "b": np.zeros(width, np.float32)}
    inits |= {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32)}
    nodes = _layer_norm("x", "h", decomposed)
    h = "h"
    for i in range(layers):
        for name in ("q", "k", "v", "o", "f1", "f2"):
            shape = (width, 2 * width) if name == "f1" else (width, width)
            shape = (2 * width, width) if name == "f2" else shape
            inits[f"{name}{i}"] = _weights(rng, shape)
        out = f"layer{i}" if i < layers - 1 else "y"
        nodes += [
            helper.make_node("MatMul", [h, f"q{i}"], [f"Q{i}"]),
            helper.make_node("MatMul", [h, f"k{i}"], [f"K{i}"]),
            helper.make_node("MatMul", [h, f"v{i}"], [f"V{i}"]),
            helper.make_node("Transpose", [f"K{i}"], [f"KT{i}"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"Q{i}", f"KT{i}"], [f"S{i}"]),
            helper.make_node("Softmax", [f"S{i}"], [f"P{i}"], axis=-1),
            helper.make_node("MatMul", [f"P{i}", f"V{i}"], [f"A{i}"]),
            helper.make_node("MatMul", [f"A{i}", f"o{i}"], [f"O{i}"]),
            helper.make_node("Add", [f"O{i}", h], [f"r{i}"]),
            *_layer_norm(f"r{i}", f"mid{i}", decomposed),
            helper.make_node("MatMul", [f"mid{i}", f"f1{i}"], [f"U{i}"]),
            helper.make_node("Relu", [f"U{i}"], [f"R{i}"]),
            helper.make_node("MatMul", [f"R{i}", f"f2{i}"], [f"D{i}"]),
            helper.make_node("Add", [f"D{i}", f"mid{i}"], [f"s{i}"]),
            *_layer_norm(f"s{i}", out, decomposed),
        ]
        h = out
    return make_model(
        nodes, [tensor_info("x", F, ["n", 4, width])], [tensor_info("y", F, ["n", 4, width])], inits
    )


def resnet_like(channels: int = 4) -> ir.Model:
    """A downsampling block (projection shortcut, 4 -> 8 channels) then an identity block."""
    rng = np.random.default_rng(2)
    wide = 2 * channels
    inits = {
        "c1": _weights(rng, (wide, channels, 3, 3)),
        "c2": _weights(rng, (wide, wide, 3, 3)),
        "proj": _weights(rng, (wide, channels, 1, 1)),
        "c3": _weights(rng, (wide, wide, 3, 3)),
        "c4": _weights(rng, (wide, wide, 3, 3)),
    }
    conv = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a1"], strides=[2, 2], **conv),
        helper.make_node("Relu", ["a1"], ["a2"]),
        helper.make_node("Conv", ["a2", "c2"], ["a3"], **conv),
        helper.make_node("Conv", ["x", "proj"], ["skip"], strides=[2, 2]),
        helper.make_node("Add", ["a3", "skip"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c3"], ["b1"], **conv),
        helper.make_node("Relu", ["b1"], ["b2"]),
        helper.make_node("Conv", ["b2", "c4"], ["b3"], **conv),
        helper.make_node("Add", ["b3", "r1"], ["s2"]),
        helper.make_node("Relu", ["s2"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, ["n", channels, 8, 8])],
        [tensor_info("y", F, ["n", wide, 4, 4])],
        inits,
    )


def affine_block(width: int = 8, shift: float = 2.0) -> ir.Model:
    """h + (h·W + c) between two layers: the block is affine, a linear replacement is exact."""
    rng = np.random.default_rng(3)
    inits = {
        "win": _weights(rng, (width, width), 1.0),
        "wf": _weights(rng, (width, width), 0.5),
        "c": np.full(width, shift, np.float32),
        "wout": _weights(rng, (width, 3), 1.0),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "win"], ["h"]),
        helper.make_node("MatMul", ["h", "wf"], ["f"]),
        helper.make_node("Add", ["f", "c"], ["fc"]),
        helper.make_node("Add", ["h", "fc"], ["r"]),
        helper.make_node("MatMul", ["r", "wout"], ["y"]),
    ]
    return make_model(
        nodes, [tensor_info("x", F, ["n", width])], [tensor_info("y", F, ["n", 3])], inits
    )


def gemm_residuals(layers: int = 2, width: int = 8, beta: float = 1.0) -> ir.Model:
    """2-D ``h + relu(h·A)·B`` per layer with the sum fused into ``Gemm(relu, B, h)`` (as
    ORT's MatMulAddFusion writes it), then ``Gemm(h, W, h)`` (``h + h·W``, A and C one value)."""
    rng = np.random.default_rng(0)
    nodes, inits, h = [], {}, "x"
    for i in range(layers):
        inits[f"a{i}"] = _weights(rng, (width, 2 * width))
        inits[f"b{i}"] = _weights(rng, (2 * width, width))
        nodes += [
            helper.make_node("MatMul", [h, f"a{i}"], [f"up{i}"], name=f"up{i}"),
            helper.make_node("Relu", [f"up{i}"], [f"act{i}"], name=f"act{i}"),
            helper.make_node(
                "Gemm", [f"act{i}", f"b{i}", h], [f"h{i}"], name=f"down{i}", beta=beta
            ),
        ]
        h = f"h{i}"
    inits["w"] = _weights(rng, (width, width))
    nodes.append(helper.make_node("Gemm", [h, "w", h], ["y"], name="self", beta=beta))
    return make_model(
        nodes, [tensor_info("x", F, ["n", width])], [tensor_info("y", F, ["n", width])], inits
    )


def plain(width: int = 8) -> ir.Model:
    """relu(x·W1)·W2: no residual unit, nothing to erase (a VGG's or DenseNet's case)."""
    rng = np.random.default_rng(4)
    inits = {"w1": _weights(rng, (width, 2 * width)), "w2": _weights(rng, (2 * width, width))}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["up"]),
        helper.make_node("Relu", ["up"], ["act"]),
        helper.make_node("MatMul", ["act", "w2"], ["y"]),
    ]
    return make_model(
        nodes, [tensor_info("x", F, ["n", 4, width])], [tensor_info("y", F, ["n", 4, width])], inits
    )
