"""Pruning defaults: data-aware with a calibration file, data-free without one.

A choice the user leaves unset (CLI flag, API field, recipe key) takes the defaults that fit
the calibration data; a choice the user sets is kept, even when it equals a data-free
default; the report says which settings ran and which of them were defaults.
"""

from __future__ import annotations

import numpy as np
import pytest

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt.passes.pruning.settings import (
    DATA_AWARE_DEFAULTS,
    DATA_FREE_DEFAULTS,
    resolve_choices,
)
from graphopt.recipe import recipe_from_dict
from graphopt_tests.passes.pruning.graphs import correlated, mlp, write_npz

CHOICES = ("criterion", "compensation", "allocation")


@pytest.fixture
def calib(tmp_path) -> str:
    samples = correlated(np.random.default_rng(0), (32, 4, 16))
    return write_npz(tmp_path / "calib.npz", {"x": samples})


def _chosen(record) -> dict[str, str]:
    return {name: getattr(record, name) for name in CHOICES}


def _prune_note(notes: list[str]) -> str:
    (line,) = [n for n in notes if n.startswith("prune: criterion")]
    return line


def test_the_defaults_are_the_measured_ones():
    """The choice made from BENCHMARKS.md "Pruning defaults": change both together."""
    measured_best = {"criterion": "reconstruction", "compensation": "lsq", "allocation": "global"}
    assert measured_best == DATA_AWARE_DEFAULTS
    # Today's data-free behaviour, unchanged for --calib random and no calibration.
    today = {"criterion": "l2", "compensation": "none", "allocation": "uniform"}
    assert today == DATA_FREE_DEFAULTS


@pytest.mark.parametrize(
    ("calib_value", "expected"),
    [("data.npz", DATA_AWARE_DEFAULTS), ("random", DATA_FREE_DEFAULTS), (None, DATA_FREE_DEFAULTS)],
)
def test_unset_choices_resolve_by_calibration(calib_value, expected):
    choices = resolve_choices(None, None, None, calib_value)
    assert {name: getattr(choices, name) for name in CHOICES} == expected
    assert choices.defaulted == CHOICES
    assert choices.data_aware == (calib_value == "data.npz")


def test_set_choices_are_kept_even_when_equal_to_a_data_free_default():
    choices = resolve_choices("l2", None, "uniform", "data.npz")
    assert (choices.criterion, choices.allocation) == ("l2", "uniform")
    assert choices.compensation == DATA_AWARE_DEFAULTS["compensation"]
    assert choices.defaulted == ("compensation",)


def test_api_with_a_calibration_file_takes_the_data_aware_defaults(calib):
    result = optimize(mlp(), options=OptimizeOptions(prune="flops=0.3", calib=calib))
    record = result.report.details["prune"]
    assert _chosen(record) == DATA_AWARE_DEFAULTS
    assert record.defaults == list(CHOICES)
    note = _prune_note(result.report.notes)
    assert "(default)" in note and "defaults with a calibration file" in note


def test_api_choice_set_to_l2_stays_l2_with_a_calibration_file(calib):
    options = OptimizeOptions(prune="flops=0.3", calib=calib, criterion="l2")
    record = optimize(mlp(), options=options).report.details["prune"]
    assert record.criterion == "l2"
    assert record.compensation == DATA_AWARE_DEFAULTS["compensation"]
    assert record.allocation == DATA_AWARE_DEFAULTS["allocation"]
    assert record.defaults == ["compensation", "allocation"]


@pytest.mark.parametrize("calib_value", ["random", None])
def test_without_a_calibration_file_the_defaults_stay_data_free(calib_value):
    options = OptimizeOptions(prune="flops=0.3", calib=calib_value)
    result = optimize(mlp(), options=options)
    record = result.report.details["prune"]
    assert _chosen(record) == DATA_FREE_DEFAULTS
    assert record.defaults == list(CHOICES)
    assert "data-free defaults" in _prune_note(result.report.notes)


def test_cli_as_typed_uses_and_reports_the_data_aware_defaults(tmp_path, calib, capsys):
    model = tmp_path / "mlp.onnx"
    io.save(mlp(), model)
    out = tmp_path / "pruned.onnx"
    code = main(["optimize", str(model), "-o", str(out), "--prune", "flops=0.3", "--calib", calib])
    text = " ".join(capsys.readouterr().out.split())  # the report wraps long notes
    assert code == 0 and out.is_file()
    said = ", ".join(f"{k} {v} (default)" for k, v in DATA_AWARE_DEFAULTS.items())
    assert f"prune: {said}; defaults with a calibration file" in text


def test_cli_flag_set_explicitly_is_not_called_a_default(tmp_path, calib, capsys):
    model = tmp_path / "mlp.onnx"
    io.save(mlp(), model)
    code = main(
        ["optimize", str(model), "-o", str(tmp_path / "p.onnx"), "--prune", "flops=0.3",
         "--calib", calib, "--compensation", "none"]
    )  # fmt: skip
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert "compensation none," in text and "compensation none (default)" not in text
    assert f"criterion {DATA_AWARE_DEFAULTS['criterion']} (default)" in text


def test_recipe_without_choices_takes_the_data_aware_defaults(calib):
    options = recipe_from_dict(
        {"lossy": [{"name": "prune", "options": {"flops": 0.3, "calib": calib}}]}
    )
    record = optimize(mlp(), options=options).report.details["prune"]
    assert _chosen(record) == DATA_AWARE_DEFAULTS
    assert record.defaults == list(CHOICES)


def test_recipe_choice_keeps_its_value(calib):
    options = recipe_from_dict(
        {"lossy": [{"name": "prune", "options": {"flops": 0.3, "calib": calib, "criterion": "l2"}}]}
    )
    record = optimize(mlp(), options=options).report.details["prune"]
    assert record.criterion == "l2" and record.compensation == DATA_AWARE_DEFAULTS["compensation"]
