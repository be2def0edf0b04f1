"""A lossy pass after another reports its fidelity, and checks mixed precision's target,
against the run's original (PassContext.reference_model), not the model it was given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphopt import api, io
from graphopt.api import OptimizeOptions
from graphopt.errors import UserInputError
from graphopt.passes.calibration.fidelity import measure, outputs_on
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.record import worst_cosine, worst_max_rel
from graphopt_tests.passes.quantization.test_static import _data, small_cnn


def _files(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    model = tmp_path / "cnn.onnx"
    io.save(small_cnn(), model)
    data = _data(32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=data)
    return model, calib, data


def _cosines(original: Path, written: Path, data: np.ndarray) -> list[float]:
    """Our own measure: the written model's output against the original's, held-out rows."""
    samples = CalibrationSet({"x": data[-8:]}, "held")
    ref = outputs_on(ir.load(original), samples, optimize=False)
    got = outputs_on(ir.load(written), samples, optimize=False)
    return [f.mean_cosine for f in measure(["y"], ref, got)]


def test_quantize_after_prune_reports_fidelity_against_the_original(tmp_path: Path) -> None:
    """Before, int8 after --prune reported its fidelity against the pruned model it was
    given, under the title "against the float original": the pruning's error was missing.
    Now the quantization record measures the written model against the run's original (as
    our independent measurement does) and its source says which passes it includes."""
    model, calib, data = _files(tmp_path)
    out = tmp_path / "o.onnx"
    options = OptimizeOptions(prune="flops=0.3", quantize="int8", calib=str(calib))
    result = api.optimize(model, out, options)
    record = result.report.details["quantize"]
    assert record.fidelity_source.startswith("includes prune; ")
    held = record.fidelity["held-out"]  # ORT optimizations off: the Q/DQ numerics
    ours = _cosines(model, out, data)
    assert abs(held[0].mean_cosine - ours[0]) < 1e-6
    # Pruning's own error (after its refit) is in the number, not just int8's rounding.
    prune = result.report.details["prune"].fidelity_compensated
    assert worst_cosine(prune) < 0.99
    assert worst_cosine(held) < worst_cosine(prune) + 5e-3
    # The exact passes after it are verified at int8's own error, measured against the
    # pruned model it was given: pruning's error must not loosen their check.
    own = record.own_max_rel
    assert own is not None and record.exact_tolerance_after == own
    assert own < worst_max_rel(record.fidelity["calibration"])


def test_a_single_lossy_pass_keeps_no_reference(tmp_path: Path) -> None:
    """One lossy pass: measured against the model it was given, as before; no clone kept."""
    model, calib, _ = _files(tmp_path)
    options = OptimizeOptions(quantize="int8", calib=str(calib))
    result = api.optimize(model, tmp_path / "o.onnx", options)
    record = result.report.details["quantize"]
    assert not record.fidelity_source.startswith("includes") and record.own_max_rel is None


def test_min_cosine_after_prune_is_checked_end_to_end(tmp_path: Path) -> None:
    """Before, --min-cosine after --prune was checked against the pruned model: "met" while
    the written model against the original was far below it. The target is now measured
    against the original, so "met" means the written model meets it."""
    model, calib, data = _files(tmp_path)
    out = tmp_path / "o.onnx"
    options = OptimizeOptions(prune="flops=0.3", quantize="int8", calib=str(calib), min_cosine=0.95)
    result = api.optimize(model, out, options)
    record = result.report.details["quantize"]
    verdict = next(n for n in record.notes if n.startswith("mixed precision: target"))
    ours = min(_cosines(model, out, data))
    # The last curve point is what was written, the worst of every fidelity row (ours is
    # one of them: held-out, ORT optimizations off).
    assert record.curve[-1].cosine <= ours + 1e-6
    assert " met on " in verdict and ours >= 0.95 and not record.target_missed
    assert any("against the run's original (includes prune)" in n for n in record.notes)


def test_a_target_the_earlier_passes_already_miss_is_refused(tmp_path: Path) -> None:
    """Pruning alone below --min-cosine: mixed precision keeps every layer float, so
    quantize would hand back the pruned model unchanged. Before, that was written (exit 0)
    with the verdict in a note; now it is refused (exit 2), the line saying why."""
    model, calib, _ = _files(tmp_path)
    options = OptimizeOptions(
        prune="flops=0.3", quantize="int8", calib=str(calib), min_cosine=0.9999
    )
    out = tmp_path / "o.onnx"
    with pytest.raises(UserInputError) as caught:
        api.optimize(model, out, options)
    message = str(caught.value)
    assert "NOT met (the earlier lossy passes alone already miss it" in message, message
    assert "would come back unchanged" in message and "\n" not in message
    assert not out.exists()
