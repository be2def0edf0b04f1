"""The coverage checks of bench/prune_coverage.py on light catalog models (flops=0.3).

Valid model, runs in ORT, FLOPs -25% or more (l2 and activation+lsq), zero-invariance
check within 1e-6, and least-squares compensation closer to the original than none.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[4] / "bench" / "prune_coverage.py"


def _bench():
    name = "graphopt_bench_prune_coverage"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _check(name: str, tmp_path: Path):
    import graphopt.models as models

    missing = models.missing_requirements(name)
    if missing:
        pytest.skip(f"{name} needs {missing}")
    row = _bench().check_model(name, tmp_path)
    assert not row.skipped, row.skipped
    return row


def _assert_covered(row) -> None:
    bench = _bench()
    assert set(row.runs) == set(bench.RUNS)
    for label, run in row.runs.items():
        assert run.valid and run.runs, (label, run.errors)
        assert run.flops_removed >= bench.MIN_REMOVED, (label, run.flops_removed)
    assert row.zig_groups > 0
    assert row.zig_ok and row.zig_rel <= bench.TOLERANCE, (row.zig_rel, row.errors)
    compensated = row.runs["act+lsq"]
    assert compensated.closer, compensated.errors
    assert compensated.abs_compensated < compensated.abs_pruned
    assert row.ok, row.errors


@pytest.mark.slow
# mobilenet_v3_small: random weights, logits ~1e-10, generated inputs; compensation must still
# help (it did not while layers that read each other were fitted in one stage).
@pytest.mark.parametrize("name", ["bert_tiny", "resnet18", "mobilenet_v3_small"])
def test_catalog_model_prunable_end_to_end(name: str, tmp_path: Path) -> None:
    _assert_covered(_check(name, tmp_path))


def test_table_marks_failures_with_their_reason() -> None:
    bench = _bench()
    good = bench.RunResult(True, True, 0.3, None)
    lsq = bench.RunResult(True, True, 0.3, False, errors=["compensation did not help on 'y'"])
    row = bench.Row("m", "torchvision", runs={"l2": good, "act+lsq": lsq}, zig_ok=True)
    skipped = bench.Row("big", "torchvision", skipped="heavy")
    assert not row.ok
    table = bench.render([row, skipped], "cmd")
    assert "compensation did not help" in table and "skipped: heavy" in table
    assert "0 of 1 torchvision models" in table  # a skipped model is counted apart
    assert bench.Row.from_json(row.to_json()).runs["act+lsq"].errors == lsq.errors


def test_compensation_judged_closer_only_when_pruning_moved_an_output() -> None:
    """Check (e) on one output: lower mean |error| and cosine not lower; where pruning left
    the output exactly unchanged (a zero-initialised head), it must stay unchanged."""
    from graphopt.passes.calibration.fidelity import Fidelity
    from graphopt.passes.pruning.pruner import PruneReport

    bench = _bench()

    def judged(before: Fidelity, after: Fidelity):
        report = PruneReport("flops=0.3", "activation", "uniform", "lsq", "random")
        report.fidelity_pruned, report.fidelity_compensated = [before], [after]
        result = bench.RunResult(True, True, 0.3)
        bench._judge_compensation(result, report)
        return result

    moved = Fidelity("y", 0.2, 0.1, 0.90)
    assert judged(moved, Fidelity("y", 0.1, 0.05, 0.95)).closer
    assert not judged(moved, Fidelity("y", 0.1, 0.05, 0.85)).closer
    exact = Fidelity("y", 0.0, 0.0, 1.0)
    kept = judged(exact, exact)
    assert kept.closer and kept.note and not kept.errors
    spoiled = judged(exact, Fidelity("y", 0.1, 0.01, 0.99))
    assert not spoiled.closer and spoiled.errors
    assert (
        bench.Row.from_json(bench.Row("m", "torchvision", runs={"act+lsq": kept}).to_json())
        .runs["act+lsq"]
        .note
        == kept.note
    )
