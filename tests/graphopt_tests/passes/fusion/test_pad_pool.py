"""fuse-pad-pool: Pad into AveragePool (zero fill, count_include_pad) or MaxPool (-inf fill)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.pad_pool import FusePadPoolPass
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
    pool: str,
    pads: list[int],
    value: float | None = None,
    opset: int = 17,
    indices: bool = False,
    pool_pads: list[int] | None = None,
    **pool_attrs,
):
    if pool_pads is not None:
        pool_attrs["pads"] = pool_pads
    inits: dict[str, np.ndarray] = {}
    if opset < 11:
        attrs = {"pads": pads} | ({"value": value} if value is not None else {})
        pad = helper.make_node("Pad", ["X"], ["p"], **attrs)
    else:
        inits["pads"] = np.array(pads, dtype=np.int64)
        pad_inputs = ["X", "pads"]
        if value is not None:
            inits["value"] = np.array(value, dtype=np.float32)
            pad_inputs.append("value")
        pad = helper.make_node("Pad", pad_inputs, ["p"])
    outs = ["Y", "I"] if indices else ["Y"]
    nodes = [pad, helper.make_node(pool, ["p"], outs, kernel_shape=[3, 3], **pool_attrs)]
    outputs = [tensor_info("Y", F, [None] * 4)]
    if indices:
        outputs.append(tensor_info("I", TensorProto.INT64, [None] * 4))
    return make_model(nodes, [tensor_info("X", F, [1, 2, 7, 7])], outputs, inits, opset=opset)


@pytest.mark.parametrize(
    ("pool", "kwargs"),
    [
        ("AveragePool", {"pads": [0, 0, 1, 2, 0, 0, 1, 0], "count_include_pad": 1}),
        ("AveragePool", {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "count_include_pad": 1, "opset": 10}),
        (
            "AveragePool",
            {
                "pads": [0, 0, 1, 0, 0, 0, 0, 0],
                "count_include_pad": 1,
                "strides": [2, 2],
                "pool_pads": [0, 1, 1, 0],
            },
        ),
        ("MaxPool", {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "value": -np.inf}),
        ("MaxPool", {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": -np.inf, "opset": 10}),
    ],
)
def test_fused(pool: str, kwargs: dict) -> None:
    model = _model(pool, **kwargs)
    after, hits = run_pass(model, FusePadPoolPass)
    assert hits == 1
    assert op_types(after) == [pool]
    # negative inputs: a zero fill would win a MaxPool window at the border
    x = -np.abs(np.random.default_rng(0).normal(size=(1, 2, 7, 7))).astype(np.float32)
    assert_same_outputs(model, roundtrip(after), {"X": x})


@pytest.mark.parametrize(
    ("pool", "kwargs"),
    [
        ("AveragePool", {"pads": [0, 0, 1, 1, 0, 0, 1, 1]}),  # count_include_pad=0
        ("AveragePool", {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "count_include_pad": 1, "value": 1.0}),
        ("AveragePool", {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "count_include_pad": 1, "ceil_mode": 1}),
        ("AveragePool", {"pads": [0, 0, 3, 0, 0, 0, 0, 0], "count_include_pad": 1}),
        ("AveragePool", {"pads": [0, 1, 1, 1, 0, 0, 1, 1], "count_include_pad": 1}),
        ("MaxPool", {"pads": [0, 0, 1, 1, 0, 0, 1, 1]}),  # zero fill can win the max
        ("MaxPool", {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": -np.inf, "indices": True}),
    ],
)
def test_refused(pool: str, kwargs: dict) -> None:
    after, hits = run_pass(_model(pool, **kwargs), FusePadPoolPass)
    assert hits == 0
    assert op_types(after) == ["Pad", pool]
