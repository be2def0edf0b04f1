"""EoRA after pruning: paths from a pruned block's input to its output layer, on synthetic
transformer MLPs (pruned by FLOPs with lsq underneath), run in ORT and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.passes.compensation.pruned import DETAILS_KEY, find_pairs
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT
WIDTH, HIDDEN, SEQ = 24, 32, 4


def _ffn(
    seed: int = 0, gated: bool = False, split_inputs: bool = False, act: str = "Relu"
) -> ir.Model:
    """x [batch, 4, 24] → MatMul(24→32) → Add → Relu (→ · gate) → MatMul(32→24) → Add → + x.

    The hidden bias is positive, so most units are on and the removed units' loss is largely
    linear in x: what a path from x can take back, and lsq on the 16 kept units (fewer than
    x's 24 dims) cannot. ``gated``: a second projection of x multiplies the activation (two
    producers, one input); ``split_inputs``: that projection reads another input instead.
    ``act="Abs"`` (bias 0): an even function of Gaussian inputs, with no linear part at all."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": (rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH)).astype(np.float32),
        "b1": np.full(HIDDEN, 1.5 if act == "Relu" else 0.0, np.float32),
        "w2": (rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN)).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(WIDTH)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="up_bias"),
        helper.make_node(act, ["hb"], ["a"], name="act"),
    ]
    inputs = [tensor_info("x", F, ["batch", SEQ, WIDTH])]
    hidden = "a"
    if gated or split_inputs:
        inits["wg"] = (rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH)).astype(np.float32)
        gate_input = "z" if split_inputs else "x"
        if split_inputs:
            inputs.append(tensor_info("z", F, ["batch", SEQ, WIDTH]))
        nodes += [
            helper.make_node("MatMul", [gate_input, "wg"], ["g"], name="gate"),
            helper.make_node("Mul", ["a", "g"], ["ag"], name="gated"),
        ]
        hidden = "ag"
    nodes += [
        helper.make_node("MatMul", [hidden, "w2"], ["o"], name="down"),
        helper.make_node("Add", ["o", "b2"], ["ob"], name="down_bias"),
        helper.make_node("Add", ["ob", "x"], ["y"], name="residual"),
    ]
    outputs = [tensor_info("y", F, ["batch", SEQ, WIDTH])]
    return make_model(nodes, inputs, outputs, inits)


