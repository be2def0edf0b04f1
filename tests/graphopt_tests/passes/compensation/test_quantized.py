"""EoRA after quantize (graphopt/passes/compensation/quantized.py): the table's sample count,
and paths that do not lower the held-out error taken out again."""

from __future__ import annotations

import numpy as np
import onnx

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.passes.calibration.fidelity import FIDELITY_SAMPLES
from graphopt_tests.passes.pruning.graphs import correlated, mlp


def _files(tmp_path, samples: int):
    path, calib = tmp_path / "model.onnx", tmp_path / "calib.npz"
    io.save(mlp(hidden=64, width=16), path)
    np.savez(calib, x=correlated(np.random.default_rng(0), (samples, 4, 16)))
    return path, calib


def test_the_fidelity_title_counts_the_samples_measured(tmp_path):
    """Before: the title named every fitting sample (96) while EoRA's rows, which replace
    the mode's, were measured on the first FIDELITY_SAMPLES of them."""
    model, calib = _files(tmp_path, 128)
    options = OptimizeOptions(
        quantize="int4-weight", target="ort", calib=str(calib), compensation="eora:4",
        block_size=16,
    )  # fmt: skip
    record = optimize(model, tmp_path / "o.onnx", options).report.details["quantize"]
    assert not record.compensation.dropped and record.fidelity == record.compensation.fidelity_after
    assert record.fidelity_source.startswith(
        f"{FIDELITY_SAMPLES} calibration samples and 32 held-out samples"
    )


def test_paths_that_do_not_lower_the_held_out_error_are_dropped(tmp_path):
    """Before: int8's paths stayed (+32% FLOPs) though the held-out error rose with them;
    pruning's EoRA already dropped such paths."""
    model, calib = _files(tmp_path, 48)
    common = {"quantize": "int8", "calib": str(calib)}
    plain = optimize(model, tmp_path / "plain.onnx", OptimizeOptions(**common))
    result = optimize(
        model, tmp_path / "eora.onnx", OptimizeOptions(**common, compensation="eora:4")
    )
    record = result.report.details["quantize"]
    comp = record.compensation
    assert comp.dropped.startswith("held-out error not reduced: mean abs ")
    assert len(comp.layers) == 2 and comp.params == 0
    assert "fitted and dropped" in comp.headline() and "+0 FLOPs" in comp.headline()
    assert comp.to_json()["dropped"] == comp.dropped
    # The mode's own fidelity stands, and the model is the one without paths.
    assert record.fidelity == plain.report.details["quantize"].fidelity
    saved, without = onnx.load(str(tmp_path / "eora.onnx")), onnx.load(str(tmp_path / "plain.onnx"))
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in without.graph.node]
    assert sorted(t.name for t in saved.graph.initializer) == sorted(
        t.name for t in without.graph.initializer
    )
    assert not [t for t in saved.graph.initializer if t.name.startswith("eora")]
