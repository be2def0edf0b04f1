"""Pruning models with the inputs and weights real exports have: a recurrent state whose batch
axis is not the first, scalar inputs, weights inside If branches, quantized weights. Each run
is pruned (exit 0) or refused in one line saying why nothing would be (exit 2, nothing
written), never an internal error."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from graphopt import io
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.passes.calibration.samples import load_calibration, random_calibration
from graphopt.passes.pruning.prune import PrunePass
from graphopt.registry import PassContext
from graphopt_tests.passes.pruning import graphs as G


def _cli(tmp_path, model, *args: str) -> tuple[int, str]:
    path = tmp_path / "model.onnx"
    io.save(model, path)
    code = main(["optimize", str(path), "-o", str(tmp_path / "out.onnx"), *args])
    return code, path


def _text(capsys) -> str:
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())  # rich wraps long notes


@pytest.mark.parametrize("build", [G.recurrent_state, G.scalar_rate])
@pytest.mark.parametrize("extra", [[], ["--criterion", "activation", "--compensation", "lsq"]])
def test_state_and_scalar_inputs_prune_with_random_calibration(tmp_path, capsys, build, extra):
    code, _ = _cli(tmp_path, build(), "--prune", "flops=0.3", "--calib", "random", *extra)
    text = _text(capsys)
    assert code == 0, text
    assert "units from 1/1 groups" in text and "zero-invariance check passed" in text


@pytest.mark.parametrize(
    "build,message",
    [
        (
            G.conv_in_if,
            "prune flops=0.3: nothing to prune: no prunable group: weights inside If branches "
            "are not analysed (1 tensor) (see `graphopt analyze`); the model would come back "
            "unchanged",
        ),
        (
            G.dequantized,
            "prune flops=0.3: the model is already quantized (it has DequantizeLinear); prune "
            "the float model, then quantize it",
        ),
    ],
)
def test_nothing_to_prune_is_refused_saying_why(tmp_path, capsys, build, message):
    """Before: the unchanged model was written as pruned (exit 0, a note said why)."""
    code, _ = _cli(tmp_path, build(), "--prune", "flops=0.3", "--calib", "random")
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err == f"graphopt: error: {message}"
    assert not (tmp_path / "out.onnx").exists()


def test_random_calibration_batches_a_state_along_its_batch_axis():
    calib = random_calibration(G.recurrent_state(), {})
    assert calib.axes == {"x": 0, "state": 1}
    assert calib.arrays["x"].shape == (32, 16) and calib.arrays["state"].shape == (2, 32, 8)
    assert calib.sample_shapes() == {"x": (1, 16), "state": (2, 1, 8)}
    feeds = next(calib.batches())
    assert feeds["x"].shape == (8, 16) and feeds["state"].shape == (2, 8, 8)
    _, held = calib.split(0.25)
    assert held.count == 8 and held.arrays["state"].shape == (2, 8, 8)


def test_random_calibration_keeps_scalars_and_counts_from_one():
    calib = random_calibration(G.scalar_rate(), {})
    assert calib.axes["rate"] is None and calib.batch == 1
    rates = [feeds["rate"] for feeds in calib.batches()]
    assert len(rates) == 32 and all(r.shape == () and r.dtype == np.int64 for r in rates)
    # 0 would divide by zero: a scalar integer is a rate, count or length, not an index.
    assert min(rates) >= 1 and len(set(int(r) for r in rates)) > 1


def test_npz_samples_along_the_batch_axis_or_stacked(tmp_path):
    rng = np.random.default_rng(0)
    path = G.write_npz(
        tmp_path / "state.npz",
        {"x": rng.standard_normal((40, 16), np.float32), "state": np.zeros((2, 40, 8), np.float32)},
    )
    calib = load_calibration(path, G.recurrent_state())
    assert calib.count == 40 and calib.axes == {"x": 0, "state": 1}
    scalars = G.write_npz(
        tmp_path / "rate.npz",
        {"x": rng.standard_normal((6, 16), np.float32), "rate": np.arange(1, 7, dtype=np.int64)},
    )
    calib = load_calibration(scalars, G.scalar_rate())
    assert calib.axes == {"x": 0, "rate": None}
    assert [int(f["rate"]) for f in calib.batches()] == [1, 2, 3, 4, 5, 6]


def test_npz_state_fits_and_measures_across_uneven_batches(tmp_path):
    """40 samples: 10 held out, fed as batches of 8 and 2 along the state's second axis; the
    outputs ([2, batch, 8]) are joined along that axis for the fidelity report."""
    rng = np.random.default_rng(1)
    path = G.write_npz(
        tmp_path / "state.npz",
        {
            "x": G.correlated(rng, (40, 16)),
            "state": rng.standard_normal((2, 40, 8)).astype(np.float32),
        },
    )
    context = PassContext()
    options = {"criterion": "activation", "compensation": "bias", "calib": path, "round_to": 1}
    PrunePass(context, flops=0.3, **options)(G.recurrent_state())
    report = context.details["prune"]
    assert report.heldout_samples == 10 and report.units_removed > 0
    assert report.fidelity_pruned and report.check == "passed"


def test_npz_in_another_layout_is_refused_with_the_expected_one(tmp_path):
    path = G.write_npz(
        tmp_path / "bad.npz",
        {"x": np.zeros((4, 16), np.float32), "state": np.zeros((4, 8), np.float32)},
    )
    with pytest.raises(UserInputError, match="along axis 1") as caught:
        load_calibration(path, G.recurrent_state())
    assert "\n" not in str(caught.value)


def test_analyze_runs_the_exact_passes_first(tmp_path, capsys):
    """The flat weight reshaped at run time ties all hidden units into one: only after
    constant folding, as ``optimize --prune`` sees the model, is the group prunable."""
    path = tmp_path / "flat.onnx"
    io.save(G.flat_weight(), path)
    assert main(["analyze", str(path)]) == 0
    text = _text(capsys)
    assert "1 prunable" in text and "analysed after the default exact passes" in text
    assert main(["analyze", str(path), "--raw"]) == 0
    text = _text(capsys)
    assert "0 prunable" in text and "analysed after" not in text
    assert main(["analyze", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prunable"] == 1 and data["exact_passes_first"] is True


def test_analyze_blocked_counts_add_up(tmp_path, capsys):
    """One group blocked by the state input alone, one by it and the output as well: two
    lines, two groups (not 'graph input ×2' and 'graph output ×1' for two groups)."""
    path = tmp_path / "state.onnx"
    io.save(G.recurrent_state(), path)
    assert main(["analyze", str(path)]) == 0
    text = capsys.readouterr().out
    blocked = int(re.search(r"(\d+) blocked", text).group(1))
    lines = [int(n) for n in re.findall(r"blocked ×(\d+):", text)]
    assert blocked == 2 and sum(lines) == blocked
    assert "blocked ×1: graph input; graph output" in text


def test_analyze_lists_weights_it_leaves_out(tmp_path, capsys):
    path = tmp_path / "if.onnx"
    io.save(G.conv_in_if(), path)
    assert main(["analyze", str(path)]) == 0
    text = _text(capsys)
    assert "0 groups" in text
    assert "in no group: weights inside If branches are not analysed (1 tensor)" in text
    assert main(["analyze", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["not_analysed"] == [
        {"reason": "weights inside If branches are not analysed", "tensors": 1}
    ]


def test_all_groups_blocked_says_why_with_counts_that_add_up():
    from graphopt_tests.analysis import zig_graphs

    context = PassContext()
    with pytest.raises(UserInputError, match="nothing to prune: no prunable group: ") as raised:
        PrunePass(context, flops=0.3)(zig_graphs.mlp_with_norm("layernorm"))
    line = str(raised.value)
    groups = int(re.search(r"(\d+) group\(s\), all blocked", line).group(1))
    counts = [int(n) for n in re.findall(r"×(\d+)", line)]
    assert groups > 0 and sum(counts) == groups and "LayerNormalization" in line
    assert context.details["prune"].groups_prunable == 0


def test_npz_with_nan_or_inf_is_refused_in_one_line(tmp_path):
    x = np.ones((4, 16), np.float32)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    path = G.write_npz(tmp_path / "nan.npz", {"x": x, "state": np.zeros((2, 4, 8), np.float32)})
    with pytest.raises(UserInputError, match="'x' holds 2 NaN or infinite") as caught:
        load_calibration(path, G.recurrent_state())
    assert "\n" not in str(caught.value)
