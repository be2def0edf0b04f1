"""fuse-gelu: erf and tanh forms → Gelu, constant checks, opset gating."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.gelu import FuseGeluPass
from graphopt.registry import PassContext
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

SHAPE = (2, 3, 16)
SQRT2 = math.sqrt(2.0)


def _model(nodes, inits, opset=20):
    consts = {k: np.array(v, np.float32) for k, v in inits.items()}
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, SHAPE)],
        [tensor_info("y", TensorProto.FLOAT, SHAPE)],
        consts,
        opset=opset,
    )


def _erf(form: str, sqrt2=SQRT2, opset=20):
    """dynamo (BERT): x*(0.5*(erf+1)); TorchScript: (x*(erf+1))*0.5; 1/sqrt2 as Mul."""
    mh = helper.make_node
    if form == "mul_inv":
        nodes = [mh("Mul", ["x", "s"], ["a"])]
        s = 1.0 / sqrt2
    else:
        nodes = [mh("Div", ["x", "s"], ["a"])]
        s = sqrt2
    nodes += [mh("Erf", ["a"], ["e"]), mh("Add", ["e", "one"], ["t"])]
    if form == "dynamo":
        nodes += [mh("Mul", ["half", "t"], ["h"]), mh("Mul", ["x", "h"], ["y"])]
    else:
        nodes += [mh("Mul", ["x", "t"], ["p"]), mh("Mul", ["p", "half"], ["y"])]
    return _model(nodes, {"s": s, "one": 1.0, "half": 0.5}, opset)


def _tanh(cubic=0.044715, opset=20):
    """GPT-2 (dynamo): (x*0.5) * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    mh = helper.make_node
    nodes = [
        mh("Mul", ["x", "half"], ["hx"]),
        mh("Pow", ["x", "three"], ["x3"]),
        mh("Mul", ["x3", "k"], ["kx3"]),
        mh("Add", ["x", "kx3"], ["inner"]),
        mh("Mul", ["inner", "c"], ["ci"]),
        mh("Tanh", ["ci"], ["th"]),
        mh("Add", ["th", "one"], ["t"]),
        mh("Mul", ["hx", "t"], ["y"]),
    ]
    inits = {"half": 0.5, "three": 3.0, "k": cubic, "c": math.sqrt(2 / math.pi), "one": 1.0}
    return _model(nodes, inits, opset)


@pytest.mark.parametrize("form", ["dynamo", "torchscript", "mul_inv"])
def test_fuses_erf_forms(form):
    model = _erf(form)
    fused, hits = run_pass(model, FuseGeluPass)
    assert hits == 1
    assert op_types(roundtrip(fused)) == ["Gelu"]
    assert_same_outputs(model, fused)


def test_fuses_tanh_form():
    model = _tanh()
    fused, hits = run_pass(model, FuseGeluPass)
    assert hits == 1
    (node,) = list(fused.graph)
    assert node.op_type == "Gelu" and node.attributes["approximate"].value == "tanh"
    assert_same_outputs(model, fused)


def test_refuses_wrong_constants():
    # 1.414 and 0.0447 are close but not the GELU constants: the result would change.
    assert run_pass(_erf("dynamo", sqrt2=1.414), FuseGeluPass)[1] == 0
    assert run_pass(_tanh(cubic=0.0447), FuseGeluPass)[1] == 0


def test_low_opset_only_notes():
    context = PassContext()
    fused, hits = run_pass(_erf("dynamo", opset=18), FuseGeluPass, context)
    assert hits == 0 and "Gelu" not in op_types(fused)
    assert context.notes == [
        "fuse-gelu: 1 Gelu match(es) need opset 20 (model has 18); rerun with --opset 20"
    ]
