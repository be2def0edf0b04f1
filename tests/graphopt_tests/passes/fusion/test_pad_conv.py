"""fuse-pad-conv: zero constant Pad on spatial axes folded into the Conv's pads."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.pad_conv import FusePadConvPass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT
I64 = np.int64


def _model(
    pads: list[int],
    opset: int = 17,
    mode: str = "constant",
    value: float | None = None,
    axes: list[int] | None = None,
    conv_attrs: dict | None = None,
    spatial: int = 2,
    relu_user: bool = False,
):
    rng = np.random.default_rng(0)
    inits: dict[str, np.ndarray] = {
        "W": rng.normal(size=(4, 3, *(3,) * spatial)).astype(np.float32),
        "B": rng.normal(size=4).astype(np.float32),
    }
    if opset < 11:
        attrs = {"mode": mode, "pads": pads}
        if value is not None:
            attrs["value"] = value
        pad = helper.make_node("Pad", ["X"], ["p"], **attrs)
    else:
        inits["pads"] = np.array(pads, dtype=I64)
        pad_inputs = ["X", "pads"]
        if value is not None or axes is not None:
            pad_inputs.append("")
            if value is not None:
                inits["value"] = np.array(value, dtype=np.float32)
                pad_inputs[2] = "value"
        if axes is not None:
            inits["axes"] = np.array(axes, dtype=I64)
            pad_inputs.append("axes")
        pad = helper.make_node("Pad", pad_inputs, ["p"], mode=mode)
    nodes = [pad, helper.make_node("Conv", ["p", "W", "B"], ["Y"], **(conv_attrs or {}))]
    rank = 2 + spatial
    outputs = [tensor_info("Y", F, [None] * rank)]
    if relu_user:
        nodes.append(helper.make_node("Relu", ["p"], ["Z"]))
        outputs.append(tensor_info("Z", F, [None] * rank))
    x = tensor_info("X", F, [1, 3, *(6,) * spatial])
    return make_model(nodes, [x], outputs, inits, opset=opset)


@pytest.mark.parametrize(
    ("kwargs", "expected_pads"),
    [
        ({"pads": [0, 0, 1, 2, 0, 0, 3, 1]}, [1, 2, 3, 1]),
        ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 0.0}, [1, 1, 1, 1]),
        ({"pads": [0, 0, 2, 1, 0, 0, 0, 1], "opset": 10}, [2, 1, 0, 1]),
        ({"pads": [1, 0, 2, 1], "axes": [-2, 3], "opset": 18}, [1, 0, 2, 1]),
        (
            {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "conv_attrs": {"pads": [1, 0, 0, 2]}},
            [2, 1, 1, 3],
        ),
        ({"pads": [0, 0, 2, 0, 0, 1], "spatial": 1}, [2, 1]),
        (
            {
                "pads": [0, 0, 1, 1, 0, 0, 1, 1],
                "conv_attrs": {"strides": [2, 2], "dilations": [2, 1]},
            },
            [1, 1, 1, 1],
        ),
    ],
)
def test_zero_pad_folds_into_conv(kwargs: dict, expected_pads: list[int]) -> None:
    model = _model(**kwargs)
    after, hits = run_pass(model, FusePadConvPass)
    assert hits == 1
    assert op_types(after) == ["Conv"]
    conv = next(iter(after.graph))
    assert list(conv.attributes["pads"].value) == expected_pads
    assert_same_outputs(model, roundtrip(after))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "reflect"},
        {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "edge", "opset": 10},
        {"pads": [0, 0, -1, 1, 0, 0, 1, 1]},
        {"pads": [0, 1, 1, 1, 0, 0, 1, 1]},  # pads channels
        {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 0.5},
        {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 0.5, "opset": 10},
        {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "conv_attrs": {"auto_pad": "SAME_UPPER"}},
    ],
)
def test_refusals(kwargs: dict) -> None:
    model = _model(**kwargs)
    after, hits = run_pass(model, FusePadConvPass)
    assert hits == 0
    assert op_types(after) == ["Pad", "Conv"]


def test_pad_with_other_user_is_kept() -> None:
    model = _model([0, 0, 1, 1, 0, 0, 1, 1], relu_user=True)
    after, hits = run_pass(model, FusePadConvPass)
    assert hits == 1
    assert sorted(op_types(after)) == ["Conv", "Pad", "Relu"]
    conv = next(n for n in after.graph if n.op_type == "Conv")
    assert conv.inputs[0].name == "X"
    assert_same_outputs(model, roundtrip(after))
