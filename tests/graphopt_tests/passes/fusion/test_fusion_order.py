"""The fusion stage as a whole: one pass's result feeds the next (registration order)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from graphopt.pipeline import PassManager, Step, default_pipeline
from graphopt.registry import Stage, all_passes
from graphopt_tests.helpers import assert_same_outputs, make_model, op_types, roundtrip, tensor_info

F = TensorProto.FLOAT


def _fusion_only(model):
    names = [name for name, cls in all_passes().items() if cls.stage == Stage.FUSION]
    steps = [s for s in default_pipeline() if {p.name for p in s.passes} <= set(names)]
    assert steps, "the default pipeline has a fusion step"
    copy = model.clone()
    manager = PassManager([Step(s.passes) for s in steps])
    result, report = manager.run(copy)
    return result, {s.name: s.hits for s in report.stats}


def test_conv_bn_then_mul_then_add_become_one_conv() -> None:
    rng = np.random.default_rng(0)
    c = 5
    inits = {
        "W": rng.normal(size=(c, 3, 3, 3)).astype(np.float32),
        "gamma": rng.normal(size=c).astype(np.float32),
        "beta": rng.normal(size=c).astype(np.float32),
        "mean": rng.normal(size=c).astype(np.float32),
        "var": rng.uniform(0.5, 2, size=c).astype(np.float32),
        "s": rng.normal(size=(c, 1, 1)).astype(np.float32),
        "a": rng.normal(size=(1, c, 1, 1)).astype(np.float32),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Pad", ["X", "pads"], ["p"]),
        helper.make_node("Conv", ["p", "W"], ["y0"]),
        helper.make_node("BatchNormalization", ["y0", "gamma", "beta", "mean", "var"], ["y1"]),
        helper.make_node("Mul", ["y1", "s"], ["y2"]),
        helper.make_node("Add", ["a", "y2"], ["Y"]),
    ]
    x = tensor_info("X", F, [1, 3, 6, 6])
    model = make_model(nodes, [x], [tensor_info("Y", F, [1, c, 6, 6])], inits)
    after, hits = _fusion_only(model)
    assert op_types(after) == ["Conv"]
    assert (hits["fuse-pad-conv"], hits["fuse-conv-bn"], hits["fuse-conv-affine"]) == (1, 1, 2)
    assert_same_outputs(model, roundtrip(after))


def test_transposed_matmul_add_becomes_gemm_with_flag() -> None:
    rng = np.random.default_rng(1)
    inits = {
        "B": rng.normal(size=(4, 3)).astype(np.float32),
        "C": rng.normal(size=3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["A"], ["at"], perm=[1, 0]),
        helper.make_node("MatMul", ["at", "B"], ["m"]),
        helper.make_node("Add", ["m", "C"], ["Y"]),
    ]
    model = make_model(nodes, [tensor_info("A", F, [4, 2])], [tensor_info("Y", F, [2, 3])], inits)
    after, hits = _fusion_only(model)
    assert op_types(after) == ["Gemm"]
    gemm = next(iter(after.graph))
    assert gemm.attributes["transA"].value == 1
    assert (hits["fuse-matmul-add"], hits["fuse-transpose-gemm"]) == (1, 1)
    assert_same_outputs(model, roundtrip(after))
