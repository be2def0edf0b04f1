"""The ``sparsify`` pass end to end: flags, the pattern in the saved weights, nothing else
changed, the report, defaults, determinism, and its place between prune and quantize."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt.registry import flag_owners
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.pruning.graphs import cnn, correlated, mlp

F = TensorProto.FLOAT


def _files(tmp_path, model=None, shape=(48, 4, 16)):
    path = tmp_path / "model.onnx"
    io.save(model or mlp(hidden=64, width=16), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), shape))
    return path, calib


def _weights(path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_flags_are_derived_from_the_options():
    owners = flag_owners()
    for key in ("sparsity", "sparsity_criterion", "sparsity_allocation", "sparsity_layers"):
        assert [t.owner.name for t in owners[key]] == ["sparsify"]
    assert "sparsify" in [t.owner.name for t in owners["calib"]]


def test_two_four_from_the_command_line(tmp_path, capsys):
    model, calib = _files(tmp_path)
    out = tmp_path / "sparse.onnx"
    code = main(
        ["optimize", str(model), "-o", str(out), "--sparsity", "2:4", "--calib", str(calib)]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "sparsity 2:4: 2 layers sparsified (50.0%" in text
    assert "criterion reconstruction" in text and "held-out" in text
    before, after = _weights(model), _weights(out)
    assert sorted(before) == sorted(after)
    for name in ("w1", "w2"):  # MatMul weights [K, N]: groups of 4 along K, per output
        groups = (after[name].T.reshape(after[name].shape[1], -1, 4) != 0).sum(axis=2)
        assert (groups == 2).all()
    for name in ("b1", "b2"):
        np.testing.assert_array_equal(before[name], after[name])
    # Nothing but the weights changed: the same nodes, in the same order, same wiring.
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in onnx.load(str(out)).graph.node]
    assert nodes == [(n.op_type, list(n.input), list(n.output))
                     for n in onnx.load(str(model)).graph.node]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "2:5:1"], "--sparsity '2:5:1': expected N:M"),
        (["--sparsity", "2:4", "--sparsity-criterion", "wanda"], "criterion wanda needs calib"),
        (["--sparsity-criterion", "wanda"], "--sparsity-criterion only applies with --sparsity"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    model, _ = _files(tmp_path)
    assert main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_without_data_magnitude_and_the_report_says_so(tmp_path):
    model, _ = _files(tmp_path)
    result = optimize(model, tmp_path / "o.onnx", OptimizeOptions(sparsity="unstructured=0.5"))
    record = result.report.details["sparsify"]
    assert record.criterion == "magnitude" and record.defaults == ["criterion", "allocation"]
    assert record.error_kind == "weight" and "no calibration data" in record.notes[0]
    assert list(record.fidelity) == ["generated"]
    assert all(layer.sparsity == pytest.approx(0.5) for layer in record.layers)


def test_reconstruction_beats_wanda_beats_nothing(tmp_path):
    model, calib = _files(tmp_path)
    cosines = {}
    for criterion in ("magnitude", "wanda", "reconstruction"):
        options = OptimizeOptions(
            sparsity="block:1x4=0.75", sparsity_criterion=criterion, calib=str(calib)
        )
        record = optimize(model, tmp_path / f"{criterion}.onnx", options).report.details["sparsify"]
        cosines[criterion] = record.fidelity["held-out"][0].mean_cosine
        errors = [layer.error for layer in record.layers]
        assert all(error is not None and error > 0 for error in errors) or criterion == "magnitude"
    assert cosines["reconstruction"] > cosines["magnitude"]
    assert cosines["reconstruction"] > cosines["wanda"]


def test_same_input_same_bytes(tmp_path):
    model, calib = _files(tmp_path, cnn(), (16, 3, 8, 8))
    outputs = []
    for run in range(2):
        out = tmp_path / f"run{run}.onnx"
        options = OptimizeOptions(
            sparsity="block:1x4=0.5", sparsity_allocation="global", calib=str(calib), verify=False
        )
        record = optimize(model, out, options).report.details["sparsify"]
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    shares = [layer.sparsity for layer in record.layers]
    params = [layer.params for layer in record.layers]
    assert len(set(np.round(shares, 3))) > 1  # global: layers differ
    assert np.average(shares, weights=params) == pytest.approx(0.5, abs=0.01)


def test_conv_two_four_groups_channels_at_each_tap(tmp_path):
    model, calib = _files(tmp_path, cnn(), (16, 3, 8, 8))
    out = tmp_path / "o.onnx"
    options = OptimizeOptions(sparsity="2:4", calib=str(calib))
    record = optimize(model, out, options).report.details["sparsify"]
    # c1 reads 3 channels: not a multiple of 4, listed; the classifier stays dense.
    assert "input channels per group 3 is not a multiple of 4" in dict(record.skipped).values()
    w = _weights(out)["c2.w"]  # [O, C, kh, kw]: every 4 consecutive channels at one tap keep 2
    groups = (np.moveaxis(w, 1, -1).reshape(w.shape[0], -1, 4) != 0).sum(axis=2)
    assert (groups == 2).all()


def test_prune_then_sparsify_then_quantize(tmp_path, capsys):
    model, calib = _files(tmp_path, cnn(), (16, 3, 8, 8))
    out = tmp_path / "o.onnx"
    code = main(
        ["optimize", str(model), "-o", str(out), "--prune", "flops=0.3", "--sparsity", "2:4",
         "--quantize", "int8-dynamic", "--calib", str(calib)]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    order = [line.split()[0] for line in text.splitlines() if "│ lossy" in line]
    assert order == ["prune", "sparsify", "quantize"]


def test_a_constant_node_weight(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w, "w")),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = {"w2": rng.standard_normal((8, 4)).astype(np.float32)}
    model = make_model(nodes, [tensor_info("x", F, [2, 32])], [tensor_info("y", F, [2, 4])], inits)
    path = tmp_path / "m.onnx"
    io.save(model, path)
    out = tmp_path / "o.onnx"
    result = optimize(path, out, OptimizeOptions(sparsity="2:4", sparsity_layers="all"))
    assert [layer.op for layer in result.report.details["sparsify"].layers] == ["MatMul"]
    proto = onnx.load(str(out))
    assert "Constant" not in [n.op_type for n in proto.graph.node]
    sparse = [t for t in proto.graph.initializer if t.dims == [32, 8]]
    assert len(sparse) == 1 and (onnx.numpy_helper.to_array(sparse[0]) == 0).mean() == 0.5


def test_keep_last_false_sparsifies_the_classifier(tmp_path, capsys):
    model, _ = _files(tmp_path, cnn(), (16, 3, 8, 8))
    out = tmp_path / "o.onnx"
    args = ["optimize", str(model), "-o", str(out), "--sparsity", "unstructured=0.5"]
    assert main([*args, "--sparsity-keep-last", "false", "--no-verify"]) == 0
    assert "4 layers sparsified" in capsys.readouterr().out
    assert (_weights(out)["fc.w"] == 0).mean() == 0.5


def test_the_shown_layer_error_is_the_relative_output_error(tmp_path):
    """The report showed ‖XΔWᵀ‖²/‖XWᵀ‖² as the "relative output error" (0.09 for a layer
    whose outputs moved by 31%): the shown value (table, JSON) must be ‖XΔWᵀ‖/‖XWᵀ‖."""
    from graphopt.passes.sparsity.record import layer_table

    model, calib = _files(tmp_path)
    out = tmp_path / "s.onnx"
    options = OptimizeOptions(
        sparsity="2:4", sparsity_criterion="wanda", calib=str(calib), verify=False
    )
    record = optimize(model, out, options).report.details["sparsify"]
    # w1 reads the model input: its inputs are the fitted samples (the first 36 of 48; the
    # last quarter is held out) with no sparsified layer before it.
    x = np.load(calib)["x"][:36].reshape(-1, 16).astype(np.float64)
    w, sparse = _weights(model)["w1"].astype(np.float64), _weights(out)["w1"]
    expected = np.linalg.norm(x @ (w - sparse)) / np.linalg.norm(x @ w)
    layer = record.layers[0]  # graph order: the MatMul of w1 first
    assert layer.error == pytest.approx(expected, rel=1e-4)
    assert layer.error_squared == pytest.approx(expected**2, rel=1e-4)
    (shown,) = [e for e in record.to_json()["layers"] if e["node"] == layer.node]
    assert shown["error"] == pytest.approx(expected, rel=1e-4)
    assert f"{expected:.3g}" in [cell for col in layer_table(record).columns for cell in col._cells]
