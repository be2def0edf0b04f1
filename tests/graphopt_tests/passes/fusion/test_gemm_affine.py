"""fuse-gemm-affine: Mul/Add by a per-column constant after Gemm folded into B and C."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.gemm_affine import FuseGemmAffinePass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT


def _model(
    ops: list[tuple[str, tuple]],
    trans_b: int = 0,
    c_shape: tuple | None = (5,),
    alpha: float = 1.0,
    beta: float = 1.0,
    extra_output: bool = False,
):
    rng = np.random.default_rng(0)
    m, k, n = 3, 4, 5
    inits = {"B": rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)}
    gemm_inputs = ["A", "B"]
    if c_shape is not None:
        inits["C"] = rng.normal(size=c_shape).astype(np.float32)
        gemm_inputs.append("C")
    nodes = [helper.make_node("Gemm", gemm_inputs, ["g0"], transB=trans_b, alpha=alpha, beta=beta)]
    for i, (op, shape) in enumerate(ops):
        inits[f"k{i}"] = rng.normal(size=shape).astype(np.float32)
        out = "Y" if i == len(ops) - 1 else f"g{i + 1}"
        nodes.append(
            helper.make_node(op, [f"g{i}", f"k{i}"] if i % 2 == 0 else [f"k{i}", f"g{i}"], [out])
        )
    outputs = [tensor_info("Y", F, [m, n])]
    if extra_output:
        outputs.append(tensor_info("g0", F, [m, n]))
    return make_model(nodes, [tensor_info("A", F, [m, k])], outputs, inits)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ops": [("Mul", (5,))]},
        {"ops": [("Mul", (1, 5)), ("Add", (5,))], "trans_b": 1, "alpha": 0.5, "beta": 2.0},
        {"ops": [("Add", ())], "c_shape": None},
        {"ops": [("Mul", ())], "c_shape": (3, 1), "beta": 0.3},
        {"ops": [("Add", (1, 5)), ("Mul", (5,))], "c_shape": (3, 5)},
    ],
)
def test_fused(kwargs: dict) -> None:
    model = _model(**kwargs)
    after, hits = run_pass(model, FuseGemmAffinePass)
    assert hits == len(kwargs["ops"])
    assert op_types(after) == ["Gemm"]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert_same_outputs(model, roundtrip(after))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ops": [("Mul", (3, 1))]},  # per row
        {"ops": [("Add", (3, 5))]},  # varies over rows
        {"ops": [("Mul", (1, 1, 5))]},  # enlarges the rank
        {"ops": [("Mul", (5,))], "extra_output": True},
    ],
)
def test_refused(kwargs: dict) -> None:
    after, hits = run_pass(_model(**kwargs), FuseGemmAffinePass)
    assert hits == 0
    assert op_types(after)[1] in ("Mul", "Add")


def test_matmul_bn_then_mul_fold_into_one_gemm() -> None:
    # fuse-matmul-bn makes a Gemm; fuse-gemm-affine then takes the Mul behind it.
    from graphopt.passes.fusion.matmul_bn import FuseMatMulBatchNormPass

    rng = np.random.default_rng(3)
    inits = {
        "B": rng.normal(size=(4, 5)).astype(np.float32),
        "gamma": rng.normal(size=5).astype(np.float32),
        "beta": rng.normal(size=5).astype(np.float32),
        "mean": rng.normal(size=5).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, size=5).astype(np.float32),
        "s": rng.normal(size=5).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["A", "B"], ["m"]),
        helper.make_node("BatchNormalization", ["m", "gamma", "beta", "mean", "var"], ["n"]),
        helper.make_node("Mul", ["n", "s"], ["Y"]),
    ]
    model = make_model(nodes, [tensor_info("A", F, [3, 4])], [tensor_info("Y", F, [3, 5])], inits)
    mid, hits_bn = run_pass(model, FuseMatMulBatchNormPass)
    after, hits_affine = run_pass(mid, FuseGemmAffinePass)
    assert (hits_bn, hits_affine) == (1, 1)
    assert op_types(after) == ["Gemm"]
    assert_same_outputs(model, roundtrip(after))
