"""fuse-reduce-unsqueeze: ReduceX(keepdims=0) → Unsqueeze(same axes) → ReduceX(keepdims=1)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.reduce_unsqueeze import FuseReduceUnsqueezePass
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
    op: str,
    axes: list[int] | None,
    unsqueeze_axes: list[int],
    opset: int,
    extra_output: bool = False,
):
    inits: dict[str, np.ndarray] = {}
    axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    if axes is None:
        reduce = helper.make_node(op, ["X"], ["r"], keepdims=0)
    elif axes_as_input:
        inits["axes"] = np.array(axes, np.int64)
        reduce = helper.make_node(op, ["X", "axes"], ["r"], keepdims=0)
    else:
        reduce = helper.make_node(op, ["X"], ["r"], keepdims=0, axes=axes)
    if opset >= 13:
        inits["uaxes"] = np.array(unsqueeze_axes, np.int64)
        unsqueeze = helper.make_node("Unsqueeze", ["r", "uaxes"], ["Y"])
    else:
        unsqueeze = helper.make_node("Unsqueeze", ["r"], ["Y"], axes=unsqueeze_axes)
    outputs = [tensor_info("Y", F, [None] * 4)]
    if extra_output:
        outputs.append(tensor_info("r", F, None if axes is None else [None] * (4 - len(axes))))
    x = tensor_info("X", F, [2, 3, 4, 5])
    return make_model([reduce, unsqueeze], [x], outputs, inits, opset=opset)


@pytest.mark.parametrize(
    ("op", "axes", "unsqueeze_axes", "opset"),
    [
        ("ReduceMean", [1], [1], 17),
        ("ReduceMean", [2, 3], [-1, -2], 18),
        ("ReduceSum", [-1], [3], 13),
        ("ReduceSum", [0, 2], [2, 0], 11),
        ("ReduceMax", [1, 3], [1, 3], 11),
        ("ReduceL2", [2], [2], 18),
    ],
)
def test_fused(op: str, axes: list[int], unsqueeze_axes: list[int], opset: int) -> None:
    model = _model(op, axes, unsqueeze_axes, opset)
    after, hits = run_pass(model, FuseReduceUnsqueezePass)
    assert hits == 1
    assert op_types(after) == [op]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert_same_outputs(model, roundtrip(after))


@pytest.mark.parametrize(
    ("axes", "unsqueeze_axes", "extra_output"),
    [([1], [2], False), ([1, 2], [1], False), ([1], [1], True)],
)
def test_refused(axes, unsqueeze_axes, extra_output) -> None:
    model = _model("ReduceMean", axes, unsqueeze_axes, 17, extra_output)
    after, hits = run_pass(model, FuseReduceUnsqueezePass)
    assert hits == 0
    assert op_types(after) == ["ReduceMean", "Unsqueeze"]
