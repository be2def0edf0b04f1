"""Small transformer-like graphs for the int8-dynamic, SmoothQuant and mixed-precision tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt_tests.helpers import make_model, tensor_info

HIDDEN, FFN, SEQ = 16, 32, 8


def _weights(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    # Columns of very different magnitudes: per-channel scales matter.
    column_scale = np.exp(rng.uniform(-1.5, 1.5, size=cols))
    return (rng.standard_normal((rows, cols)) * column_scale / np.sqrt(rows)).astype(np.float32)


def ffn_model(
    seed: int = 0, residual: bool = False, outlier_gain: float = 1.0, gemm: bool = False
) -> ir.Model:
    """x[B, 8, 16] → LayerNorm → MatMul(+bias) → Gelu → MatMul(+bias) → y.

    ``residual``: the LayerNorm output is also added to y (BERT: it cannot absorb SmoothQuant
    factors then). ``outlier_gain`` multiplies the LayerNorm scale of two channels (the
    outlier channels transformers have). ``gemm``: the second layer is a Gemm (transB=1) on
    a [B*8, 32] view.
    """
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    gamma[[3, 11]] *= outlier_gain
    inits = {
        "gamma": gamma,
        "beta": (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "w1": _weights(rng, HIDDEN, FFN),
        "b1": (0.1 * rng.standard_normal(FFN)).astype(np.float32),
        "w2": _weights(rng, FFN, HIDDEN),
        "b2": (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Gelu", ["hb"], ["g"], name="gelu"),
    ]
    if gemm:
        inits["w2"] = np.ascontiguousarray(inits["w2"].T)
        inits["flat"] = np.array([-1, FFN], dtype=np.int64)
        inits["unflat"] = np.array([-1, SEQ, HIDDEN], dtype=np.int64)
        nodes += [
            helper.make_node("Reshape", ["g", "flat"], ["g2"], name="flatten"),
            helper.make_node("Gemm", ["g2", "w2", "b2"], ["o2"], name="fc2", transB=1),
            helper.make_node("Reshape", ["o2", "unflat"], ["o"], name="unflatten"),
        ]
    else:
        nodes += [
            helper.make_node("MatMul", ["g", "w2"], ["m"], name="fc2"),
            helper.make_node("Add", ["m", "b2"], ["o"], name="fc2_bias"),
        ]
    if residual:
        nodes.append(helper.make_node("Add", ["o", "ln"], ["y"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", ["o"], ["y"], name="out"))
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["B", SEQ, HIDDEN])],
        [tensor_info("y", TensorProto.FLOAT, ["B", SEQ, HIDDEN])],
        inits,
        opset=20,
        ir_version=9,
    )


def sensitive_chain(seed: int = 0) -> ir.Model:
    """x → fc_a → (+ outlier offset) → fc_b → fc_c → fc_d: ``fc_b`` reads an activation whose
    channel 0 is ~1000 while its weights ignore that channel, so the one per-tensor activation
    scale leaves the channels it does read a handful of levels: it is far more sensitive to
    int8-dynamic than the others."""
    rng = np.random.default_rng(seed)
    offset = np.zeros(HIDDEN, dtype=np.float32)
    offset[0] = 1000.0
    w_b = _weights(rng, HIDDEN, HIDDEN)
    w_b[0] = 0.0  # the outlier channel carries nothing the layer uses
    inits = {
        "w_a": _weights(rng, HIDDEN, HIDDEN),
        "offset": offset,
        "w_b": w_b,
        "w_c": _weights(rng, HIDDEN, HIDDEN),
        "w_d": _weights(rng, HIDDEN, HIDDEN),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w_a"], ["a"], name="fc_a"),
        helper.make_node("Add", ["a", "offset"], ["a_off"], name="shift"),
        helper.make_node("MatMul", ["a_off", "w_b"], ["b"], name="fc_b"),
        helper.make_node("MatMul", ["b", "w_c"], ["c"], name="fc_c"),
        helper.make_node("MatMul", ["c", "w_d"], ["y"], name="fc_d"),
    ]
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["B", SEQ, HIDDEN])],
        [tensor_info("y", TensorProto.FLOAT, ["B", SEQ, HIDDEN])],
        inits,
    )


def inputs(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, SEQ, HIDDEN)).astype(np.float32)


def write_calib(path: Path, count: int = 32, seed: int = 1) -> str:
    np.savez(path, x=inputs(count, seed))
    return str(path)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine between flattened outputs."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    per = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(per.mean())


def run(model: ir.Model, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    from graphopt.sessions import make_session

    return make_session(model, optimize=optimize).run(None, {"x": x})[0]


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def serialized(model: ir.Model) -> bytes:
    from graphopt import io

    proto: onnx.ModelProto = io.to_proto(model)
    return proto.SerializeToString()
