"""`graphopt optimize --prune ...` from the command line: success, and one-line refusals."""

from __future__ import annotations

import numpy as np

from graphopt import io
from graphopt.cli import main
from graphopt_tests.passes.pruning.graphs import correlated, mlp


def _files(tmp_path):
    model = tmp_path / "mlp.onnx"
    io.save(mlp(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), (32, 4, 16)))
    return model, calib


def test_prune_from_the_command_line(tmp_path, capsys):
    model, calib = _files(tmp_path)
    out = tmp_path / "pruned.onnx"
    code = main(
        [
            "optimize", str(model), "-o", str(out), "--prune", "flops=0.3",
            "--criterion", "reconstruction", "--compensation", "lsq", "--calib", str(calib),
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "pruning flops=0.3" in text and "+ lsq" in text
    assert io.load(out).model.graph.initializers  # an ordinary loadable model


def test_refinements_without_prune_are_refused(tmp_path, capsys):
    model, _ = _files(tmp_path)
    assert main(["optimize", str(model), "--criterion", "activation"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--criterion only applies with --prune" in err


def test_pickled_calibration_is_refused_in_one_line(tmp_path, capsys):
    model, _ = _files(tmp_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.array([object()], dtype=object))
    code = main(
        ["optimize", str(model), "--prune", "flops=0.3", "--criterion", "activation",
         "--calib", str(bad)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "mlp.opt.onnx").exists()