def _calib(path: Path, count: int = 96, with_z: bool = False) -> Path:
    rng = np.random.default_rng(1)
    arrays = {"x": rng.standard_normal((count, SEQ, WIDTH)).astype(np.float32)}
    if with_z:
        arrays["z"] = rng.standard_normal((count, SEQ, WIDTH)).astype(np.float32)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def ffn(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "ffn.onnx"
    ir.save(_ffn(), model)
    return model, _calib(tmp_path / "calib.npz")


def _run(model: Path, out: Path, calib: Path, compensation: str | None = None):
    options = OptimizeOptions(prune="flops=0.4", calib=str(calib), compensation=compensation)
    return optimize(model, out, options).report


def _held_out(fidelity: dict) -> float:
    return sum(f.mean_abs for f in fidelity["held-out"])


def test_paths_reduce_the_held_out_error_of_pruning_with_lsq(ffn, tmp_path) -> None:
    model, calib = ffn
    plain = _run(model, tmp_path / "plain.onnx", calib)
    report = _run(model, tmp_path / "eora.onnx", calib, "eora:8")
    assert DETAILS_KEY not in plain.details
    assert plain.details["prune"].compensation_used == "lsq"
    # lsq stays underneath: the pruning record is the same as without the paths.
    assert report.details["prune"].compensation_used == "lsq"
    record = report.details[DETAILS_KEY].record
    assert [layer.node for layer in record.layers] == ["down"]
    layer = record.layers[0]
    assert (layer.outputs, layer.inputs, layer.rank) == (WIDTH, WIDTH, 8)
    # Relative errors (not squared): half the squared error is √0.5 of the relative one.
    assert layer.error_after < 0.5**0.5 * layer.error_before
    # Before is the lsq-pruned model, on the same held-out samples pruning reports.
    before = report.details["prune"].fidelity_compensated
    assert sum(f.mean_abs for f in before) == pytest.approx(_held_out(record.fidelity_before))
    assert _held_out(record.fidelity_after) < 0.8 * _held_out(record.fidelity_before)
    rows = 1 * SEQ  # FLOPs at one calibration sample
    assert record.flops_added == rows * (2 * 8 * (WIDTH + WIDTH) + WIDTH)
    assert record.params == 8 * (WIDTH + WIDTH)
    assert any("EoRA rank 8: 1 float32 low-rank paths added" in n for n in report.notes)
    saved = json.loads(json.dumps(report.details[DETAILS_KEY].to_json()))
    assert saved["layers"][0]["node"] == "down" and saved["flops_added"] == record.flops_added


def test_output_runs_in_ort_at_two_batch_sizes_and_adds_the_path(ffn, tmp_path) -> None:
    model, calib = ffn
    out = tmp_path / "eora.onnx"
    _run(model, out, calib, "eora:8")
    ops = [n.op_type for n in ir.load(out).graph]
    assert ops.count("MatMul") == 4  # up, down and the path's two
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for batch in (1, 5):
        x = rng.standard_normal((batch, SEQ, WIDTH)).astype(np.float32)
        (got,) = session.run(None, {"x": x})
        (want,) = reference.run(None, {"x": x})
        assert got.shape == want.shape == (batch, SEQ, WIDTH)
        assert np.all(np.isfinite(got))


def test_same_input_gives_the_same_bytes(ffn, tmp_path) -> None:
    model, calib = ffn
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _run(model, first, calib, "eora:8")
    _run(model, second, calib, "eora:8")
    assert first.read_bytes() == second.read_bytes()


def test_a_gated_block_gets_one_path_from_its_shared_input(tmp_path) -> None:
    model = tmp_path / "gated.onnx"
    ir.save(_ffn(gated=True), model)
    report = _run(model, tmp_path / "o.onnx", _calib(tmp_path / "c.npz"), "eora:4")
    record = report.details[DETAILS_KEY].record
    assert [layer.node for layer in record.layers] == ["down"]
    assert _held_out(record.fidelity_after) < _held_out(record.fidelity_before)


def test_producers_reading_different_inputs_are_skipped_with_the_reason(tmp_path) -> None:
    original = _ffn(split_inputs=True)
    pruned = original.clone()
    node = next(n for n in pruned.graph if n.name == "down")
    narrow = ir.tensor(np.zeros((HIDDEN - 4, WIDTH), np.float32), name="w2_narrow")
    value = ir.Value(name="w2_narrow", const_value=narrow)
    pruned.graph.register_initializer(value)
    node.replace_input_with(1, value)
    pairs, skipped = find_pairs(original, pruned)
    assert pairs == []
    assert skipped == [("down", "its producers read 2 different inputs")]


def test_cli_names_the_flag_and_reports_the_paths(ffn, capsys) -> None:
    model, calib = ffn
    out = model.parent / "cli.onnx"
    # flops=0.2: the path's FLOPs count against the target (judged on the model written:
    # -49.2% by pruning, -24.4% with the path); flops=0.4 is missed with it, exit 1.
    args = ["optimize", str(model), "-o", str(out), "--prune", "flops=0.2"]
    code = main([*args, "--calib", str(calib), "--compensation", "eora:8"])
    text = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "compensation lsq (default)" in text
    assert "EoRA rank 8: 1 float32 low-rank paths added" in text
    assert "without EoRA" in text and "with EoRA" in text
    assert "judged on it, prune made FLOPs -24.4%" in " ".join(text.split())
    args[-1] = "flops=0.4"
    assert main([*args, "--calib", str(calib), "--compensation", "eora:8"]) == 1
    assert "FLOPs in the model written -24.4% reached" in capsys.readouterr().err


def test_eora_without_calibration_is_a_one_line_error(ffn) -> None:
    model, _ = ffn
    with pytest.raises(UserInputError, match="--compensation eora:8 needs calibration data"):
        optimize(
            model,
            model.parent / "o.onnx",
            OptimizeOptions(prune="flops=0.4", compensation="eora:8"),
        )


def test_a_cnn_gets_no_path_and_a_note_saying_why(tmp_path) -> None:
    from graphopt_tests.passes.pruning.graphs import cnn, correlated

    model = tmp_path / "cnn.onnx"
    ir.save(cnn(), model)
    calib = tmp_path / "images.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), (24, 3, 8, 8)))
    report = _run(model, tmp_path / "o.onnx", calib, "eora:4")
    record = report.details[DETAILS_KEY].record
    assert record.layers == [] and record.skipped
    assert all(why.startswith(("a Conv", "no MatMul/Gemm producer")) for _, why in record.skipped)
    assert any("prune: eora:4: no path added (" in n for n in report.notes)
    assert "MatMul" not in [n.op_type for n in ir.load(tmp_path / "o.onnx").graph]


def test_a_path_that_fits_only_noise_is_left_out_on_the_validation_samples(tmp_path) -> None:
    # |W_up·x| of Gaussian x has no linear part: a path from x could only fit noise.
    model = tmp_path / "abs.onnx"
    ir.save(_ffn(act="Abs"), model)
    out = tmp_path / "o.onnx"
    report = _run(model, out, _calib(tmp_path / "c.npz"), "eora:8")
    record = report.details[DETAILS_KEY].record
    assert record.layers == [] and record.fidelity_after == {}
    assert record.skipped == [("down", "no path lowered its error on the 14 validation samples")]
    assert any("prune: eora:8: no path added (down: no path lowered" in n for n in report.notes)
    assert [n.op_type for n in ir.load(out).graph].count("MatMul") == 2
