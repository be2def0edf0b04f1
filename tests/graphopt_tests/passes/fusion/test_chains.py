"""merge-concats, merge-slices, merge-squeezes: chains of one shape op merged into one."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.chains import MergeConcatsPass, MergeSlicesPass, MergeSqueezesPass
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


def _concats(inner_axis: int, outer_axis: int, extra_output: bool = False):
    nodes = [
        helper.make_node("Concat", ["A", "B"], ["ab"], axis=inner_axis),
        helper.make_node("Concat", ["C", "ab", "A"], ["Y"], axis=outer_axis),
    ]
    ins = [tensor_info(n, F, [2, 3, 4]) for n in "ABC"]
    outs = [tensor_info("Y", F, [None] * 3)]
    if extra_output:
        outs.append(tensor_info("ab", F, [None] * 3))
    return make_model(nodes, ins, outs)


@pytest.mark.parametrize(("inner", "outer"), [(1, 1), (-1, 2), (0, 0)])
def test_concats_merged(inner: int, outer: int) -> None:
    model = _concats(inner, outer)
    after, hits = run_pass(model, MergeConcatsPass)
    assert hits == 1
    assert op_types(after) == ["Concat"]
    assert [v.name for v in next(iter(after.graph)).inputs] == ["C", "A", "B", "A"]
    assert_same_outputs(model, roundtrip(after))


@pytest.mark.parametrize(
    "kwargs", [{"inner": 0, "outer": 1}, {"inner": 1, "outer": 1, "extra_output": True}]
)
def test_concats_refused(kwargs: dict) -> None:
    after, hits = run_pass(
        _concats(kwargs["inner"], kwargs["outer"], kwargs.get("extra_output", False)),
        MergeConcatsPass,
    )
    assert hits == 0
    assert op_types(after) == ["Concat", "Concat"]


def _slices(first: list[list[int]], second: list[list[int]]):
    inits = {}
    nodes = []
    for i, spec in enumerate((first, second)):
        names = [f"s{i}_{k}" for k in ("starts", "ends", "axes", "steps")][: len(spec)]
        for name, values in zip(names, spec, strict=True):
            inits[name] = np.array(values, I64)
        nodes.append(
            helper.make_node("Slice", ["X" if i == 0 else "t", *names], ["t" if i == 0 else "Y"])
        )
    x = tensor_info("X", F, [6, 8, 10])
    return make_model(nodes, [x], [tensor_info("Y", F, [None] * 3)], inits)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([[1], [5], [0]], [[2], [-1], [2], [2]]),  # disjoint axes
        ([[1, 2], [7, 100]], [[1, 0], [3, 5], [0, 1]]),  # same axes, unit steps
        ([[2], [9], [-2]], [[1], [4], [1]]),  # negative axis, known rank
        ([[4], [100], [2]], [[9], [20], [2]]),  # clamped to empty
    ],
)
def test_slices_merged(first, second) -> None:
    model = _slices(first, second)
    after, hits = run_pass(model, MergeSlicesPass)
    assert hits == 1
    assert op_types(after) == ["Slice"]
    assert_same_outputs(model, roundtrip(after))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([[1], [5], [0], [2]], [[1], [3], [0]]),  # step 2 then same axis
        ([[-3], [5], [1]], [[0], [2], [1]]),  # negative start on the shared axis
    ],
)
def test_slices_refused(first, second) -> None:
    after, hits = run_pass(_slices(first, second), MergeSlicesPass)
    assert hits == 0
    assert op_types(after) == ["Slice", "Slice"]


def _squeezes(first: list[int] | None, second: list[int], opset: int = 17, shape=(1, 3, 1, 1, 4)):
    kept = sum(d != 1 for d in shape) if first is None else len(shape) - len(first)
    out_rank = kept - len(second)
    inits = {}
    if opset >= 13:
        ins0 = ["X"] + (["a0"] if first is not None else [])
        if first is not None:
            inits["a0"] = np.array(first, I64)
        inits["a1"] = np.array(second, I64)
        nodes = [
            helper.make_node("Squeeze", ins0, ["t"]),
            helper.make_node("Squeeze", ["t", "a1"], ["Y"]),
        ]
    else:
        nodes = [
            helper.make_node("Squeeze", ["X"], ["t"], axes=first),
            helper.make_node("Squeeze", ["t"], ["Y"], axes=second),
        ]
    return make_model(
        nodes,
        [tensor_info("X", F, list(shape))],
        [tensor_info("Y", F, [None] * out_rank)],
        inits,
        opset=opset,
    )


@pytest.mark.parametrize(
    ("first", "second", "opset"),
    [([0], [1], 17), ([2], [0, 2], 17), ([-2], [-2], 17), ([0, 3], [1], 11)],
)
def test_squeezes_merged(first, second, opset) -> None:
    model = _squeezes(first, second, opset)
    after, hits = run_pass(model, MergeSqueezesPass)
    assert hits == 1
    assert op_types(after) == ["Squeeze"]
    assert_same_outputs(model, roundtrip(after))


def test_squeeze_without_axes_refused() -> None:
    after, hits = run_pass(_squeezes(None, [0]), MergeSqueezesPass)
    assert hits == 0
    assert op_types(after) == ["Squeeze", "Squeeze"]


def _shared_inner(second_axis: int = 2):
    # swin_t's patch merging: x[:, 0::2] read by [..., 0::2, :] and [..., 1::2, :]
    inits = {
        "s0": np.array([0], I64),
        "e": np.array([np.iinfo(np.int64).max], I64),
        "a1": np.array([1], I64),
        "a2": np.array([second_axis], I64),
        "two": np.array([2], I64),
        "s1": np.array([1], I64),
    }
    nodes = [
        helper.make_node("Slice", ["X", "s0", "e", "a1", "two"], ["t"]),
        helper.make_node("Slice", ["t", "s0", "e", "a2", "two"], ["Y"]),
        helper.make_node("Slice", ["t", "s1", "e", "a2", "two"], ["Z"]),
    ]
    x = tensor_info("X", F, [2, 6, 8, 3])
    outs = [tensor_info(n, F, [None] * 4) for n in "YZ"]
    return make_model(nodes, [x], outs, inits)


def test_slice_read_by_two_slices_merges_into_both() -> None:
    model = _shared_inner()
    after, hits = run_pass(model, MergeSlicesPass)
    assert hits == 2
    assert op_types(after) == ["Slice", "Slice"]
    assert [v.name for v in after.graph.outputs] == ["Y", "Z"]
    assert_same_outputs(model, roundtrip(after))


def test_slice_read_by_two_slices_refused_when_one_cannot_merge() -> None:
    # second slices on the same axis with step 2 after step 2: not composable
    after, hits = run_pass(_shared_inner(second_axis=1), MergeSlicesPass)
    assert hits == 0
    assert op_types(after) == ["Slice", "Slice", "Slice"]


def test_slices_sharing_one_axes_constant_merge() -> None:
    # Both Slices read the same axes Constant node: dropping it once must be enough (it was
    # dropped twice, "node ... is not in a graph", and the pass was rolled back).
    nodes = [
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", 7, [1], [1])),
        helper.make_node("Constant", [], ["s0"], value=helper.make_tensor("s0", 7, [1], [1])),
        helper.make_node("Constant", [], ["e0"], value=helper.make_tensor("e0", 7, [1], [7])),
        helper.make_node("Constant", [], ["s1"], value=helper.make_tensor("s1", 7, [1], [2])),
        helper.make_node("Constant", [], ["e1"], value=helper.make_tensor("e1", 7, [1], [5])),
        helper.make_node("Slice", ["X", "s0", "e0", "axes"], ["t"]),
        helper.make_node("Slice", ["t", "s1", "e1", "axes"], ["Y"]),
    ]
    model = make_model(nodes, [tensor_info("X", F, [6, 8, 10])], [tensor_info("Y", F, [None] * 3)])
    after, hits = run_pass(model, MergeSlicesPass)
    assert hits == 1
    assert op_types(after) == ["Slice"]
    assert_same_outputs(model, roundtrip(after))
