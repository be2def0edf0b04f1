"""The pass manager: fixed-point bound, per-pass stats, rollback, subgraph note, crashing passes."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.errors import UserInputError
from graphopt.pipeline import (
    MAX_FIXED_POINT_ITERATIONS,
    PassManager,
    PassSpec,
    Step,
    default_pipeline,
    explicit_pipeline,
)
from graphopt.registry import GraphPass, PassContext, Stage, all_passes
from graphopt.verify import Verifier
from graphopt_tests.helpers import (
    AddToSubPass,
    CrashingPass,
    SilentAddToSubPass,
    make_model,
    op_types,
    register_for_test,
    tensor_info,
)

F = TensorProto.FLOAT


def add_relu_model() -> ir.Model:
    """y = Relu(x + b) with a dead Neg branch."""
    return make_model(
        [
            helper.make_node("Add", ["x", "b"], ["s"]),
            helper.make_node("Relu", ["s"], ["y"]),
            helper.make_node("Neg", ["x"], ["dead"]),
        ],
        [tensor_info("x", F, [2, 3])],
        [tensor_info("y", F, [2, 3])],
        {"b": np.full((2, 3), 0.5, np.float32)},
    )


class AlwaysHitsPass(GraphPass):
    """Test only: claims one hit every time without changing anything."""

    name = "test-always-hits"

    def rewrite(self, model: ir.Model) -> int:
        return 1


class UserErrorPass(GraphPass):
    """Test only: refuses the model as bad input."""

    name = "test-user-error"

    def rewrite(self, model: ir.Model) -> int:
        raise UserInputError("this model is not supported by test-user-error")


class BlasThreadsPass(GraphPass):
    """Test only: records the thread counts of the BLAS libraries loaded while it runs."""

    name = "test-blas-threads"
    seen: ClassVar[list[int]] = []

    def rewrite(self, model: ir.Model) -> int:
        from threadpoolctl import threadpool_info

        blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
        BlasThreadsPass.seen = [i["num_threads"] for i in blas]
        return 0


class NoSubgraphsPass(GraphPass):
    """Test only: does nothing and says it leaves subgraphs alone."""

    name = "test-no-subgraphs"
    handles_subgraphs: ClassVar[bool] = False

    def rewrite(self, model: ir.Model) -> int:
        return 0


@pytest.fixture(autouse=True)
def _fake_passes(monkeypatch) -> None:
    register_for_test(
        monkeypatch,
        AddToSubPass,
        SilentAddToSubPass,
        CrashingPass,
        AlwaysHitsPass,
        UserErrorPass,
        NoSubgraphsPass,
        BlasThreadsPass,
    )


def _steps(*names: str, fixed_point: bool = True) -> list[Step]:
    return [Step(tuple(PassSpec(n) for n in names), fixed_point)]


def test_passes_run_with_single_threaded_blas() -> None:
    """numpy's threaded BLAS rounds sums by thread count: passes see one thread, so the
    output does not depend on the machine's cores; the caller's setting comes back after."""
    from threadpoolctl import threadpool_info

    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    assert before
    PassManager(_steps("test-blas-threads", fixed_point=False)).run(add_relu_model())
    assert BlasThreadsPass.seen == [1] * len(before)
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before


def test_fixed_point_iteration_is_bounded() -> None:
    model = add_relu_model()
    _, report = PassManager(_steps("test-always-hits")).run(model)
    (stats,) = report.stats
    assert stats.runs == MAX_FIXED_POINT_ITERATIONS
    assert stats.hits == MAX_FIXED_POINT_ITERATIONS


def test_fixed_point_stops_when_nothing_changes() -> None:
    _, report = PassManager(_steps("dead-code", "test-add-to-sub")).run(add_relu_model())
    runs = {s.name: s.runs for s in report.stats}
    # Round 1 changes the model, round 2 changes nothing: two rounds.
    assert runs == {"dead-code": 2, "test-add-to-sub": 2}


def test_single_run_step_runs_once() -> None:
    _, report = PassManager(_steps("test-always-hits", fixed_point=False)).run(add_relu_model())
    assert report.stats[0].runs == 1


def test_per_pass_stats() -> None:
    model = add_relu_model()
    model, report = PassManager(_steps("dead-code")).run(model)
    (stats,) = report.stats
    assert stats.name == "dead-code" and stats.exact
    assert stats.hits == 1
    assert stats.nodes_removed == 1
    assert (report.nodes_before, report.nodes_after) == (3, 2)
    assert stats.seconds >= 0 and report.seconds >= stats.seconds
    assert stats.status == "ok"
    assert report.verification is None and report.rolled_back == []


def test_broken_exact_pass_is_rolled_back_and_others_kept() -> None:
    model = add_relu_model()
    verifier = Verifier(model)
    steps = _steps("dead-code", "test-add-to-sub")
    model, report = PassManager(steps, verifier=verifier).run(model)
    assert report.rolled_back == ["test-add-to-sub"]
    stats = {s.name: s for s in report.stats}
    assert stats["test-add-to-sub"].status.startswith("rolled back")
    assert stats["dead-code"].status == "ok" and stats["dead-code"].hits == 1
    assert report.verification is not None and report.verification.ok
    assert op_types(model) == ["Add", "Relu"]
    assert any("replayed" in note for note in report.notes)


def test_silent_breaking_pass_fails_verification() -> None:
    """A pass that edits without reporting hits cannot be located; the run reports failure."""
    model = add_relu_model()
    verifier = Verifier(model)
    _, report = PassManager(_steps("test-silent-add-to-sub"), verifier=verifier).run(model)
    assert report.verification is not None and not report.verification.ok
    assert report.rolled_back == []


def test_crashing_pass_is_rolled_back_when_verifying() -> None:
    model = add_relu_model()
    verifier = Verifier(model)
    steps = _steps("test-crash", "dead-code")
    model, report = PassManager(steps, verifier=verifier).run(model)
    stats = {s.name: s for s in report.stats}
    assert report.rolled_back == ["test-crash"]
    assert stats["test-crash"].status == "rolled back (error)"
    assert stats["dead-code"].hits == 1
    # The half-edit the crashing pass made before raising is undone.
    assert op_types(model) == ["Add", "Relu"]
    assert report.verification.ok
    assert any("a pass crashed" in note for note in report.notes)


def test_crashing_pass_is_rolled_back_without_verifier() -> None:
    """--no-verify still survives a crashing pass: the replay snapshots every exact pass."""
    steps = _steps("test-crash", "dead-code")
    model, report = PassManager(steps).run(add_relu_model())
    assert report.rolled_back == ["test-crash"]
    assert {s.name: s.hits for s in report.stats}["dead-code"] == 1
    assert op_types(model) == ["Add", "Relu"]
    assert report.verification is None


def test_user_input_error_from_a_pass_propagates_even_when_verifying() -> None:
    model = add_relu_model()
    with pytest.raises(UserInputError, match="not supported"):
        PassManager(_steps("test-user-error"), verifier=Verifier(model)).run(model)


def _if_model() -> ir.Model:
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])], "then", [], [tensor_info("t", F, [2])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor_info("e", F, [2])]
    )
    return make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        [tensor_info("x", F, [2]), tensor_info("c", TensorProto.BOOL, [])],
        [tensor_info("y", F, [2])],
    )


def test_subgraph_note_names_passes_that_leave_bodies_alone() -> None:
    _, report = PassManager(_steps("test-no-subgraphs", "dead-code")).run(_if_model())
    (note,) = report.notes
    assert "subgraphs" in note and "test-no-subgraphs" in note and "dead-code" not in note
    _, report = PassManager(_steps("test-no-subgraphs")).run(add_relu_model())
    assert report.notes == []


def test_subgraph_note_leaves_out_passes_of_another_target() -> None:
    """A portable run listed the nine ort-* passes, which never run in it."""
    ort_only = sorted(
        name
        for name, cls in all_passes().items()
        if cls.targets == frozenset({"ort"}) and not cls.handles_subgraphs
    )
    assert ort_only
    steps = _steps(*ort_only)
    _, report = PassManager(steps, PassContext(target="portable")).run(_if_model())
    assert report.notes == []
    _, report = PassManager(steps, PassContext(target="ort")).run(_if_model())
    (note,) = report.notes
    assert all(name in note for name in ort_only)


def test_rollback_restores_subgraph_bodies() -> None:
    branch = [
        helper.make_graph(
            [helper.make_node("Add", ["x", "x"], [name])], name, [], [tensor_info(name, F, [2])]
        )
        for name in ("t", "e")
    ]
    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch[0], else_branch=branch[1])],
        [tensor_info("x", F, [2]), tensor_info("c", TensorProto.BOOL, [])],
        [tensor_info("y", F, [2])],
    )
    model, report = PassManager(_steps("test-add-to-sub"), verifier=Verifier(model)).run(model)
    assert report.rolled_back == ["test-add-to-sub"] and report.verification.ok
    assert sorted(op_types(model)) == ["Add", "Add", "If"]


def test_default_pipeline_order_and_skip() -> None:
    registry = all_passes()
    steps = default_pipeline(skip=["dead-code"])
    assert "dead-code" not in [spec.name for step in steps for spec in step.passes]
    step_stages = []
    for step in steps:
        stages = {registry[spec.name].stage for spec in step.passes}
        assert len(stages) == 1, "a step mixes stages"
        step_stages.append((stages.pop(), step.fixed_point))
    present = {cls.stage for cls in registry.values()}
    expected = [
        (stage, fixed)
        for stage, fixed in (
            (Stage.PREPARE, False),
            (Stage.CLEANUP, True),
            (Stage.FUSION, False),
            (Stage.CLEANUP, True),
        )
        if stage in present
    ]
    assert step_stages == expected
    with pytest.raises(UserInputError, match="unknown pass"):
        default_pipeline(skip=["no-such-pass"])
    with pytest.raises(UserInputError, match="already runs by default"):
        default_pipeline(lossy=[PassSpec("dead-code")])


def test_explicit_pipeline_groups_exact_runs() -> None:
    steps = explicit_pipeline([PassSpec("dead-code"), PassSpec("test-add-to-sub")])
    assert steps == [Step((PassSpec("dead-code"), PassSpec("test-add-to-sub")), True)]
    with pytest.raises(UserInputError):
        explicit_pipeline([PassSpec("nope")])


def test_context_reaches_passes() -> None:
    seen: list[PassContext] = []

    class Spy(GraphPass):
        """Test only: records its context."""

        name = "test-spy"

        def rewrite(self, model: ir.Model) -> int:
            seen.append(self.context)
            return 0

    from graphopt import registry

    registry._REGISTRY["test-spy"] = Spy
    try:
        context = PassContext(fold_limit_bytes=123, input_shapes={"x": (2, 3)})
        PassManager(_steps("test-spy"), context).run(add_relu_model())
    finally:
        del registry._REGISTRY["test-spy"]
    assert seen and seen[0] is context and seen[0].fold_limit_bytes == 123


class ScaleOutputPass(GraphPass):
    """Test only: a lossy pass that doubles the bias (moves outputs, as lossy passes do)."""

    name = "test-lossy-scale"
    exact = False
    stage = Stage.PRUNE

    def rewrite(self, model: ir.Model) -> int:
        value = model.graph.initializers["b"]
        value.const_value = ir.Tensor(value.const_value.numpy() * 2 + 1, name="b")
        return 1


def test_exact_passes_after_a_lossy_pass_are_verified_against_its_result(monkeypatch) -> None:
    register_for_test(monkeypatch, ScaleOutputPass)
    model = add_relu_model()
    bias = model.graph.initializers["b"].const_value.numpy().copy()
    verifier = Verifier(model)
    steps = explicit_pipeline(
        [PassSpec("dead-code"), PassSpec("test-lossy-scale"), PassSpec("test-add-to-sub")]
    )
    model, report = PassManager(steps, verifier=verifier).run(model)
    # The lossy change is measured against the original, not rolled back...
    assert report.lossy_check is not None and report.lossy_check.worst_rel > 0
    assert np.array_equal(model.graph.initializers["b"].const_value.numpy(), bias * 2 + 1)
    # ...and the broken exact pass after it is caught against the lossy result and undone.
    assert report.rolled_back == ["test-add-to-sub"]
    assert report.verification is not None and report.verification.ok
    assert op_types(model) == ["Add", "Relu"]


class RoundingLossyPass(ScaleOutputPass):
    """Test only: a lossy pass whose result, its record says, rounds at run time."""

    name = "test-lossy-rounding"

    def rewrite(self, model: ir.Model) -> int:
        hits = super().rewrite(model)
        record = type("Record", (), {"exact_tolerance_after": 0.5, "summary": ""})()
        self.context.details[self.name] = record
        return hits


class NudgePass(GraphPass):
    """Test only: an "exact" pass that moves the bias by 1% (as a rounding flip would)."""

    name = "test-nudge"

    def rewrite(self, model: ir.Model) -> int:
        value = model.graph.initializers["b"]
        value.const_value = ir.Tensor(value.const_value.numpy() * 1.01, name="b")
        return 1


@pytest.mark.parametrize("lossy", ["test-lossy-scale", "test-lossy-rounding"])
def test_exact_passes_after_run_time_rounding_are_verified_at_its_tolerance(
    monkeypatch, lossy: str
) -> None:
    register_for_test(monkeypatch, ScaleOutputPass, RoundingLossyPass, NudgePass)
    model = add_relu_model()
    steps = explicit_pipeline([PassSpec(lossy), PassSpec("test-nudge")])
    context = PassContext()
    model, report = PassManager(steps, context, verifier=Verifier(model)).run(model)
    if lossy == "test-lossy-rounding":
        # The record's floor (0.5) covers a 1% move: kept, and the report says why.
        assert report.rolled_back == []
        assert any("verified at tolerance 0.5" in note for note in report.notes)
    else:
        assert report.rolled_back == ["test-nudge"]


class _RecordingAddToSubPass(AddToSubPass):
    """Test only: notes and records in the metadata what it did, then breaks the model."""

    name = "test-recording-add-to-sub"

    def rewrite(self, model: ir.Model) -> int:
        self.context.note("test: rewrote every Add")
        model.metadata_props["test.decisions"] = "every Add rewritten"
        return super().rewrite(model)


@pytest.mark.parametrize("check_each", [False, True], ids=["replayed", "checked"])
def test_a_rolled_back_pass_leaves_no_note_or_metadata(monkeypatch, check_each) -> None:
    # The sparse kernels' decisions stayed in the metadata ("lowered") and the note said
    # "lowered 2 of 2" after verification rolled the lowering back: a replay of the record
    # then lowered what the written model does not have.
    register_for_test(monkeypatch, _RecordingAddToSubPass)
    model = add_relu_model()
    manager = PassManager(_steps("test-recording-add-to-sub"), verifier=Verifier(model))
    if check_each:
        out, report = model.clone(), None
        rolled = manager._run_steps(out, manager.steps, check_each=True, verifier=Verifier(model))
        notes = manager.context.notes
    else:
        out, report = manager.run(model.clone())
        rolled, notes = report.rolled_back, report.notes
    assert rolled == ["test-recording-add-to-sub"]
    assert "test.decisions" not in out.metadata_props
    assert "test: rewrote every Add" not in notes
