"""fuse-conv-affine: Mul/Add by per-output-channel constants folded into the Conv."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.conv_affine import FuseConvAffinePass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT
C = 6


def _model(ops: list[tuple[str, tuple[int, ...]]], bias: bool = True, constant_first=False):
    """Conv(X) followed by the given (op, constant shape) chain."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(C, 3, 3, 3)).astype(np.float32)}
    conv_inputs = ["X", "W"]
    if bias:
        inits["B"] = rng.normal(size=C).astype(np.float32)
        conv_inputs.append("B")
    nodes = [helper.make_node("Conv", conv_inputs, ["y0"])]
    for i, (op, shape) in enumerate(ops):
        inits[f"k{i}"] = rng.normal(size=shape).astype(np.float32)
        operands = [f"k{i}", f"y{i}"] if constant_first else [f"y{i}", f"k{i}"]
        nodes.append(helper.make_node(op, operands, [f"y{i + 1}"]))
    nodes[-1].output[0] = "Y"
    x = tensor_info("X", F, [2, 3, 7, 7])
    return make_model(nodes, [x], [tensor_info("Y", F, [2, C, 5, 5])], inits)


@pytest.mark.parametrize(
    "ops",
    [
        [("Mul", (C, 1, 1))],
        [("Add", (1, C, 1, 1))],
        [("Mul", ())],
        [("Add", (1,))],
        [("Mul", (C, 1, 1)), ("Add", (C, 1, 1))],
        [("Add", (1, C, 1, 1)), ("Mul", (1, 1, 1))],
    ],
)
def test_per_channel_constants_fold(ops) -> None:
    model = _model(ops)
    after, hits = run_pass(model, FuseConvAffinePass)
    assert hits == len(ops)
    assert op_types(after) == ["Conv"]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert_same_outputs(model, roundtrip(after))


def test_bias_less_conv_and_constant_first() -> None:
    model = _model([("Mul", (C, 1, 1)), ("Add", (C, 1, 1))], bias=False, constant_first=True)
    after, hits = run_pass(model, FuseConvAffinePass)
    assert hits == 2
    assert op_types(after) == ["Conv"]
    assert_same_outputs(model, roundtrip(after))


@pytest.mark.parametrize(
    "shape",
    [
        (C, 5, 5),  # varies over space
        (1, 1, 5),  # varies over width only
        (5,),  # a vector is right-aligned to the width axis, not the channel axis
        (2, C, 1, 1),  # varies over batch
        (1, 1, C, 1, 1),  # would raise the output's rank
    ],
)
@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_non_per_channel_constants_are_refused(op: str, shape) -> None:
    model = _model([(op, shape)])
    after, hits = run_pass(model, FuseConvAffinePass)
    assert hits == 0
    assert op_types(after) == ["Conv", op]


def test_conv_output_used_elsewhere_is_refused() -> None:
    rng = np.random.default_rng(1)
    inits = {
        "W": rng.normal(size=(C, 3, 1, 1)).astype(np.float32),
        "s": rng.normal(size=(C, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"]),
        helper.make_node("Mul", ["c", "s"], ["Y"]),
        helper.make_node("Relu", ["c"], ["Z"]),
    ]
    outs = [tensor_info("Y", F, [1, C, 4, 4]), tensor_info("Z", F, [1, C, 4, 4])]
    model = make_model(nodes, [tensor_info("X", F, [1, 3, 4, 4])], outs, inits)
    after, hits = run_pass(model, FuseConvAffinePass)
    assert hits == 0
    assert op_types(after) == ["Conv", "Mul", "Relu"]
