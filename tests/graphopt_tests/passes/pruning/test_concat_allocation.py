"""Groups joined by a Concat: the cost of a unit is its own branch's, so targets are met.

A Concat of two Conv branches is one group whose units sit in different Convs. The cost
model once judged every unit by the first dim found (one branch): units of the other
branch seemed to cost nothing, and pruning overshot (flops=0.25 removed 45%) with a note
blaming large units.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.analysis.flops import model_flops
from graphopt.passes.pruning.prune import PrunePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.pruning.zeroed import assert_zeroed_equivalent

F = TensorProto.FLOAT
SHAPES = [(1, 3, 16, 16), (2, 3, 9, 13)]


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _conv(x: str, w: str, y: str, **attrs) -> helper.NodeProto:
    return helper.make_node("Conv", [x, w, w[:-1] + "b"], [y], **attrs)


def concat_model(widths: tuple[int, ...], groups: int = 0, seed: int = 0) -> ir.Model:
    """Conv(3→w) branches + Relu → Concat → [grouped 3x3 Conv] → 1x1 Conv(→4)."""
    rng = np.random.default_rng(seed)
    nodes, inits, parts = [], {}, []
    for i, width in enumerate(widths):
        inits[f"b{i}.w"], inits[f"b{i}.b"] = _w(rng, width, 3, 3, 3), _w(rng, width)
        nodes += [
            _conv("x", f"b{i}.w", f"c{i}", pads=[1] * 4),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        parts.append(f"r{i}")
    total = sum(widths)
    nodes.append(helper.make_node("Concat", parts, ["cat"], axis=1))
    last = "cat"
    if groups:
        inits["g.w"], inits["g.b"] = _w(rng, total, total // groups, 3, 3), _w(rng, total)
        nodes += [
            _conv("cat", "g.w", "gc", pads=[1] * 4, group=groups),
            helper.make_node("Relu", ["gc"], ["gr"]),
        ]
        last = "gr"
    inits["o.w"], inits["o.b"] = _w(rng, 4, total, 1, 1), _w(rng, 4)
    nodes.append(_conv(last, "o.w", "y"))
    return make_model(
        nodes,
        [tensor_info("x", F, ["N", 3, "H", "W"])],
        [tensor_info("y", F, ["N", 4, "H", "W"])],
        inits,
    )


def prune(model: ir.Model, **options) -> tuple[ir.Model, float, list[str]]:
    copy = model.clone()
    context = PassContext()
    PrunePass(context, **options)(copy)
    shape = {"x": SHAPES[0]}
    removed = 1 - model_flops(copy, shape).total / model_flops(model, shape).total
    return copy, removed, context.notes


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("kind", ["flops", "params"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_concat_group_meets_its_target_as_one_conv_does(ratio, kind, allocation) -> None:
    """Concat(conv 3→8, conv 3→12) prunes like the same function with one 20-channel conv:
    every unit is 1/20 of the group, so the target is met within one unit."""
    options = {kind: ratio, "round_to": 1, "allocation": allocation}
    _, split, notes = prune(concat_model((8, 12)), **options)
    _, whole, _ = prune(concat_model((20,)), **options)
    assert ratio <= split + 0.005 <= ratio + 0.06, (split, notes)
    assert abs(split - whole) <= 0.051
    assert not any("overshot" in n for n in notes)


def test_one_group_of_a_grouped_conv_after_a_concat_is_enough() -> None:
    """Concat(8, 8) → Conv groups=4: one group is a quarter of the FLOPs, and flops=0.1
    removes that one (it once removed two); the overshoot note names the unit's size."""
    model = concat_model((8, 8), groups=4)
    pruned, removed, notes = prune(model, flops=0.1)
    assert removed == pytest.approx(0.25, abs=0.01)
    (note,) = [n for n in notes if "overshot" in n]
    assert "go whole" in note and "saves 2" in note  # one unit saves about 25%
    units = assert_zeroed_equivalent(ir.to_proto(model), ir.to_proto(pruned), SHAPES)
    assert len(units["g.w"]) == 4  # one group of 4 channels


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_concat_pruning_equals_zeroing_at_two_shapes(allocation) -> None:
    model = concat_model((8, 12), seed=1)
    pruned, removed, _ = prune(model, flops=0.3, round_to=1, allocation=allocation)
    assert 0.29 <= removed <= 0.36
    units = assert_zeroed_equivalent(ir.to_proto(model), ir.to_proto(pruned), SHAPES)
    assert units.get("b0.w") or units.get("b1.w")
