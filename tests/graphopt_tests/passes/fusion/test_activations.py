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


def test_a_second_run_at_a_raised_opset_replaces_the_missed_fusion_note():
    """The fusions run before and after --quantize, which raises opset 9 to 13 between
    them: "need opset 14 (model has 9)" and "(model has 13)" were both printed."""
    context = PassContext()
    run_pass(_hardswish(grouping="x_times_hsig", opset=11), FuseActivationsPass, context)
    run_pass(_hardswish(grouping="x_times_hsig", opset=13), FuseActivationsPass, context)
    notes = [n for n in context.notes if "HardSwish match(es) need opset 14" in n]
    assert len(notes) == 1 and "(model has 13)" in notes[0]


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


def _paddle_hardswish(form: str, cap: float = 6.0, high: float = 1.0, opset: int = 14):
    """Paddle's other HardSwish spellings: x · Clip(x · 1/6 + 0.5, 0, 1) (or x / 6), and
    x · Min(Relu(x + 3), 6) / 6 in both groupings (``cap`` first when "min_swapped")."""
    if form in ("affine_mul", "affine_div"):
        op, k = ("Mul", 1.0 / 6.0) if form == "affine_mul" else ("Div", 6.0)
        nodes = [
            mh(op, ["x", "k"], ["a"]),
            mh("Add", ["a", "half"], ["b"]),
            mh("Clip", ["b", "lo", "hi"], ["c"]),
            mh("Mul", ["x", "c"], ["y"]),
        ]
        return _model(nodes, {"k": k, "half": 0.5, "lo": 0.0, "hi": high}, opset)
    minimum = ["cap", "r"] if form == "min_swapped" else ["r", "cap"]
    nodes = [mh("Add", ["x", "three"], ["a"]), mh("Relu", ["a"], ["r"])]
    nodes.append(mh("Min", minimum, ["c"]))
    if form == "relu_min_grouped":
        nodes += [mh("Div", ["c", "six"], ["h"]), mh("Mul", ["x", "h"], ["y"])]
    else:
        nodes += [mh("Mul", ["x", "c"], ["m"]), mh("Div", ["m", "six"], ["y"])]
    return _model(nodes, {"three": [3.0], "cap": cap, "six": [6.0]}, opset)


def _probe_points() -> list[np.ndarray]:
    """Feeds of SHAPE: the float32 neighbourhoods of -3, 0 and 3, and random values."""
    count = int(np.prod(SHAPE))
    feeds = []
    for centre in (-3.0, 0.0, 3.0):
        up, down = [np.float32(centre)], [np.float32(centre)]
        for _ in range(count // 2):
            up.append(np.nextafter(up[-1], np.float32(np.inf)))
            down.append(np.nextafter(down[-1], np.float32(-np.inf)))
        feeds.append(np.array(up[: count // 2] + down[1 : count - count // 2 + 1], np.float32))
    rng = np.random.default_rng(0)
    feeds += [rng.uniform(-4, 4, count).astype(np.float32) for _ in range(20)]
    feeds.append(np.linspace(-8, 8, count, dtype=np.float32))
    return [f.reshape(SHAPE) for f in feeds]


@pytest.mark.parametrize("form", ["affine_mul", "affine_div", "relu_min", "relu_min_grouped"])
def test_fuses_paddle_hardswish_forms(form):
    from graphopt.verify import run_model

    model = _paddle_hardswish(form)
    fused, hits = run_pass(model, FuseActivationsPass)
    assert hits >= 1
    fused = roundtrip(fused)
    assert op_types(fused) == ["HardSwish"]
    for x in _probe_points():
        expected, got = run_model(model, {"x": x})[0], run_model(fused, {"x": x})[0]
        if form == "affine_mul":  # the kernel's own arithmetic: bit-identical
            np.testing.assert_array_equal(got, expected)
        else:  # / 6 rounds differently in the last bit, as the Clip(x + 3, 0, 6) / 6 forms
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_min_with_the_cap_first_fuses():
    fused, hits = run_pass(_paddle_hardswish("min_swapped"), FuseActivationsPass)
    assert hits == 1 and op_types(fused) == ["HardSwish"]


@pytest.mark.parametrize(
    "model",
    [
        _paddle_hardswish("relu_min", cap=5.0),
        _paddle_hardswish("affine_mul", high=0.9),
        _paddle_hardswish("affine_div", high=6.0),
    ],
)
def test_paddle_forms_with_other_bounds_are_refused(model):
    fused, hits = run_pass(model, FuseActivationsPass)
    assert hits == 0 and "HardSwish" not in op_types(fused)


def test_affine_form_below_opset_14_becomes_hardsigmoid_with_a_note():
    context = PassContext()
    fused, hits = run_pass(_paddle_hardswish("affine_mul", opset=13), FuseActivationsPass, context)
    assert hits == 1
    assert op_types(fused) == ["HardSigmoid", "Mul"]
    assert any("1 HardSwish match(es) need opset 14" in note for note in context.notes)
