"""The sparsity fidelity table's title says what its rows measured."""

from __future__ import annotations

import numpy as np
from rich.console import Console

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt_tests.passes.pruning.graphs import correlated, mlp


def _rendered(record) -> str:
    console = Console(record=True, width=400)
    record.render(console)
    return console.export_text()


def test_the_title_says_the_eora_paths_are_in_the_rows(tmp_path):
    """With --compensation the rows are the model written, paths in (they equal the "with
    EoRA" rows below): the title used to say "sparsity fidelity" of them."""
    model = tmp_path / "model.onnx"
    io.save(mlp(hidden=64, width=16), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), (48, 4, 16)))
    paths = OptimizeOptions(sparsity="2:4", calib=str(calib), compensation="eora:8")
    record = optimize(model, tmp_path / "a.onnx", paths).report.details["sparsify"]
    assert record.fidelity == record.compensation.fidelity_after
    assert "against the dense original, EoRA paths included (" in _rendered(record)
    plain = OptimizeOptions(sparsity="2:4", calib=str(calib))
    record = optimize(model, tmp_path / "b.onnx", plain).report.details["sparsify"]
    text = _rendered(record)
    assert "sparsity fidelity against the dense original (" in text and "EoRA" not in text
