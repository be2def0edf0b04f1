"""fuse-layer-norm: decomposed forms → LayerNormalization, refusals, opset gating."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.layer_norm import FuseLayerNormPass
from graphopt.registry import PassContext
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

RNG = np.random.default_rng(0)


def _ln_model(
    shape=(2, 5, 8),
    axes=(-1,),
    square="pow",
    divide="div",
    affine=True,
    opset=17,
    eps=1e-5,
    axes_as_input=False,
    exponent=2.0,
):
    def reduce(inp, out):
        if axes_as_input:
            return helper.make_node("ReduceMean", [inp, "axes"], [out], keepdims=1)
        return helper.make_node("ReduceMean", [inp], [out], axes=list(axes), keepdims=1)

    nodes = [reduce("x", "mean"), helper.make_node("Sub", ["x", "mean"], ["d"])]
    if square == "pow":
        nodes.append(helper.make_node("Pow", ["d", "two"], ["sq"]))
    else:
        nodes.append(helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes += [
        reduce("sq", "var"),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
    ]
    if divide == "div":
        nodes.append(helper.make_node("Div", ["d", "std"], ["n"]))
    else:
        nodes += [
            helper.make_node("Reciprocal", ["std"], ["r"]),
            helper.make_node("Mul", ["r", "d"], ["n"]),
        ]
    reduced = {a % len(shape) for a in axes}
    norm_shape = tuple(shape[i] if i in reduced else 1 for i in range(min(reduced), len(shape)))
    inits = {
        "two": np.array(exponent, np.float32),
        "eps": np.array(eps, np.float32),
    }
    if axes_as_input:
        inits["axes"] = np.array(axes, np.int64)
    if affine:
        nodes += [
            helper.make_node("Mul", ["gamma", "n"], ["scaled"]),
            helper.make_node("Add", ["scaled", "beta"], ["y"]),
        ]
        inits["gamma"] = RNG.standard_normal(norm_shape).astype(np.float32)
        inits["beta"] = RNG.standard_normal(norm_shape).astype(np.float32)
    else:
        nodes.append(helper.make_node("Identity", ["n"], ["y"]))
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, shape)],
        [tensor_info("y", TensorProto.FLOAT, shape)],
        inits,
        opset=opset,
    )


@pytest.mark.parametrize(
    ("square", "divide", "affine", "axes_as_input", "opset"),
    [
        ("pow", "div", True, False, 17),  # paddle2onnx / TorchScript form
        ("mul", "reciprocal", True, True, 18),  # axes as input, x*x, Reciprocal
        ("pow", "div", False, False, 17),  # no affine: unit scale
    ],
)
def test_fuses_decomposed_forms(square, divide, affine, axes_as_input, opset):
    model = _ln_model(
        square=square, divide=divide, affine=affine, axes_as_input=axes_as_input, opset=opset
    )
    fused, hits = run_pass(model, FuseLayerNormPass)
    assert hits == 1
    ops = op_types(roundtrip(fused))
    assert "LayerNormalization" in ops and "ReduceMean" not in ops
    assert_same_outputs(model, fused)


def test_fuses_two_trailing_axes():
    model = _ln_model(shape=(2, 3, 4, 6), axes=(-2, -1))
    fused, hits = run_pass(model, FuseLayerNormPass)
    assert hits == 1
    node = next(n for n in fused.graph if n.op_type == "LayerNormalization")
    assert node.attributes["axis"].value == -2
    assert_same_outputs(model, fused)


def test_refuses_non_trailing_axis_and_says_why():
    model = _ln_model(shape=(2, 8, 5), axes=(1,))
    context = PassContext()
    fused, hits = run_pass(model, FuseLayerNormPass, context)
    assert hits == 0
    assert "LayerNormalization" not in op_types(fused)
    assert any("not a trailing block" in note for note in context.notes)
    assert_same_outputs(model, fused)


def test_refuses_wrong_exponent():
    model = _ln_model(exponent=3.0)
    _, hits = run_pass(model, FuseLayerNormPass)
    assert hits == 0


def test_low_opset_only_notes():
    model = _ln_model(opset=13)
    context = PassContext()
    fused, hits = run_pass(model, FuseLayerNormPass, context)
    assert hits == 0 and "LayerNormalization" not in op_types(fused)
    assert any("need opset 17" in note and "--opset 17" in note for note in context.notes)
