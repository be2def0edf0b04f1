"""A weight several layers read is one weight: pruning keeps it shared.

The analysis once gave each use of a shared weight its own channel dims, and removal its
own sliced copy: a Conv weight shared by two Convs became two tensors and the model grew
(sharedconv at flops=0.3: params +13%), so a params= target cut far more FLOPs than asked.
Its uses now lose the same channels and the pruned weight stays one tensor. Constant
fills (zero biases an exporter merged) keep a dim per use, and the report says when they
become several tensors.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.analysis.stats import live_parameter_count
from graphopt.analysis.zig import analyze
from graphopt.passes.pruning.prune import PrunePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.pruning.graphs import write_npz
from graphopt_tests.passes.pruning.zeroed import assert_zeroed_equivalent

F = TensorProto.FLOAT
IMAGES = [(1, 3, 12, 12), (2, 3, 7, 9)]
SEQUENCES = [(1, 5, 16), (3, 2, 16)]


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def shared_conv(seed: int = 0) -> ir.Model:
    """conv a, conv b (3→16) → Relu → the same conv sh (16→16) on each → Relu → Concat →
    1x1 conv (32→4)."""
    rng = np.random.default_rng(seed)
    inits = {
        "a.w": _w(rng, 16, 3, 3, 3),
        "a.b": _w(rng, 16),
        "b.w": _w(rng, 16, 3, 3, 3),
        "b.b": _w(rng, 16),
        "sh.w": _w(rng, 16, 16, 3, 3),
        "sh.b": _w(rng, 16),
        "d.w": _w(rng, 4, 32, 1, 1),
        "d.b": _w(rng, 4),
    }
    nodes = []
    for p in ("a", "b"):
        nodes += [
            helper.make_node("Conv", ["x", f"{p}.w", f"{p}.b"], [f"{p}c"], pads=[1] * 4),
            helper.make_node("Relu", [f"{p}c"], [f"{p}r"]),
            helper.make_node("Conv", [f"{p}r", "sh.w", "sh.b"], [f"{p}s"], pads=[1] * 4),
            helper.make_node("Relu", [f"{p}s"], [f"{p}o"]),
        ]
    nodes += [
        helper.make_node("Concat", ["ao", "bo"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "d.w", "d.b"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, ["N", 3, "H", "W"])],
        [tensor_info("y", F, ["N", 4, "H", "W"])],
        inits,
    )


def shared_matmul(seed: int = 0) -> ir.Model:
    """x @ wa, x @ wb (16→32) → Relu → @ ws (the same 32×32) → Relu → Add → @ wo (→8)."""
    rng = np.random.default_rng(seed)
    inits = {"wa": _w(rng, 16, 32), "wb": _w(rng, 16, 32), "ws": _w(rng, 32, 32)}
    inits["wo"] = _w(rng, 32, 8)
    nodes = []
    for p in ("a", "b"):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}m"]),
            helper.make_node("Relu", [f"{p}m"], [f"{p}r"]),
            helper.make_node("MatMul", [f"{p}r", "ws"], [f"{p}s"]),
            helper.make_node("Relu", [f"{p}s"], [f"{p}o"]),
        ]
    nodes += [
        helper.make_node("Add", ["ao", "bo"], ["sum"]),
        helper.make_node("MatMul", ["sum", "wo"], ["y"]),
    ]
    return make_model(
        nodes, [tensor_info("x", F, ["N", "T", 16])], [tensor_info("y", F, ["N", "T", 8])], inits
    )


def prune(model: ir.Model, **options):
    copy = model.clone()
    context = PassContext()
    PrunePass(context, **options)(copy)
    return copy, context.details["prune"], context.notes


@pytest.mark.parametrize("target", [{"flops": 0.3}, {"params": 0.1}, {"params": 0.3}])
def test_a_shared_conv_weight_stays_one_tensor(target) -> None:
    model = shared_conv()
    pruned, record, notes = prune(model, round_to=1, **target)
    convs = [n for n in pruned.graph if n.op_type == "Conv" and n.inputs[0].name in ("ar", "br")]
    assert len(convs) == 2 and convs[0].inputs[1] is convs[1].inputs[1]
    (ratio,) = target.values()
    achieved = record.flops_removed if "flops" in target else record.params_removed
    assert ratio - 0.005 <= achieved <= ratio + 0.08, notes
    assert live_parameter_count(pruned) < live_parameter_count(model)
    removed = assert_zeroed_equivalent(ir.to_proto(model), ir.to_proto(pruned), IMAGES)
    assert removed["a.w"] == removed["b.w"]  # sh's input channels: a and b lose the same


def test_a_shared_matmul_weight_stays_one_tensor() -> None:
    model = shared_matmul()
    pruned, record, _ = prune(model, flops=0.3, round_to=1)
    first, second = [n.inputs[1] for n in pruned.graph if n.inputs[0].name in ("ar", "br")]
    assert first is second and first.const_value.shape[0] < 32
    assert record.params_after < record.params_before
    assert_zeroed_equivalent(ir.to_proto(model), ir.to_proto(pruned), SEQUENCES)


def test_a_tied_weight_is_one_group_across_its_uses() -> None:
    report = analyze(shared_conv(), {"x": IMAGES[0]})
    sizes = sorted(g.size for g in report.prunable)
    # sh's inputs (a and b outputs) and sh's outputs (both halves of the Concat).
    assert sizes == [16, 16]
    names = {m.tensor for g in report.prunable for m in g.members}
    assert "sh.w" in names and not any("::" in n for n in names)


def test_compensation_leaves_a_tied_weight_shared(tmp_path) -> None:
    calib = write_npz(
        tmp_path / "c.npz", {"x": np.random.default_rng(1).random((16, 3, 8, 8), np.float32)}
    )
    model = shared_conv()
    pruned, record, notes = prune(
        model, flops=0.3, round_to=1, calib=calib, criterion="l2", compensation="lsq"
    )
    convs = [n for n in pruned.graph if n.op_type == "Conv" and n.inputs[0].name in ("ar", "br")]
    assert convs[0].inputs[1] is convs[1].inputs[1]
    assert record.params_after < record.params_before
    assert any("2 layer(s) whose weight other layers share were not refitted" in n for n in notes)


def fill_bias(seed: int = 0) -> ir.Model:
    """conv1 (3→8) → Relu → conv2 (8→8) → Relu → conv3 (8→4); conv1 and conv2 read one
    zero bias (identical constants an exporter merged)."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": _w(rng, 8, 3, 3, 3),
        "w2": _w(rng, 8, 8, 3, 3),
        "zero": np.zeros(8, np.float32),
        "w3": _w(rng, 4, 8, 1, 1),
        "b3": _w(rng, 4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "zero"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "zero"], ["c2"], pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, ["N", 3, "H", "W"])],
        [tensor_info("y", F, ["N", 4, "H", "W"])],
        inits,
    )


def test_a_shared_fill_does_not_couple_its_layers_and_its_copies_are_counted() -> None:
    model = fill_bias()
    assert sorted(g.size for g in analyze(model, {"x": IMAGES[0]}).prunable) == [8, 8]
    pruned, _, notes = prune(model, flops=0.3, round_to=1)
    biases = [n.inputs[2] for n in pruned.graph if n.op_type == "Conv"][:2]
    sizes = [b.const_value.size for b in biases]
    (note,) = [n for n in notes if "constant fill" in n]
    if biases[0] is biases[1]:  # the same channels kept: one copy
        pytest.fail(f"expected different cuts for this seed: {sizes}")
    assert f"({sum(sizes) - 8:+,} parameters)" in note
    assert_zeroed_equivalent(ir.to_proto(model), ir.to_proto(pruned), IMAGES)
