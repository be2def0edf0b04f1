"""fuse-transpose-gemm: Transpose([1, 0]) into Gemm's transA / transB."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.transpose_gemm import FuseTransposeGemmPass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("perm", [[1, 0], None])
def test_transposes_fold_into_flags(trans_a: int, trans_b: int, perm) -> None:
    rng = np.random.default_rng(0)
    m, k, n = 3, 5, 4
    a_shape = (m, k) if trans_a else (k, m)  # stored shape of the Transpose input
    b_shape = (k, n) if trans_b else (n, k)
    perm_attr = {} if perm is None else {"perm": perm}
    nodes = [
        helper.make_node("Transpose", ["A"], ["at"], **perm_attr),
        helper.make_node("Transpose", ["Bw"], ["bt"], **perm_attr),
        helper.make_node(
            "Gemm", ["at", "bt", "C"], ["Y"], transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0
        ),
    ]
    inits = {
        "Bw": rng.normal(size=b_shape).astype(np.float32),
        "C": rng.normal(size=(n,)).astype(np.float32),
    }
    model = make_model(nodes, [tensor_info("A", F, a_shape)], [tensor_info("Y", F, [m, n])], inits)
    after, hits = run_pass(model, FuseTransposeGemmPass)
    assert hits == 2
    assert op_types(after) == ["Gemm"]
    assert_same_outputs(model, roundtrip(after))


def test_transpose_with_other_users_is_kept() -> None:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Transpose", ["A"], ["at"], perm=[1, 0]),
        helper.make_node("Gemm", ["at", "B"], ["Y"]),
        helper.make_node("Relu", ["at"], ["Z"]),
    ]
    inits = {"B": rng.normal(size=(5, 4)).astype(np.float32)}
    outs = [tensor_info("Y", F, [3, 4]), tensor_info("Z", F, [3, 5])]
    model = make_model(nodes, [tensor_info("A", F, [5, 3])], outs, inits)
    after, hits = run_pass(model, FuseTransposeGemmPass)
    assert hits == 0
    assert op_types(after) == ["Transpose", "Gemm", "Relu"]


def test_transpose_feeding_both_gemm_inputs() -> None:
    nodes = [
        helper.make_node("Transpose", ["A"], ["at"], perm=[1, 0]),
        helper.make_node("Gemm", ["at", "at"], ["Y"], transB=1),
    ]
    model = make_model(nodes, [tensor_info("A", F, [4, 3])], [tensor_info("Y", F, [3, 3])])
    after, hits = run_pass(model, FuseTransposeGemmPass)
    assert hits == 2
    assert op_types(after) == ["Gemm"]
    assert_same_outputs(model, roundtrip(after))
