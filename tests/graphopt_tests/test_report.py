"""The printed run report: what it lists, what it says once, and how it words changes."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from rich.console import Console

from graphopt.api import OptimizeOptions, optimize
from graphopt.output_errors import OutputError
from graphopt.passes.calibration.fidelity import Fidelity, measure
from graphopt.passes.pruning.pruner import PruneReport
from graphopt.pipeline import PassManager, PassSpec, PassStats, RunReport, explicit_pipeline
from graphopt.registry import GraphPass, Stage
from graphopt.report import print_report, signed_percent
from graphopt.verify import Verifier, VerifyResult
from graphopt_tests.helpers import (
    AddToSubPass,
    SilentAddToSubPass,
    make_model,
    register_for_test,
    tensor_info,
)
from graphopt_tests.passes.pruning.graphs import mlp


def rendered(report: RunReport, verbose: bool = False) -> str:
    console = Console(file=io.StringIO(), width=200, highlight=False)
    print_report(report, console, verbose=verbose)
    return console.file.getvalue()


def _report(stats: list[PassStats], **fields) -> RunReport:
    result = VerifyResult(True, [OutputError("y", 0.0, 0.0, 1.0, 0.0)], shapes=["x 1x4"])
    return RunReport(stats, 10, 8, 0.5, verification=result, **fields)


STATS = [
    PassStats("dead-code", True, runs=3, hits=2, nodes_removed=2),
    PassStats("cse", True, runs=3),  # ran, changed nothing
    PassStats("dropout", True),  # skipped: no Dropout in the model
    PassStats("ort-gelu", True),  # skipped: another --target's pass
    PassStats("fuse-gelu", True, runs=1, status="rolled back: output 'y' off by 0.3 (rel)"),
]


def test_default_table_lists_only_what_changed_and_counts_the_rest() -> None:
    text = rendered(_report(STATS))
    assert "dead-code" in text and "fuse-gelu" in text  # changed; rolled back
    for idle in ("cse", "dropout", "ort-gelu"):
        assert idle not in text
    assert "3 more passes: 1 ran without a change, 2 skipped" in text
    assert "--verbose lists every pass" in text


def test_verbose_table_lists_every_pass() -> None:
    text = rendered(_report(STATS), verbose=True)
    for stats in STATS:
        assert stats.name in text
    assert "more passes" not in text


def test_a_run_that_changed_nothing_says_so_instead_of_an_empty_table() -> None:
    text = rendered(_report([PassStats("cse", True, runs=2), PassStats("dropout", True)]))
    assert "no pass changed the model" in text
    assert "2 more passes: 1 ran without a change, 1 skipped" in text


def test_a_lossy_pass_that_was_asked_for_is_listed_even_without_hits() -> None:
    text = rendered(_report([PassStats("prune", False, runs=1)]))
    assert "prune" in text and "lossy" in text


@pytest.mark.parametrize(
    ("change", "text"),
    [(2.967, "+296.7%"), (-0.25, "-25.0%"), (0.0, "0.0%"), (-0.0004, "0.0%"), (0.5, "+50.0%")],
)
def test_signed_percent_has_exactly_one_sign(change: float, text: str) -> None:
    assert signed_percent(change) == text


def test_pruning_that_grew_a_count_reads_plus_not_double_minus() -> None:
    # "FLOPs -{removed}%" with removed = 1 - after/before < 0 printed "FLOPs --296.7%".
    prune = PruneReport("flops=0.3", "l2", "uniform", "none", "none")
    prune.flops_before, prune.flops_after = 1000, 3967
    prune.params_before, prune.params_after = 400, 300
    prune.units_removed, prune.groups_pruned, prune.groups_prunable = 8, 1, 2
    prune.summary = "prune: 8 units from 1/2 groups; FLOPs +296.7%, params -25.0%"
    prune.fidelity_pruned, prune.heldout_samples = [Fidelity("y", 0.1, 0.01, 0.99)], 4
    text = rendered(_report([PassStats("prune", False, runs=1, hits=8)], details={"prune": prune}))
    assert "FLOPs +296.7%, params -25.0%" in text
    assert "--" not in text.replace("--verbose", "")


@pytest.fixture(scope="module")
def pruned_report() -> RunReport:
    # The FFN's hidden layer of 64 is aligned to 16 channels by default: flops=0.3 overshoots.
    # Generated calibration data gives the held-out fidelity table too.
    options = OptimizeOptions(prune="flops=0.3", calib="random")
    return optimize(mlp(), options=options).report


def test_lossy_run_names_the_exact_verification_and_the_lossy_change_once_each(
    pruned_report: RunReport,
) -> None:
    text = " ".join(rendered(pruned_report).split())  # rich wraps long lines
    # No "verification passed: worst relative error 0" above a cosine of 0.89.
    assert "verification passed" not in text and "worst relative error" not in text
    assert text.count("exact passes: verified against the original (worst rel error") == 1
    assert text.count("and against the result of prune (worst rel error") == 1
    cosine = pruned_report.lossy_check.outputs[0].cosine
    assert cosine < 0.99
    assert text.count("lossy change vs the original") == 1
    assert f"cosine {cosine:.6f}, max rel error" in text
    assert text.count("checked at 2 input shapes") == 1


def test_exact_checks_keep_each_reference(pruned_report: RunReport) -> None:
    checks = pruned_report.exact_checks
    assert [c.reference for c in checks] == ["the original", "the result of prune"]
    assert all(c.result.ok for c in checks) and pruned_report.verification.ok


def test_pruning_summary_is_printed_once(pruned_report: RunReport) -> None:
    text = " ".join(rendered(pruned_report).split())
    prune = pruned_report.details["prune"]
    # Still a note for API users; printed once, from the record, above the fidelity table.
    assert any(" units from 1/1 groups" in note for note in pruned_report.notes)
    assert text.count("FLOPs -49.8%") == 1 and text.count("units from 1/1 groups") == 1
    assert "pruning flops=0.3: 32 units from 1/1 groups; FLOPs -49.8%" in text
    # The held-out fidelity is the table's, not repeated in words ("held-out (6): cosine …").
    assert prune.heldout_samples and "held-out (" not in text


def test_overshoot_is_said_with_its_cause(pruned_report: RunReport) -> None:
    prune = pruned_report.details["prune"]
    assert prune.flops_removed > 0.4  # 32 of 64 hidden units, where 0.3 was asked
    (note,) = [n for n in pruned_report.notes if "overshot" in n]
    assert f"flops {signed_percent(-prune.flops_removed)} where -30.0% was asked" in note
    assert "multiples of 16" in note and "--round-to 1" in note


def test_fidelity_of_non_finite_outputs_is_finite_and_silent() -> None:
    # Log of a Relu output: -inf in both models where the unit is off.
    ref = np.array([[0.5, -np.inf, 1.0], [2.0, 1.0, -np.inf]], np.float32)
    same_inf = np.array([[0.4, -np.inf, 1.0], [2.0, 1.5, -np.inf]], np.float32)
    other_inf = np.array([[0.5, -np.inf, 1.0], [2.0, -np.inf, -np.inf]], np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (same,) = measure(["y"], [ref], [same_inf])
        (other,) = measure(["y"], [ref], [other_inf])
    assert [str(w.message) for w in caught] == []
    assert same.max_rel == pytest.approx(0.25) and same.mean_abs == pytest.approx(0.1)
    assert 0.9 < same.mean_cosine <= 1.0
    # A differing infinity is an infinite error and no direction for that sample.
    assert other.max_rel == np.inf and other.mean_cosine == pytest.approx(0.5)


class _NoopLossyPass(GraphPass):
    """Test only: a lossy pass that changes nothing."""

    name = "test-noop-lossy"
    exact = False
    stage = Stage.PRUNE

    def rewrite(self, model: ir.Model) -> int:
        return 0


def test_a_failed_check_before_a_lossy_pass_is_not_overwritten(monkeypatch) -> None:
    # A lying pass (no hits, so no replay can roll it back) breaks the outputs before the
    # lossy pass; the exact passes after it verify fine against the broken model.
    register_for_test(monkeypatch, SilentAddToSubPass, _NoopLossyPass)
    model = make_model(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        [tensor_info("x", TensorProto.FLOAT, [2, 4])],
        [tensor_info("y", TensorProto.FLOAT, [2, 4])],
        {"b": np.ones(4, np.float32)},
    )
    steps = explicit_pipeline(
        [PassSpec("test-silent-add-to-sub"), PassSpec("test-noop-lossy"), PassSpec("dead-code")]
    )
    _, report = PassManager(steps, verifier=Verifier(model)).run(model.clone())
    # Before: `verification` was the last segment's alone, "passed", and no error was raised.
    assert not report.verification.ok
    first, after = report.exact_checks
    assert not first.result.ok and after.result.ok
    assert report.verification.reason == first.result.reason


def _bf16_mlp() -> ir.Model:
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "wa"], ["a"]),
            helper.make_node("Add", ["a", "b"], ["s"]),
            helper.make_node("Relu", ["s"], ["r"]),
            helper.make_node("MatMul", ["r", "wb"], ["y"]),
        ],
        [tensor_info("x", TensorProto.FLOAT, ["n", 16])],
        [tensor_info("y", TensorProto.FLOAT, ["n", 16])],
        {
            "wa": rng.standard_normal((16, 16)).astype(np.float32),
            "b": rng.standard_normal(16).astype(np.float32),
            "wb": rng.standard_normal((16, 16)).astype(np.float32),
        },
    )


def test_a_lossy_change_ort_cannot_run_is_not_reported_as_verified_exact() -> None:
    # bf16: ORT's CPU has no bf16 MatMul, the pass measures its fidelity on a simulation.
    # The final verdict was the pre-quantize check, "original vs optimized: error 0,
    # verification passed", for outputs that moved by 3e-3.
    model = _bf16_mlp()
    steps = explicit_pipeline([PassSpec("quantize", {"mode": "bf16"}), PassSpec("dead-code")])
    _, report = PassManager(steps, verifier=Verifier(model)).run(model.clone())
    assert report.lossy_unrunnable == "quantize" and report.lossy_check is None
    assert report.verified and not report.unverified_after  # no exact change after it
    text = rendered(report)
    assert "verification passed" not in text and "original vs optimized" not in text
    assert "lossy change vs the original (quantize): not run in ONNX Runtime" in text


def test_exact_changes_after_a_lossy_change_ort_cannot_run_are_not_verified(monkeypatch):
    # Nothing runnable to compare against: a corrupting "exact" pass after bf16 went
    # unchecked, and the run said "verification passed".
    register_for_test(monkeypatch, AddToSubPass)
    model = _bf16_mlp()
    steps = explicit_pipeline([PassSpec("quantize", {"mode": "bf16"}), PassSpec("test-add-to-sub")])
    _, report = PassManager(steps, verifier=Verifier(model)).run(model.clone())
    assert not report.verified
    assert report.unverified_after.startswith("exact passes changed the model after quantize")
    assert "not verified: exact passes changed the model after quantize" in rendered(report)


def test_the_verdict_states_a_tolerance_other_than_the_default() -> None:
    result = VerifyResult(
        True,
        [OutputError("y", 0.0, 0.02, 1.0, 0.0)],
        shapes=["x 1x4"],
        tolerance_text="at tolerance 0.0625 (bfloat16 in its computation)",
    )
    text = rendered(RunReport(STATS, 10, 8, 0.5, verification=result))
    assert (
        "verification passed at tolerance 0.0625 (bfloat16 in its computation): worst relative "
        "error 0.02" in text
    )
    assert "verification passed: worst relative error 0" in rendered(_report(STATS))


def test_an_output_not_compared_reads_so_not_as_zeros() -> None:
    result = VerifyResult(
        True,
        [OutputError("y", 0.0, 0.0, 1.0, 0.0, not_compared="empty at every shape")],
        shapes=["x 1x4"],
    )
    text = rendered(RunReport(STATS, 10, 8, 0.5, verification=result))
    assert "not compared (empty at every shape)" in text and "1.000000" not in text
