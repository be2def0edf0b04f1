"""The zero-invariance guard of every pruning run: the units chosen, removed, must compute
what the original computes with them zeroed; otherwise the result is refused (exit 1)."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt import io
from graphopt.analysis import dependency_rules
from graphopt.cli import main
from graphopt.errors import CheckFailedError
from graphopt.passes.pruning import pruner
from graphopt.passes.pruning.prune import PrunePass
from graphopt.registry import PassContext
from graphopt_tests.analysis import zig_graphs
from graphopt_tests.passes.pruning.graphs import correlated, mlp, write_npz


def prune(model, **options):
    copy = model.clone()
    context = PassContext()
    PrunePass(context, **options)(copy)
    return copy, context.details["prune"], context.notes


@pytest.fixture
def wrong_removal(monkeypatch):
    """Channel removal that takes one member's slice one channel off: the sizes still fit,
    the channels are the wrong ones (what a bug in removal or in a group would do)."""
    real = pruner.remove_channels

    def off_by_one(model, graph, removed, **options):
        key = next(k for k in sorted(removed) if graph.dims[k].is_param and len(removed[k]))
        wrong = dict(removed)
        wrong[key] = np.sort((removed[key] + 1) % graph.dims[key].size)
        return real(model, graph, wrong, **options)

    monkeypatch.setattr(pruner, "remove_channels", off_by_one)


def test_wrong_removal_is_refused(wrong_removal):
    with pytest.raises(CheckFailedError, match="zero-invariance check failed") as caught:
        prune(mlp(), flops=0.3, round_to=1)
    assert "\n" not in str(caught.value) and "--no-verify" in str(caught.value)


def test_wrong_dependency_rule_is_refused(monkeypatch):
    """LayerNormalization mixes its channels; a rule that says it does not makes its groups
    look prunable, and the guard catches the difference."""
    monkeypatch.setitem(dependency_rules.RULES, "LayerNormalization", dependency_rules._same_axis)
    with pytest.raises(CheckFailedError, match="zero-invariance check failed"):
        prune(zig_graphs.mlp_with_norm("layernorm"), flops=0.3, round_to=1)


def test_guard_passes_and_its_cost_is_reported():
    _, report, notes = prune(mlp(), flops=0.3, round_to=1)
    assert report.check == "passed" and report.check_seconds > 0
    assert report.to_json()["check_seconds"] == report.check_seconds
    summary = next(n for n in notes if n.startswith("prune: ") and " units from " in n)
    assert "zero-invariance check passed (" in summary


def test_guard_judges_on_calibration_inputs(tmp_path, monkeypatch):
    data = correlated(np.random.default_rng(0), (16, 4, 16))
    calib = write_npz(tmp_path / "c.npz", {"x": data})
    seen = []
    real = pruner.check_chosen

    def spy(model, report, removed, pruned, feeds):
        seen.append(feeds)
        return real(model, report, removed, pruned, feeds)

    monkeypatch.setattr(pruner, "check_chosen", spy)
    _, report, _ = prune(mlp(), flops=0.3, criterion="activation", calib=calib, round_to=1)
    assert report.check == "passed"
    np.testing.assert_array_equal(seen[0]["x"], data[: len(seen[0]["x"])])


def test_cli_refuses_with_exit_1_and_writes_nothing(tmp_path, capsys, wrong_removal):
    path, out = tmp_path / "mlp.onnx", tmp_path / "pruned.onnx"
    io.save(mlp(), path)
    code = main(["optimize", str(path), "-o", str(out), "--prune", "flops=0.3"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and not out.exists()
    assert err.count("\n") == 0 and "zero-invariance check failed" in err


def test_no_verify_skips_the_guard(tmp_path, capsys, wrong_removal):
    path, out = tmp_path / "mlp.onnx", tmp_path / "pruned.onnx"
    io.save(mlp(), path)
    code = main(["optimize", str(path), "-o", str(out), "--prune", "flops=0.3", "--no-verify"])
    assert code == 0 and out.is_file()
    assert "zero-invariance check skipped (--no-verify)" in capsys.readouterr().out


def test_cli_prints_the_guards_cost(tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    io.save(mlp(), path)
    assert main(["optimize", str(path), "--prune", "flops=0.3"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long notes
    assert "zero-invariance check passed (" in text


def head_mlp(seed: int = 0, hidden: int = 256, width: int = 16):
    """x -> MatMul -> Relu -> MatMul -> y: the hidden units' consumer writes the graph output,
    so no tensor lies between the removed channels and the output."""
    from onnx import TensorProto, helper

    from graphopt_tests.helpers import make_model, tensor_info

    rng = np.random.default_rng(seed)
    inits = {
        "w1": (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32),
        "w2": (rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    f = TensorProto.FLOAT
    return make_model(
        nodes, [tensor_info("x", f, ["batch", width])], [tensor_info("y", f, ["batch", width])],
        inits,
    )  # fmt: skip


@pytest.mark.parametrize(("drift", "passes"), [(3e-6, True), (3e-4, False)])
def test_outputs_right_past_the_removed_units_get_the_boundary_tolerance(
    monkeypatch, drift, passes
):
    # Rounding drift past 1e-6 (a long sum that lost terms) with nothing between the removed
    # units and the output: the output is the tensor just past them (1e-5), not a final
    # output far downstream (1e-6). A real error (3e-4) is still refused.
    real = pruner.remove_channels

    def drifting(model, graph, removed, **options):
        result = real(model, graph, removed, **options)
        w2 = result.graph.initializers["w2"]
        array = w2.const_value.numpy() * np.float32(1 + drift)
        w2.const_value = ir_tensor(array, "w2")
        return result

    monkeypatch.setattr(pruner, "remove_channels", drifting)
    if passes:
        _, report, _ = prune(head_mlp(), flops=0.3, round_to=1)
        assert report.check.startswith("passed")
    else:
        with pytest.raises(CheckFailedError, match="zero-invariance check failed"):
            prune(head_mlp(), flops=0.3, round_to=1)


def ir_tensor(array: np.ndarray, name: str):
    import onnx_ir as ir

    return ir.Tensor(array, name=name)
