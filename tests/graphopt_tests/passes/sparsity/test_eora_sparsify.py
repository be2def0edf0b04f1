"""``--sparsity ... --compensation eora:R``: low-rank paths after sparsifying, end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt_tests.passes.pruning.graphs import correlated, mlp


def _files(tmp_path):
    path = tmp_path / "model.onnx"
    io.save(mlp(hidden=64, width=16), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), (48, 4, 16)))
    return path, calib


def _cosine(record, key: str, label: str) -> float:
    return min(f.mean_cosine for f in getattr(record, key)[label])


@pytest.mark.parametrize("criterion", ["magnitude", "reconstruction"])
def test_eora_paths_close_part_of_the_gap(tmp_path, criterion):
    model, calib = _files(tmp_path)
    out = tmp_path / "out.onnx"
    options = OptimizeOptions(
        sparsity="2:4", calib=str(calib), compensation="eora:8", sparsity_criterion=criterion
    )
    result = optimize(model, out, options)
    record = result.report.details["sparsify"]
    comp = record.compensation
    assert [layer.node for layer in comp.layers] == ["w1", "w2"]
    assert all(layer.error_after < layer.error_before for layer in comp.layers)
    assert comp.params == 8 * (64 + 16) * 2 and comp.flops_added > 0
    for label in ("calibration", "held-out"):
        assert _cosine(comp, "fidelity_after", label) >= _cosine(comp, "fidelity_before", label)
    # The pass's own fidelity is the compensated model's.
    assert record.fidelity == comp.fidelity_after
    assert record.to_json()["compensation"]["rank"] == 8
    saved = onnx.load(str(out))
    assert [o.name for o in saved.graph.output] == ["y"]
    ops = [n.op_type for n in saved.graph.node]
    assert ops.count("MatMul") == 6 and ops.count("Add") >= 4  # 2 layers + 2 paths of 2
    # The sparse weights stay sparse: the paths hold the correction.
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in saved.graph.initializer}
    assert (weights["w1"] == 0).mean() == pytest.approx(0.5)


def test_same_input_same_bytes(tmp_path):
    model, calib = _files(tmp_path)
    options = OptimizeOptions(sparsity="2:4", calib=str(calib), compensation="eora:4")
    optimize(model, tmp_path / "a.onnx", options)
    optimize(model, tmp_path / "b.onnx", options)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_without_the_flag_nothing_is_added(tmp_path):
    model, calib = _files(tmp_path)
    result = optimize(model, tmp_path / "o.onnx", OptimizeOptions(sparsity="2:4", calib=str(calib)))
    assert result.report.details["sparsify"].compensation is None
    assert not any(n.name.startswith("eora") for n in result.model.graph)


def test_pruning_values_without_pruning_are_exit_2(tmp_path, capsys):
    """Before: exit 0 with a note that sparsify ignored --compensation lsq."""
    model, calib = _files(tmp_path)
    args = ["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--sparsity", "2:4"]
    assert main([*args, "--calib", str(calib), "--compensation", "lsq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compensation lsq only applies with --prune" in err
    assert "--sparsity takes none or eora:RANK" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compensation", "eora:zero"], "expected none or eora:RANK"),
        (["--compensation", "eora:8"], "needs calibration data"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, extra, message):
    model, _ = _files(tmp_path)
    args = ["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--sparsity", "2:4", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    if "calibration" in message:
        assert "--calib" in err
