"""fuse-activations: HardSwish, HardSigmoid, SiLU → Swish, Mish; constants, opset gating."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.activations import FuseActivationsPass
from graphopt.registry import PassContext
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

SHAPE = (2, 3, 8, 8)
mh = helper.make_node


def _model(nodes, inits=None, opset=14):
    consts = {k: np.array(v, np.float32) for k, v in (inits or {}).items()}
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, SHAPE)],
        [tensor_info("y", TensorProto.FLOAT, SHAPE)],
        consts,
        opset=opset,
    )


def _hardswish(three=3.0, opset=14, grouping="paddle"):
    # paddle2onnx (PP-OCR): (x * Clip(x + 3, 0, 6)) / [6.0], constants of shape [1]
    nodes = [mh("Add", ["x", "three"], ["a"]), mh("Clip", ["a", "lo", "hi"], ["c"])]
    if grouping == "paddle":
        nodes += [mh("Mul", ["x", "c"], ["m"]), mh("Div", ["m", "six"], ["y"])]
    else:
        nodes += [mh("Div", ["c", "six"], ["h"]), mh("Mul", ["h", "x"], ["y"])]
    inits = {"three": [three], "lo": 0.0, "hi": 6.0, "six": [6.0]}
    return _model(nodes, inits, opset)


@pytest.mark.parametrize("grouping", ["paddle", "x_times_hsig"])
def test_fuses_hardswish(grouping):
    model = _hardswish(grouping=grouping)
    fused, hits = run_pass(model, FuseActivationsPass)
    assert hits == 1
    assert op_types(roundtrip(fused)) == ["HardSwish"]
    assert_same_outputs(model, fused)


def test_hardsigmoid_below_opset_14_and_note_for_hardswish():
    # At opset 13 HardSwish does not exist; the HardSigmoid part still fuses.
    model = _hardswish(grouping="x_times_hsig", opset=13)
    context = PassContext()
    fused, hits = run_pass(model, FuseActivationsPass, context)
    assert hits == 1
    assert sorted(op_types(fused)) == ["HardSigmoid", "Mul"]
    assert any("HardSwish match(es) need opset 14" in n for n in context.notes)
    assert_same_outputs(model, fused)


def test_refuses_wrong_constant():
    assert run_pass(_hardswish(three=3.01), FuseActivationsPass)[1] == 0


def test_silu_needs_opset_24():
    nodes = [mh("Sigmoid", ["x"], ["s"]), mh("Mul", ["s", "x"], ["y"])]
    context = PassContext()
    fused, hits = run_pass(_model(nodes, opset=17), FuseActivationsPass, context)
    assert hits == 0 and any("need opset 24" in n for n in context.notes)
    model = _model(nodes, opset=24)
    fused, hits = run_pass(model, FuseActivationsPass)
    assert hits == 1 and op_types(fused) == ["Swish"]
    assert_same_outputs(model, fused)


def test_silu_refuses_other_gate():
    # x * Sigmoid(z) with z != x (an SE gate) is not SiLU.
    nodes = [mh("Neg", ["x"], ["z"]), mh("Sigmoid", ["z"], ["s"]), mh("Mul", ["s", "x"], ["y"])]
    assert run_pass(_model(nodes, opset=24), FuseActivationsPass)[1] == 0


def test_mish():
    nodes = [
        mh("Softplus", ["x"], ["sp"]),
        mh("Tanh", ["sp"], ["t"]),
        mh("Mul", ["x", "t"], ["y"]),
    ]
    model = _model(nodes, opset=18)
    fused, hits = run_pass(model, FuseActivationsPass)
    assert hits == 1 and op_types(fused) == ["Mish"]
    assert_same_outputs(model, fused)
