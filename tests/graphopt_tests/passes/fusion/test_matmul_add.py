"""fuse-matmul-add: MatMul + Add → Gemm only where the pair is exactly a Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.matmul_add import FuseMatMulAddPass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT
K, N = 5, 4


def _model(a_shape, c_shape, bias_first=False, c_input=False, extra_output=False):
    rng = np.random.default_rng(0)
    inits = {"B": rng.normal(size=(K, N)).astype(np.float32)}
    inputs = [tensor_info("A", F, a_shape)]
    if c_input:
        inputs.append(tensor_info("C", F, c_shape))
    else:
        inits["C"] = rng.normal(size=c_shape).astype(np.float32)
    add_inputs = ["C", "p"] if bias_first else ["p", "C"]
    nodes = [
        helper.make_node("MatMul", ["A", "B"], ["p"]),
        helper.make_node("Add", add_inputs, ["Y"]),
    ]
    # output dims left to shape inference (A's rows may be symbolic)
    outputs = [tensor_info("Y", F, [None] * max(len(a_shape), len(c_shape)))]
    if extra_output:
        outputs.append(tensor_info("p", F, [*a_shape[:-1], N]))
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize(
    ("c_shape", "bias_first", "c_input"),
    [((N,), False, False), ((3, N), True, False), ((1, N), False, True), ((3, 1), False, False)],
)
def test_exact_gemm_is_fused(c_shape, bias_first: bool, c_input: bool) -> None:
    model = _model((3, K), c_shape, bias_first, c_input)
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 1
    assert op_types(after) == ["Gemm"]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert_same_outputs(model, roundtrip(after))


def test_symbolic_m_with_row_bias_is_fused() -> None:
    model = _model(("M", K), (N,))
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 1
    assert_same_outputs(model, roundtrip(after), shapes={"A": (7, K)})


@pytest.mark.parametrize(
    ("a_shape", "c_shape"),
    [
        ((2, 3, K), (N,)),  # 3-D A: Gemm cannot express it
        ((3, K), (2, 3, N)),  # bias raises the rank of the result
        ((1, K), (6, N)),  # bias broadcasts the product's rows up
        (("M", K), (6, N)),  # M unknown: it might be 1 at run time
    ],
)
def test_non_gemm_shapes_are_refused(a_shape, c_shape) -> None:
    model = _model(a_shape, c_shape)
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 0
    assert op_types(after) == ["MatMul", "Add"]


def test_matmul_output_used_elsewhere_is_refused() -> None:
    model = _model((3, K), (N,), extra_output=True)
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 0
    assert op_types(after) == ["MatMul", "Add"]


def test_non_constant_b_is_refused() -> None:
    nodes = [
        helper.make_node("MatMul", ["A", "B"], ["p"]),
        helper.make_node("Add", ["p", "C"], ["Y"]),
    ]
    inputs = [tensor_info("A", F, [3, K]), tensor_info("B", F, [K, N])]
    c = np.random.default_rng(1).normal(size=N).astype(np.float32)
    model = make_model(nodes, inputs, [tensor_info("Y", F, [3, N])], {"C": c})
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 0
    assert op_types(after) == ["MatMul", "Add"]
