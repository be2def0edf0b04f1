"""Small models with a free batch dim for the pruning tests, and calibration data for them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32)


def cnn(seed: int = 0, width: int = 32) -> ir.Model:
    """conv(3→W)+BN+Relu → conv(W→W)+Relu → residual Add → conv(W→W)+Relu → GAP → Gemm(W→10)."""
    rng = np.random.default_rng(seed)
    inits = {
        "c1.w": _w(rng, width, 3, 3, 3),
        "c1.b": _w(rng, width),
        "bn.s": (1 + 0.5 * rng.standard_normal(width)).astype(np.float32),
        "bn.b": _w(rng, width),
        "bn.m": _w(rng, width),
        "bn.v": (np.abs(rng.standard_normal(width)) + 0.5).astype(np.float32),
        "c2.w": _w(rng, width, width, 3, 3),
        "c2.b": _w(rng, width),
        "c3.w": _w(rng, width, width, 3, 3),
        "c3.b": _w(rng, width),
        "fc.w": _w(rng, 10, width),
        "fc.b": _w(rng, 10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Add", ["r1", "r2"], ["sum"]),
        helper.make_node("Conv", ["sum", "c3.w", "c3.b"], ["c3"], pads=[1] * 4),
        helper.make_node("Relu", ["c3"], ["r3"]),
    ]
    return _with_classifier(nodes, "r3", inits)


def _with_classifier(nodes: list, features: str, inits: dict) -> ir.Model:
    """``nodes`` on x [batch, 3, 8, 8], then GAP → Flatten → Gemm(fc.w, fc.b) → logits."""
    head = [
        helper.make_node("GlobalAveragePool", [features], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    return make_model(
        nodes + head,
        [tensor_info("x", F, ["batch", 3, 8, 8])],
        [tensor_info("logits", F, ["batch", 10])],
        inits,
    )


def mlp(seed: int = 0, hidden: int = 64, width: int = 16) -> ir.Model:
    """Transformer-style FFN on [batch, seq, width]: MatMul → Add → Relu → MatMul → Add."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": _w(rng, width, hidden).T.copy().T,
        "b1": _w(rng, hidden),
        "w2": _w(rng, hidden, width),
        "b2": _w(rng, width),
    }
    inits["w1"] = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, ["batch", 4, width])],
        [tensor_info("y", F, ["batch", 4, width])],
        inits,
    )


def correlated(rng: np.random.Generator, shape: tuple[int, ...], rank: int = 4) -> np.ndarray:
    """Samples whose channels (last axis… or axis 1 for images) are strongly correlated, as
    real activations are: a few latent factors plus a little noise."""
    n = shape[0]
    if len(shape) == 4:  # images: correlate the channel axis
        latent = rng.standard_normal((n, rank, *shape[2:]))
        mix = rng.standard_normal((shape[1], rank))
        data = np.einsum("cr,nrhw->nchw", mix, latent)
    else:
        latent = rng.standard_normal((*shape[:-1], rank))
        data = latent @ rng.standard_normal((rank, shape[-1]))
    return (data + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def write_npz(path, arrays: dict[str, np.ndarray]) -> str:
    np.savez(path, **arrays)
    return str(path)


def branches(seed: int = 0, width: int = 16) -> ir.Model:
    """conv(3→W)+Relu feeding two parallel 1×1 convs → Add → Relu → GAP → Gemm(W→10)."""
    rng = np.random.default_rng(seed)
    inits = {
        "a.w": _w(rng, width, 3, 3, 3),
        "a.b": _w(rng, width),
        "b1.w": _w(rng, width, width, 1, 1),
        "b2.w": _w(rng, width, width, 1, 1),
        "fc.w": _w(rng, 10, width),
        "fc.b": _w(rng, 10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "a.b"], ["a"], pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "b1.w"], ["b1"]),
        helper.make_node("Conv", ["r", "b2.w"], ["b2"]),
        helper.make_node("Add", ["b1", "b2"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["r2"]),
    ]
    return _with_classifier(nodes, "r2", inits)


