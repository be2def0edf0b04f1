"""graphopt's own sparse ops in the analysis: shapes past them, and FLOPs as the dense layer
(MatMul + bias + activation) each computes, as fused ops count as their unfused pattern."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.analysis.flops import model_flops
from graphopt.io import load
from graphopt.kernels import packing
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT
K, N, OUT = 16, 8, 4
ROWS = 2 * 5  # x is [2, 5, K]
DENSE = 2 * ROWS * K * N  # one [.., K] x [K, N] MatMul
TAIL = 2 * ROWS * N * OUT  # the plain MatMul after the sparse op: needs its shape


def _two_four(rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((K, N)).astype(np.float32)
    w.reshape(K // 4, 4, N)[:, :2] = 0  # two zeros in every group of four along K
    return w


def _model(op: str, activation: str, bias: bool) -> ir.Model:
    """x [batch, seq, K] → graphopt op (K → N) → MatMul (N → OUT): the op's inputs as
    LAYOUTS.md states them, packed by graphopt.kernels.packing."""
    rng = np.random.default_rng(0)
    w = _two_four(rng)
    inits: dict[str, np.ndarray] = {"w_out": np.ones((N, OUT), np.float32)}
    nodes = []
    a = "x"
    if op == "SparseMatMul24":
        packed = packing.pack_24(w)
        inits.update(values=packed.values, indices=packed.indices)
        names = ["values", "indices"]
        attributes: dict[str, int | str] = {}
    elif op == "SparseMatMul":
        packed = packing.pack_bsr(w, 1, 4)
        inits.update(values=packed.values, col_idx=packed.col_idx, row_ptr=packed.row_ptr)
        names = ["values", "col_idx", "row_ptr"]
        attributes = {"block_r": 1, "block_c": 4}
    else:  # SparseQMatMul: u8 activations from a QuantizeLinear
        packed = packing.pack_bsr_s8(np.sign(w).astype(np.int8), np.float32(0.1), 1, 4)
        inits.update(
            a_scale=np.array(0.05, np.float32),
            a_zero=np.array(128, np.uint8),
            values=packed.values,
            col_idx=packed.col_idx,
            row_ptr=packed.row_ptr,
            w_scale=packed.w_scale,
            w_rowsum=packed.w_rowsum,
        )
        nodes.append(helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["xq"]))
        a = "xq"
        names = ["a_scale", "a_zero", "values", "col_idx", "row_ptr", "w_scale", "w_rowsum"]
        attributes = {"block_r": 1, "block_c": 4}
    if bias:
        inits["bias"] = np.ones(N, np.float32)
        names.append("bias")
    attributes.update(K=K, N=N, activation=activation)
    nodes.append(helper.make_node(op, [a, *names], ["h"], domain="graphopt", **attributes))
    nodes.append(helper.make_node("MatMul", ["h", "w_out"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "sparse",
        [tensor_info("x", F, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", F, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("graphopt", 1)]
    return load(helper.make_model(graph, opset_imports=opsets, ir_version=10)).model


@pytest.mark.parametrize("op", ["SparseMatMul24", "SparseMatMul", "SparseQMatMul"])
@pytest.mark.parametrize(
    ("activation", "bias", "epilogue"),
    [("none", False, 0), ("relu", True, 2), ("gelu", True, 1 + 5), ("", False, 0)],
)
def test_sparse_ops_count_as_the_dense_layer_and_pass_shapes_on(
    op, activation, bias, epilogue
) -> None:
    report = model_flops(_model(op, activation, bias), {"x": (2, 5, K)})
    assert not report.unknown_shape and not report.not_counted, report
    quantize = 2 * ROWS * K if op == "SparseQMatMul" else 0  # the QuantizeLinear of x
    # Dense MatMul (+ bias Add, + activation per element: Relu 1, erf Gelu 5), the zeros
    # of the packed weight not taken off; the MatMul after it counted at its inferred shape.
    assert report.by_op[f"graphopt.{op}"] == DENSE + epilogue * ROWS * N
    assert report.total == DENSE + epilogue * ROWS * N + TAIL + quantize
    assert report.macs == ROWS * K * N + ROWS * N * OUT


def test_the_same_as_the_dense_model() -> None:
    """MatMul + Add + Relu with the same 2:4 weight counts what SparseMatMul24 does."""
    rng = np.random.default_rng(0)
    dense = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "bias"], ["b"]),
            helper.make_node("Relu", ["b"], ["h"]),
            helper.make_node("MatMul", ["h", "w_out"], ["y"]),
        ],
        [tensor_info("x", F, ["batch", "seq", K])],
        [tensor_info("y", F, ["batch", "seq", OUT])],
        {
            "w": _two_four(rng),
            "bias": np.ones(N, np.float32),
            "w_out": np.ones((N, OUT), np.float32),
        },
    )
    shapes = {"x": (2, 5, K)}
    sparse = model_flops(_model("SparseMatMul24", "relu", True), shapes)
    assert sparse.total == model_flops(dense, shapes).total


def test_lowered_bert_counts_as_before_lowering(tmp_path, monkeypatch) -> None:
    """End to end: ``--sparsity 2:4 --sparse-kernels`` showed -86.8% FLOPs on BERT-tiny (the
    ops uncounted, nothing after them inferred)."""
    import graphopt.kernels
    from graphopt import api, models

    if not graphopt.kernels.available(quiet=True):
        pytest.skip(graphopt.kernels.unavailable_reason())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the crossover's timings
    source = models.get("bert_tiny")
    common = {"target": "ort", "sparsity": "2:4", "calib": "random"}
    dense = api.optimize(source, None, api.OptimizeOptions(**common))
    options = api.OptimizeOptions(**common, sparse_kernels=True, sparse_kernels_min_speedup=1e-6)
    lowered = api.optimize(source, None, options)
    ops = {n.op_type for n in lowered.model.graph if n.domain == "graphopt"}
    assert ops, "nothing lowered"
    after, before = model_flops(lowered.model), model_flops(dense.model)
    assert not after.unknown_shape and not after.not_counted
    assert after.total == before.total
