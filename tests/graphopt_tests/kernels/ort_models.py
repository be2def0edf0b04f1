"""Build one-node models of graphopt's custom ops and run them in ORT (test helpers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends import ort_custom_ops
from graphopt.kernels.packing import BsrPacked, BsrS8Packed, Packed24

_ELEMENT = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.uint8): TensorProto.UINT8,
}


def one_node_model(
    op: str,
    a: np.ndarray,
    weights: Sequence[tuple[str, np.ndarray | None]],
    attributes: dict,
) -> bytes:
    """A model computing ``Y = op(A, *weights)``; a None weight is an omitted optional input."""
    names = ["A"]
    initializers = []
    for name, value in weights:
        if value is None:
            names.append("")
            continue
        names.append(name)
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
    while names[-1] == "":
        names.pop()
    node = helper.make_node(op, names, ["Y"], domain=ort_custom_ops.OWN_DOMAIN, **attributes)
    a_info = helper.make_tensor_value_info("A", _ELEMENT[a.dtype], list(a.shape))
    y_info = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], op, [a_info], [y_info], initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("graphopt", 1)],
        ir_version=8,
    )
    return model.SerializeToString()


def run(model: bytes, a: np.ndarray, threads: int = 1) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    assert ort_custom_ops.register_custom_ops(options) is not None
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"A": a})[0]


def sparse_matmul(
    a: np.ndarray, p: BsrPacked, bias: np.ndarray | None, act: str, **overrides
) -> bytes:
    weights = {"values": p.values, "col_idx": p.col_idx, "row_ptr": p.row_ptr, "bias": bias}
    attrs = {"K": p.K, "N": p.N, "block_r": p.R, "block_c": p.C, "activation": act}
    weights.update({k: v for k, v in overrides.items() if k in weights})
    attrs.update({k: v for k, v in overrides.items() if k in attrs})
    return one_node_model("SparseMatMul", a, list(weights.items()), attrs)


def sparse_matmul_24(
    a: np.ndarray, p: Packed24, bias: np.ndarray | None, act: str, **overrides
) -> bytes:
    weights = {"values": p.values, "indices": p.indices, "bias": bias}
    attrs = {"K": p.K, "N": p.N, "activation": act}
    weights.update({k: v for k, v in overrides.items() if k in weights})
    attrs.update({k: v for k, v in overrides.items() if k in attrs})
    return one_node_model("SparseMatMul24", a, list(weights.items()), attrs)


def sparse_qmatmul(
    a: np.ndarray,
    scale: float,
    zero: int,
    p: BsrS8Packed,
    bias: np.ndarray | None,
    act: str,
    **overrides,
) -> bytes:
    weights = {
        "a_scale": np.float32(scale),
        "a_zero_point": np.uint8(zero),
        "values": p.values,
        "col_idx": p.col_idx,
        "row_ptr": p.row_ptr,
        "w_scale": p.w_scale,
        "w_rowsum": p.w_rowsum,
        "bias": bias,
    }
    attrs = {"K": p.K, "N": p.N, "block_r": p.R, "block_c": p.C, "activation": act}
    weights.update({k: v for k, v in overrides.items() if k in weights})
    attrs.update({k: v for k, v in overrides.items() if k in attrs})
    return one_node_model("SparseQMatMul", a, list(weights.items()), attrs)


def activate(y: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(y, 0.0)
    if act == "gelu":
        from math import erf, sqrt

        return 0.5 * y * (1.0 + np.vectorize(erf, otypes=[np.float64])(y / sqrt(2.0)))
    return y