# Models with the input layouts and weights real exports have, for ``--calib random`` and the
# reasons pruning gives when it finds nothing. Each is the FFN of ``mlp`` (x → 32 → 8) plus:


def _ffn(rng: np.random.Generator, out: str = "y") -> tuple[list, dict]:
    inits = {"w1": _w(rng, 16, 32), "b1": _w(rng, 32), "w2": _w(rng, 32, 8)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], [out]),
    ]
    return nodes, inits


def recurrent_state(seed: int = 0) -> ir.Model:
    """… a GRU/LSTM-like state ``[2, batch, 8]`` added to the output: the batch axis of that
    input is its second."""
    nodes, inits = _ffn(np.random.default_rng(seed))
    nodes.append(helper.make_node("Add", ["y", "state"], ["out"]))
    return make_model(
        nodes,
        [tensor_info("x", F, ["batch", 16]), tensor_info("state", F, [2, "batch", 8])],
        [tensor_info("out", F, [2, "batch", 8])],
        inits,
    )


def scalar_rate(seed: int = 0) -> ir.Model:
    """… an int64 scalar input (a sample rate) that scales the output."""
    nodes, inits = _ffn(np.random.default_rng(seed))
    nodes += [
        helper.make_node("Cast", ["rate"], ["rate_f"], to=F),
        helper.make_node("Div", ["y", "rate_f"], ["out"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, ["batch", 16]), tensor_info("rate", TensorProto.INT64, [])],
        [tensor_info("out", F, ["batch", 8])],
        inits,
    )


def conv_in_if(seed: int = 0) -> ir.Model:
    """Not the FFN: an If on a scalar bool input whose then-branch holds a Conv (3→4) with
    its weight; the else-branch widens x to 4 channels without weights."""
    rng = np.random.default_rng(seed)
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "cw"], ["t"], pads=[1] * 4)],
        "then",
        [],
        [tensor_info("t", F, ["batch", 4, 8, 8])],
        [numpy_helper.from_array(_w(rng, 4, 3, 3, 3), "cw")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["e"])],
        "else",
        [],
        [tensor_info("e", F, ["batch", 4, 8, 8])],
        [numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1, 0, 0], np.int64), "pads")],
    )
    nodes = [
        helper.make_node("If", ["flag"], ["i"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Relu", ["i"], ["out"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, ["batch", 3, 8, 8]), tensor_info("flag", TensorProto.BOOL, [])],
        [tensor_info("out", F, ["batch", 4, 8, 8])],
    )


def dequantized(seed: int = 0) -> ir.Model:
    """… with int8 weights behind DequantizeLinear (a QDQ export)."""
    rng = np.random.default_rng(seed)
    inits = {
        "q1": rng.integers(-100, 100, (16, 32)).astype(np.int8),
        "q2": rng.integers(-100, 100, (32, 8)).astype(np.int8),
        "scale": np.array(0.01, np.float32),
        "zero": np.array(0, np.int8),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["q1", "scale", "zero"], ["w1"]),
        helper.make_node("DequantizeLinear", ["q2", "scale", "zero"], ["w2"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    return make_model(
        nodes, [tensor_info("x", F, ["batch", 16])], [tensor_info("y", F, ["batch", 8])], inits
    )


def flat_weight(seed: int = 0) -> ir.Model:
    """… with its first weight stored flat and reshaped at run time (as some exporters write
    it): the raw graph ties all 32 hidden units into one; constant folding frees them."""
    nodes, inits = _ffn(np.random.default_rng(seed))
    inits["w1_flat"] = inits.pop("w1").reshape(-1)
    inits["w1_shape"] = np.array([16, 32], np.int64)
    nodes.insert(0, helper.make_node("Reshape", ["w1_flat", "w1_shape"], ["w1"]))
    return make_model(
        nodes, [tensor_info("x", F, ["batch", 16])], [tensor_info("y", F, ["batch", 8])], inits
    )
