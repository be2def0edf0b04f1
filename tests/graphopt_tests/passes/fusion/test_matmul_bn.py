"""fuse-matmul-bn: MatMul(A [M, K], const B) + BatchNormalization over N → Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.matmul_bn import FuseMatMulBatchNormPass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)


def _model(a_shape: list, n: int = 5, dtype=np.float32, elem=TensorProto.FLOAT, a_info=True):
    rng = np.random.default_rng(0)
    k = a_shape[-1]
    channels = n if len(a_shape) == 2 else a_shape[1]
    inits = {
        "B": rng.normal(size=(k, n)).astype(dtype),
        "gamma": rng.normal(size=channels).astype(dtype),
        "beta": rng.normal(size=channels).astype(dtype),
        "mean": rng.normal(size=channels).astype(dtype),
        "var": rng.uniform(0.5, 2.0, size=channels).astype(dtype),
    }
    nodes = [
        helper.make_node("MatMul", ["A", "B"], ["m"]),
        helper.make_node("BatchNormalization", ["m", "gamma", "beta", "mean", "var"], ["Y"]),
    ]
    a = tensor_info("A", elem, a_shape if a_info else [None] * len(a_shape))
    return make_model(nodes, [a], [tensor_info("Y", elem, [None] * len(a_shape))], inits)


@pytest.mark.parametrize("a_info", [True, False])
def test_rank2_becomes_gemm(a_info: bool) -> None:
    model = _model([3, 4], a_info=a_info)
    after, hits = run_pass(model, FuseMatMulBatchNormPass)
    assert hits == 1
    assert op_types(after) == ["Gemm"]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert_same_outputs(model, roundtrip(after), shapes={"A": (3, 4)})


def test_float16_becomes_matmul_add() -> None:
    model = _model([3, 4], dtype=np.float16, elem=TensorProto.FLOAT16)
    after, hits = run_pass(model, FuseMatMulBatchNormPass)
    assert hits == 1
    assert op_types(after) == ["MatMul", "Add"]
    assert_same_outputs(model, roundtrip(after), tolerance=1e-2)


def test_rank3_is_refused() -> None:
    # BN normalizes axis 1, which for [B, M, K] @ [K, N] is M, not the MatMul's N.
    model = _model([2, 5, 4], n=6)
    after, hits = run_pass(model, FuseMatMulBatchNormPass)
    assert hits == 0
    assert op_types(after) == ["MatMul", "BatchNormalization"]
