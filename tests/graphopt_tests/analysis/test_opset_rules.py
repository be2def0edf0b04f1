"""Dependency rules read the node's opset where an attribute's default or meaning changed.

Each case is a Conv → op(s) → Conv chain at the op's oldest opset ONNX Runtime runs (7, or
the opset that introduced the form), judged differentially by the zero-invariance check: a
group the rules call prunable must compute the same with its units removed as with them
zeroed. Where a rule had to change, the test also shows that reading the node as the newest
version of its op (what the rules did before) yields a group the check rejects.
"""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.analysis import dependency_rules, flops
from graphopt.analysis.channel_shapes import Context
from graphopt.analysis.zig import ZeroInvariantGroup, ZigReport, analyze
from graphopt.passes.pruning.zig_check import check_groups

F = TensorProto.FLOAT
N = helper.make_node
C = 8  # channels of the first Conv: the group under test


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def chain(
    mid: list[onnx.NodeProto],
    opset: int,
    inits: dict[str, np.ndarray] | None = None,
    c_in: int = C,
    bias: float = 0.0,
    tail: str = "conv",
    value_info: dict[str, list[int]] | None = None,
) -> ir.Model:
    """x → Conv c1 (C channels, output ``h``) → ``mid`` (``h`` → ``m``) → Conv c2 (or
    Gemm with ``tail="gemm"``) reading ``c_in`` channels. ``bias`` shifts c1's bias (a
    negative one makes a zeroed channel the largest value, which Hardmax and Softmax over
    all channels notice)."""
    weights = {"c1.w": _w(C, 3, 3, 3), "c1.b": _w(C) + bias, **(inits or {})}
    nodes = [N("Conv", ["x", "c1.w", "c1.b"], ["h"], pads=[1] * 4), *mid]
    if tail == "gemm":
        weights["c2.w"] = _w(c_in, 5, seed=1)
        weights["c2.b"] = _w(5, seed=1)  # Gemm-7's C is required
        nodes.append(N("Gemm", ["m", "c2.w", "c2.b"], ["y"]))
        out = helper.make_tensor_value_info("y", F, [None] * 2)
    else:
        weights["c2.w"] = _w(4, c_in, 3, 3, seed=1)
        nodes.append(N("Conv", ["m", "c2.w"], ["y"], pads=[1] * 4))
        out = helper.make_tensor_value_info("y", F, [None] * 4)
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
        [out],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
        value_info=[helper.make_tensor_value_info(k, F, v) for k, v in (value_info or {}).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(proto)
    return io.load(proto).model


def group_of(report: ZigReport, tensor: str = "c1.w", axis: int = 0) -> ZeroInvariantGroup:
    return next(
        g for g in report.groups if any(m.tensor == tensor and m.axis == axis for m in g.members)
    )


def assert_removable(model: ir.Model) -> None:
    """c1's output channels form a prunable group and removing units equals zeroing them."""
    report = analyze(model)
    group = group_of(report)
    assert group.prunable, group.reasons
    for per_group in (1, 2):
        result = check_groups(model, report, [group], per_group=per_group, seed=per_group)
        assert result.ok, result


def assert_blocked(model: ir.Model, reason: str) -> None:
    group = group_of(analyze(model))
    assert not group.prunable
    assert any(reason in r for r in group.reasons), group.reasons


def assert_newest_reading_is_wrong(model: ir.Model, monkeypatch, newest: int) -> None:
    """Read as opset ``newest`` (what the rules did before they read the opset), the group
    looks prunable, but removing its units changes the outputs or breaks the model: the
    check rejects it."""
    monkeypatch.setattr(Context, "opset", lambda self, node: newest)
    report = analyze(model)
    group = group_of(report)
    assert group.prunable, group.reasons
    assert not check_groups(model, report, [group]).ok
    monkeypatch.undo()


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
def test_softmax_family_before_13_normalizes_every_axis_from_axis_1(op, monkeypatch) -> None:
    model = chain([N(op, ["h"], ["m"])], opset=7, bias=-50.0)
    assert_blocked(model, f"{op} (opset < 13) normalizes over axes 1..")
    assert_newest_reading_is_wrong(model, monkeypatch, newest=13)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
def test_softmax_family_leaves_channels_before_its_axes_alone(op) -> None:
    # Opset 7, axis=2: one normalization over H×W per channel; opset 13: over W alone.
    assert_removable(chain([N(op, ["h"], ["m"], axis=2)], opset=7, bias=-50.0))
    assert_removable(chain([N(op, ["h"], ["m"])], opset=13, bias=-50.0))
    assert_blocked(chain([N(op, ["h"], ["m"], axis=1)], opset=13), "over the channel axis")


def _split(opset: int, **attrs) -> ir.Model:
    mid = [
        N("Split", ["h"], ["a", "b"], axis=1, **attrs),
        N("Concat", ["b", "a"], ["m"], axis=1),
    ]
    return chain(mid, opset)


@pytest.mark.parametrize("opset", [7, 11])
def test_equal_split_before_13_blocks_the_split_axis(opset, monkeypatch) -> None:
    # Removal must state unequal part sizes; before 13 only a `split` attribute can, and
    # removal writes Split-13's sizes input (which Split-2/11 do not have).
    model = _split(opset)
    assert_blocked(model, "Split (opset < 13) into equal parts")
    assert_newest_reading_is_wrong(model, monkeypatch, newest=13)


@pytest.mark.parametrize(
    ("opset", "attrs"), [(7, {"split": [3, 5]}), (13, {}), (18, {"num_outputs": 2})]
)
def test_split_sizes_stated_or_restated_stay_removable(opset, attrs) -> None:
    assert_removable(_split(opset, **attrs))


@pytest.mark.parametrize("axis", [1, 2])
def test_slice_with_attribute_bounds_blocks_instead_of_crashing(axis) -> None:
    # Slice-1 (opsets 1-9) has no bound inputs: the rule read input 1 and raised IndexError.
    mid = [N("Slice", ["h"], ["m"], starts=[2], ends=[6], axes=[axis])]
    assert_blocked(chain(mid, 7, c_in=4 if axis == 1 else C), "Slice (opset < 10)")


def test_slice_with_bound_inputs_from_opset_10_stays_removable() -> None:
    bounds = {"st": np.array([1], np.int64), "en": np.array([7], np.int64)}
    bounds["ax"] = np.array([2], np.int64)
    assert_removable(chain([N("Slice", ["h", "st", "en", "ax"], ["m"])], 10, bounds))


def test_reshape_with_a_shape_attribute_blocks_instead_of_crashing() -> None:
    # Reshape-1 (opsets 1-4); onnx infers no shape there, so state it as value_info.
    mid = [N("Reshape", ["h"], ["m"], shape=[1, C, 8, 8])]
    assert_blocked(chain(mid, 4, value_info={"m": [1, C, 8, 8]}), "Reshape (opset < 5)")


def test_concat_before_opset_4_joins_on_axis_1() -> None:
    """Concat-1's axis defaults to 1: b's channel k is channel C + k of the concatenation.

    (ORT runs no Concat-1, so this is checked on the groups, not differentially.)"""
    mid = [N("Conv", ["x", "c3.w"], ["h3"], pads=[1] * 4), N("Concat", ["h", "h3"], ["m"])]
    model = chain(
        mid,
        opset=3,
        inits={"c3.w": _w(C, 3, 3, 3, seed=3)},
        c_in=2 * C,
        value_info={"h3": [1, C, 8, 8], "m": [1, 2 * C, 8, 8]},
    )
    group = group_of(analyze(model))
    assert group.prunable, group.reasons
    units = {
        frozenset((m.tensor, int(i)) for m in group.members for i in m.units[u])
        for u in range(group.size)
    }
    # c1's channel k goes with c2's input column k, c3's channel k with column C + k.
    expected = {frozenset({("c1.w", k), ("c1.b", k), ("c2.w", k)}) for k in range(C)}
    expected |= {frozenset({("c3.w", k), ("c2.w", C + k)}) for k in range(C)}
    assert units == expected


def test_legacy_broadcast_before_opset_7_blocks() -> None:
    """Add-6 with broadcast=1, axis=1 adds a [C] bias per channel; aligned at the trailing
    axes (as from opset 7), the bias was left out of the group and kept all C entries."""
    mid = [N("Add", ["h", "bias"], ["m"], broadcast=1, axis=1)]
    assert_blocked(chain(mid, 6, {"bias": _w(C, seed=2)}), "legacy broadcasting (opset < 7)")
    # From opset 7 the same bias is written [C, 1, 1]; it joins the group and is sliced.
    model = chain([N("Add", ["h", "bias"], ["m"])], 7, {"bias": _w(C, 1, 1, seed=2)})
    assert "bias" in {m.tensor for m in group_of(analyze(model)).members}
    assert_removable(model)


def _ints(name: str, values: list[int]) -> dict[str, np.ndarray]:
    return {name: np.array(values, np.int64)}


def _floats(name: str, values: list[float]) -> dict[str, np.ndarray]:
    return {name: np.array(values, np.float32)}


_BN = {"s": _w(C, seed=4), "b": _w(C, seed=5), "mu": _w(C, seed=6)}
_BN["v"] = np.abs(_w(C, seed=7)) + 0.5

# Rules whose attributes moved or changed across opsets and that read them (or the inferred
# shapes) correctly at the oldest opset: (opset, mid nodes, initializers, extra chain args).
AUDITED = {
    "unsqueeze_squeeze_attr_7": (
        7,
        [N("Unsqueeze", ["h"], ["u"], axes=[0]), N("Squeeze", ["u"], ["m"], axes=[0])],
        {},
        {},
    ),
    "unsqueeze_squeeze_input_13": (
        13,
        [N("Unsqueeze", ["h", "ax"], ["u"]), N("Squeeze", ["u", "ax"], ["m"])],
        _ints("ax", [0]),
        {},
    ),
    "pad_attr_7": (7, [N("Pad", ["h"], ["m"], pads=[0, 0, 1, 1, 0, 0, 1, 1])], {}, {}),
    "pad_input_11": (11, [N("Pad", ["h", "p"], ["m"])], _ints("p", [0, 0, 1, 1, 0, 0, 1, 1]), {}),
    "clip_attr_7": (7, [N("Clip", ["h"], ["m"], min=-1.0, max=1.0)], {}, {}),
    "clip_input_11": (
        11,
        [N("Clip", ["h", "lo", "hi"], ["m"])],
        {"lo": np.array(-1, np.float32), "hi": np.array(1, np.float32)},
        {},
    ),
    "reducemean_attr_7": (7, [N("ReduceMean", ["h"], ["m"], axes=[2, 3])], {}, {}),
    "reducesum_input_13": (13, [N("ReduceSum", ["h", "ax"], ["m"])], _ints("ax", [2, 3]), {}),
    "reducemean_input_18": (18, [N("ReduceMean", ["h", "ax"], ["m"])], _ints("ax", [-1]), {}),
    "flatten_7": (
        7,
        [N("ReduceMean", ["h"], ["r"], axes=[2, 3]), N("Flatten", ["r"], ["m"])],
        {},
        {"tail": "gemm"},
    ),
    "upsample_attr_7": (7, [N("Upsample", ["h"], ["m"], scales=[1.0, 1.0, 2.0, 2.0])], {}, {}),
    "upsample_input_9": (9, [N("Upsample", ["h", "sc"], ["m"])], _floats("sc", [1, 1, 2, 2]), {}),
    "resize_10": (10, [N("Resize", ["h", "sc"], ["m"])], _floats("sc", [1, 1, 2, 2]), {}),
    "resize_scales_11": (
        11,
        [N("Resize", ["h", "roi", "sc"], ["m"])],
        {**_floats("roi", []), **_floats("sc", [1, 1, 2, 2])},
        {},
    ),
    "batchnorm_7": (7, [N("BatchNormalization", ["h", "s", "b", "mu", "v"], ["m"])], _BN, {}),
    "dropout_attr_7": (7, [N("Dropout", ["h"], ["m"], ratio=0.5)], {}, {}),
    "split_attr_7": (
        7,
        [
            N("Split", ["h"], ["a", "b"], axis=2, split=[3, 5]),
            N("Concat", ["b", "a"], ["m"], axis=2),
        ],
        {},
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(AUDITED))
def test_audited_rules_at_their_oldest_opset(name: str) -> None:
    opset, mid, inits, extra = AUDITED[name]
    assert_removable(chain(mid, opset, inits, **extra))


@pytest.mark.parametrize(
    ("opset", "mid", "inits", "reason"),
    [
        (7, [N("ReduceMean", ["h"], ["m"], axes=[1])], {}, "reduces over the channel axis"),
        (13, [N("ReduceSum", ["h", "ax"], ["m"])], _ints("ax", [1]), "reduces over the channel"),
        (7, [N("Pad", ["h"], ["m"], pads=[0, 1, 0, 0, 0, 1, 0, 0])], {}, "Pad changes the size"),
    ],
)
def test_audited_rules_still_block_the_channel_axis(opset, mid, inits, reason) -> None:
    c_in = C + 2 if mid[0].op_type == "Pad" else 1
    assert_blocked(chain(mid, opset, inits, c_in=c_in), reason)


def test_pruning_pass_through_list_is_not_the_flops_table(monkeypatch) -> None:
    """An op added to the FLOPs table's per-element set (LRN mixes neighbouring channels)
    must not become a channel pass-through for pruning."""
    monkeypatch.setattr(flops, "ELEMENTWISE", flops.ELEMENTWISE | {"LRN"})
    try:
        importlib.reload(dependency_rules)
        assert "LRN" not in dependency_rules.RULES
    finally:
        monkeypatch.undo()
        importlib.reload(dependency_rules)
    assert dependency_rules.RULES["Relu"] is dependency_rules._elementwise
