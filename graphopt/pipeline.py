"""Pipelines of passes and the pass manager that runs, times, verifies and rolls them back.

A pipeline is a list of steps; a step is a list of passes run in order, either once or
repeated until no pass changes the model (bounded). The default pipeline is every exact
pass: prepare once, cleanup to a fixed point, fusions, cleanup again. Lossy passes, when
asked for, run in the fixed order prune → factorize → sparsify → quantize, with the exact
passes before and after.

Verification (on by default) compares the final model with the original in ONNX Runtime.
When it fails, the run is replayed from the original with a check after every exact pass
that changed the model; a pass whose result fails is rolled back and reported, and the run
goes on without it. Every check, the final one and each one in the replay, runs all of the
verifier's input sets: two shapes when the model has symbolic dims, so that a pass that
baked one value of a dim (e.g. N = 1 from a stale value_info) fails and is rolled back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from graphopt.analysis.origins import snapshot
from graphopt.analysis.stats import count_nodes, has_subgraphs
from graphopt.blas_threads import single_threaded_blas
from graphopt.errors import CheckFailedError, UserInputError, is_out_of_memory
from graphopt.fingerprint import Fingerprint, fingerprint
from graphopt.output_errors import OutputError
from graphopt.refusals import refuse_nothing_to_do
from graphopt.registry import (
    LOSSY_STAGES,
    PassContext,
    Stage,
    all_passes,
    get_pass,
)
from graphopt.verify import VerificationUnavailable, Verifier, VerifyResult

logger = logging.getLogger(__name__)

MAX_FIXED_POINT_ITERATIONS = 10


@dataclass(frozen=True)
class PassSpec:
    """A pass by name, with its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """Passes run in order; repeated to a fixed point when ``fixed_point`` is set."""

    passes: tuple[PassSpec, ...]
    fixed_point: bool = False


@dataclass
class PassStats:
    """One row of the per-pass table (summed over all runs of the pass)."""

    name: str
    exact: bool
    runs: int = 0
    hits: int = 0
    seconds: float = 0.0
    # Nodes this pass itself removed (negative: added), summed over its runs. Per-pass
    # before/after counts would span other passes inside a fixed-point loop.
    nodes_removed: int = 0
    status: str = "ok"


@dataclass(frozen=True)
class ExactCheck:
    """The verification of one run of consecutive exact passes."""

    reference: str
    result: VerifyResult


@dataclass
class RunReport:
    """What a pipeline run did."""

    stats: list[PassStats]
    nodes_before: int
    nodes_after: int
    seconds: float
    verification: VerifyResult | None = None
    verification_skipped: str = ""
    rolled_back: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # Lossy runs: the final model against the original (informational: lossy passes are
    # expected to move outputs; ``verification`` covers the exact passes around them).
    lossy_check: VerifyResult | None = None
    # Every check of exact passes, in order, with the reference it compared against: "the
    # original", or after lossy passes "the result of prune". ``verification`` is all of
    # them in one (failed if any failed, the worst error of each output).
    exact_checks: list[ExactCheck] = field(default_factory=list)
    # The lossy passes whose result ONNX Runtime's CPU provider cannot run (bf16). Their
    # change was measured by the pass on a simulation, not by ORT (no ``lossy_check``).
    lossy_unrunnable: str = ""
    # Exact passes that changed the model after such a pass, unverified: they had no
    # runnable reference ("" when none changed it).
    unverified_after: str = ""
    # What the lossy change is measured against: the run's input ("the original"), or, when
    # an earlier run already made it lossy (its metadata says so), which passes it went
    # through (api._name_lossy_input).
    reference_name: str = "the original"

    @property
    def targets_missed(self) -> list[str]:
        """One line per target a lossy pass was asked to meet and missed (its record's
        ``target_missed``): quantize's --min-cosine/--max-error/--min-agreement, and the size
        targets of prune, decompose, factorize and erase-blocks (:mod:`graphopt.size_targets`).
        The output is written (the report describes it); the CLI exits 1 after the report."""
        return [
            missed
            for record in self.details.values()
            if isinstance(missed := getattr(record, "target_missed", ""), str) and missed
        ]

    @property
    def verified(self) -> bool:
        """Whether ONNX Runtime compared the result with its reference and it held.

        False when verification was off, could not run (``verification_skipped`` says why)
        or failed. A run of lossy passes only has nothing exact to verify: its lossy change
        was measured (``lossy_check``), which counts.
        """
        if self.verification_skipped or self.unverified_after:
            return False
        if self.verification is not None:
            return self.verification.ok
        # Measured by ORT, or by the pass on a simulation of what ORT cannot run (bf16).
        return self.lossy_check is not None or bool(self.lossy_unrunnable)


def default_pipeline(
    lossy: Sequence[PassSpec] = (),
    skip: Sequence[str] = (),
) -> list[Step]:
    """Every exact pass, and the given lossy passes in their fixed stage order."""
    registry = all_passes()
    for name in skip:
        get_pass(name)  # unknown names are an error, not silently ignored
    for spec in lossy:
        if get_pass(spec.name).exact and get_pass(spec.name).stage != Stage.LOWER:
            raise UserInputError(f"pass {spec.name!r} is exact; it already runs by default")
    # Exact passes asked for by flag (Stage.LOWER: --sparse-kernels) run last, on the final
    # graph, in the exact segment before them: verified (and rolled back) as any exact pass.
    late = [spec for spec in lossy if get_pass(spec.name).stage == Stage.LOWER]
    lossy = [spec for spec in lossy if get_pass(spec.name).stage != Stage.LOWER]

    def stage(kind: Stage) -> tuple[PassSpec, ...]:
        return tuple(
            PassSpec(name)
            for name, cls in registry.items()
            if cls.stage == kind and name not in skip
        )

    prepare, cleanup, fusion = stage(Stage.PREPARE), stage(Stage.CLEANUP), stage(Stage.FUSION)
    exact_steps = [Step(prepare), Step(cleanup, True), Step(fusion), Step(cleanup, True)]
    steps = list(exact_steps)
    if lossy:
        # Target-specific fusions (ORT contrib ops) make ops the lossy passes have no rules for
        # (a BiasGelu blocks the channels through it): they run once, after the lossy stages.
        portable = tuple(spec for spec in fusion if registry[spec.name].targets is None)
        steps[2] = Step(portable)
        ordered = sorted(lossy, key=lambda spec: LOSSY_STAGES.index(get_pass(spec.name).stage))
        steps += [Step((spec,)) for spec in ordered]
        steps += exact_steps[1:]
    steps += [Step((spec,)) for spec in late]
    return [step for step in steps if step.passes]


def explicit_pipeline(specs: Sequence[PassSpec]) -> list[Step]:
    """Passes in the order given; runs of exact passes are iterated to a fixed point."""
    steps: list[Step] = []
    run: list[PassSpec] = []
    for spec in specs:
        if get_pass(spec.name).exact:
            run.append(spec)
            continue
        if run:
            steps.append(Step(tuple(run), True))
            run = []
        steps.append(Step((spec,)))
    if run:
        steps.append(Step(tuple(run), True))
    return steps


def explicit_specs(
    passes: Sequence[PassSpec], lossy: Sequence[PassSpec] = (), skip: Sequence[str] = ()
) -> tuple[list[PassSpec], list[str]]:
    """An explicit pass list with the lossy passes and skips asked for beside it, and notes.

    The list says what runs and in which order; nothing is added to it behind the user's back.
    A lossy pass asked for beside it (``--prune``, a recipe's ``lossy:``) must be in the list,
    where it should run: its options are merged into that entry (the lossy spec's win, as
    flags override a recipe); a lossy pass missing from the list is an error, not silently
    dropped. Skipped passes are taken out of the list; a skip the list has no such pass for
    changes nothing, and a note says so.
    """
    _check_skips(lossy, skip)
    named = {spec.name for spec in passes}
    missing = [spec.name for spec in lossy if spec.name not in named]
    if missing:
        listed = ", ".join(dict.fromkeys(missing))
        raise UserInputError(
            f"{listed} asked for next to an explicit pass list (--passes or the recipe's "
            f"passes:), which does not name it: add {listed} to the list where it should run "
            "(its options still come from --prune / the recipe), or drop the list"
        )
    asked = {spec.name: spec.options for spec in lossy}
    specs = [
        PassSpec(spec.name, {**spec.options, **asked[spec.name]}) if spec.name in asked else spec
        for spec in passes
        if spec.name not in skip
    ]
    notes = []
    idle = [name for name in dict.fromkeys(skip) if name not in named]
    if idle:
        notes.append(
            f"skip {', '.join(idle)}: not in the explicit pass list, so skipping changed nothing"
        )
    return specs, notes


def skip_notes(lossy: Sequence[PassSpec], skip: Sequence[str]) -> list[str]:
    """Notes on the skips of a default pipeline run that change nothing (lossy passes run only
    when asked for); skipping a lossy pass that is asked for is an error."""
    _check_skips(lossy, skip)
    idle = [name for name in dict.fromkeys(skip) if not get_pass(name).exact]
    if not idle:
        return []
    return [
        f"skip {', '.join(idle)}: lossy passes run only when asked for, so skipping changed nothing"
    ]


def _check_skips(lossy: Sequence[PassSpec], skip: Sequence[str]) -> None:
    for name in skip:
        get_pass(name)  # unknown names are an error, not silently ignored
    both = [spec.name for spec in lossy if spec.name in skip]
    if both:
        listed = ", ".join(dict.fromkeys(both))
        raise UserInputError(
            f"{listed} is both asked for (--prune or the recipe's lossy:) and skipped: drop one"
        )


ProgressCallback = Callable[[str], None]


class PassManager:
    """Runs a pipeline on a model in place, with stats, verification and rollback."""

    def __init__(
        self,
        steps: Sequence[Step],
        context: PassContext | None = None,
        verifier: Verifier | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.steps = list(steps)
        self.context = context or PassContext()
        self.verifier = verifier
        self.progress = progress or (lambda message: None)
        self._stats: dict[str, PassStats] = {}
        self._disabled: set[str] = set()
        # Node count of the model as the last pass left it (None: recount). A pass that
        # reports no change did not change the count, so most runs skip the recount.
        self._count: tuple[int, int] | None = None
        # Op types in the model as the last pass left it (None: collect again), to skip
        # passes whose trigger ops are absent. Like the count, only a pass that reports a
        # change (or a memoized one, whose fingerprint has them) can change it.
        self._op_types: tuple[int, frozenset[str]] | None = None
        # Memoized passes: a model state each one last left unchanged, by pass and options.
        self._fixed_points: dict[tuple[str, str], Fingerprint] = {}
        # False: run every pass every round (to check that skipping changes nothing).
        self.skip_idle = True

    def run(self, model: ir.Model) -> tuple[ir.Model, RunReport]:
        # The output must not depend on the machine's core count (see blas_threads).
        with single_threaded_blas():
            return self._run(model)

    def _run(self, model: ir.Model) -> tuple[ir.Model, RunReport]:
        start = time.perf_counter()
        nodes_before = count_nodes(model)
        self._note_subgraph_handling(model)
        signature = _signature(model)
        # The nodes as the user gave them: a pass that takes the user's node names reads
        # them once fusions have renamed and merged nodes (graphopt.analysis.origins).
        self.context.original_nodes = snapshot(model)
        verifier = self.verifier
        reference = "the original"
        checks: list[ExactCheck] = []
        lossy_check: VerifyResult | None = None
        rolled_back: list[str] = []
        lossy_unrunnable = ""
        # Exact hits when an unrunnable lossy pass ended verification: any later one changed
        # the model unverified.
        unverified_from: int | None = None
        # Exact segments are verified against the model they started from; a lossy step is
        # measured against the original (it is expected to move outputs) and becomes the
        # reference of the exact passes after it, so those stay proven exact.
        segments = self._segments()
        # A context reused for another run must not carry the last run's original over.
        self.context.reference_model, self.context.reference_includes = None, ()
        # A later lossy pass reports its fidelity against the model before the first one
        # (PassContext.reference_model). Kept only when a second lossy step may run: a clone
        # shares tensors, but a single lossy pass (a 1 GB decoder to int4 under a memory
        # budget) should pay nothing for a reference it never reads.
        keep_reference = sum(1 for _, lossy in segments if lossy) > 1
        before_lossy: ir.Model | None = None
        for steps, lossy in segments:
            if not lossy:
                model, verification, undone = self._run_exact(model, steps, verifier)
                rolled_back += undone
                if verification is not None:
                    checks.append(ExactCheck(reference, verification))
                continue
            if keep_reference and before_lossy is None:
                # Exact passes before it moved outputs by no more than the tolerance: this
                # is the original as far as fidelity goes.
                before_lossy = model.clone()
            hits = self._lossy_hits()
            self._run_steps(model, steps, check_each=False)
            if before_lossy is not None and self._lossy_hits() > hits:
                self.context.reference_model = before_lossy
                self.context.reference_includes += tuple(
                    spec.name
                    for step in steps
                    for spec in step.passes
                    if spec.name not in self.context.reference_includes
                    and self._stats.get(spec.name)
                    and self._stats[spec.name].hits
                )
            names = ", ".join(spec.name for step in steps for spec in step.passes)
            reference = f"the result of {names}"
            if verifier is not None:
                self.progress("measuring the lossy change")
                try:
                    verifier = verifier.rebased(model)
                    _widen_for_rounding(verifier, self.context, names)
                except VerificationUnavailable as exc:
                    _raise_if_out_of_memory(str(exc))
                    why = _declared_unrunnable(self.context)
                    if not why:
                        raise CheckFailedError(
                            f"{names} produced a model ONNX Runtime cannot run: {exc}"
                        ) from None
                    # Said by the pass (bf16: no CPU kernels), its fidelity measured otherwise:
                    # the exact passes after it have no reference to be checked against.
                    lossy_unrunnable = names  # why: in the pass's own report (its record)
                    unverified_from = self._exact_hits()
                    verifier = None
        # The pre-lossy clone holds the original weights: not kept through finalize and save.
        self.context.reference_model = None
        if verifier is not None and verifier is not self.verifier and self.verifier is not None:
            lossy_check = self.verifier.check(model, tolerance=float("inf"))
            _raise_if_out_of_memory(lossy_check.reason)
        _restore_signature(model, signature)
        unverified_after = ""
        if unverified_from is not None and self._exact_hits() > unverified_from:
            unverified_after = (
                f"exact passes changed the model after {lossy_unrunnable}, whose result ONNX "
                "Runtime cannot run: they are not verified"
            )
        report = RunReport(
            stats=list(self._stats.values()),
            nodes_before=nodes_before,
            nodes_after=count_nodes(model),
            seconds=time.perf_counter() - start,
            verification=_combined([check.result for check in checks]),
            rolled_back=rolled_back,
            notes=list(self.context.notes),
            details=dict(self.context.details),
            lossy_check=lossy_check,
            exact_checks=checks,
            lossy_unrunnable=lossy_unrunnable,
            unverified_after=unverified_after,
        )
        return model, report

    def _segments(self) -> list[tuple[list[Step], bool]]:
        """Consecutive exact steps grouped; every lossy step alone."""
        segments: list[tuple[list[Step], bool]] = []
        for step in self.steps:
            lossy = any(not get_pass(spec.name).exact for spec in step.passes)
            if lossy or not segments or segments[-1][1]:
                segments.append(([step], lossy))
            else:
                segments[-1][0].append(step)
        return segments

    def _run_exact(
        self, model: ir.Model, steps: list[Step], verifier: Verifier | None
    ) -> tuple[ir.Model, VerifyResult | None, list[str]]:
        """Run exact steps; verify; on failure or a crash replay them pass by pass."""
        # One clone up front (tensors are shared, so it is cheap): the replay starts from it
        # when verification fails or a pass crashes, with or without a verifier.
        start_state = model.clone()
        stats_before = {k: dataclasses.replace(v) for k, v in self._stats.items()}
        # What the passes noted is replayed with them: a note of a pass the replay rolls back
        # ("lowered 2 of 2 layers") would describe a change the output does not have.
        notes_before = len(self.context.notes)
        details_before = dict(self.context.details)
        verification = None
        replay_reason = ""
        hits_before = self._exact_hits()
        try:
            self._run_steps(model, steps, check_each=False)
        except (UserInputError, MemoryError):
            raise
        except Exception as exc:
            _raise_if_out_of_memory(exc)
            replay_reason = f"a pass crashed ({type(exc).__name__}: {exc})"
        if verifier is not None and not replay_reason:
            self.progress("verifying")
            verification = verifier.check(model)
            # ORT failing to allocate is the machine's limit, not the passes' fault: replaying
            # would roll every pass back and then fail the same way.
            _raise_if_out_of_memory(verification.reason)
            if not verification.ok and self._exact_hits() > hits_before:
                replay_reason = f"verification failed ({verification.reason})"
        rolled_back: list[str] = []
        if replay_reason:
            logger.info("%s; replaying pass by pass", replay_reason)
            model = start_state
            self._stats = stats_before
            del self.context.notes[notes_before:]
            self.context.details.clear()
            self.context.details.update(details_before)
            self.context.note(f"{replay_reason}: replayed with a check after every pass")
            self._forget_state()
            rolled_back = self._run_steps(model, steps, check_each=True, verifier=verifier)
            if verifier is not None:
                verification = verifier.check(model)
                _raise_if_out_of_memory(verification.reason)
        return model, verification, rolled_back

    def _lossy_hits(self) -> int:
        return sum(s.hits for s in self._stats.values() if not s.exact)

    def _exact_hits(self) -> int:
        return sum(s.hits for s in self._stats.values() if s.exact)

    def _ran_exact_change(self) -> bool:
        return any(s.exact and s.hits for s in self._stats.values())

    def _note_subgraph_handling(self, model: ir.Model) -> None:
        if not has_subgraphs(model):
            return
        untouched = sorted(
            {
                spec.name
                for step in self.steps
                for spec in step.passes
                if not get_pass(spec.name).handles_subgraphs
                # Another target's pass does not run at all: it leaves nothing untouched.
                and get_pass(spec.name).serves(self.context.target)
            }
        )
        if untouched:
            self.context.note(
                "model has subgraphs (If/Loop/Scan); these passes leave them untouched: "
                + ", ".join(untouched)
            )

    def _run_steps(
        self,
        model: ir.Model,
        steps: list[Step],
        check_each: bool,
        verifier: Verifier | None = None,
    ) -> list[str]:
        rolled_back: list[str] = []
        for step in steps:
            limit = MAX_FIXED_POINT_ITERATIONS if step.fixed_point else 1
            for iteration in range(limit):
                changed = False
                for spec in step.passes:
                    if spec.name in self._disabled:
                        continue
                    cls = get_pass(spec.name)
                    present = self._present_op_types(model)
                    if not cls.exact and cls.serves(self.context.target):
                        _refuse_lossy_without_targets(cls, present)
                    if not cls.serves(self.context.target) or (
                        self.skip_idle and not cls.applies(present)
                    ):
                        # Another target's pass, or none of its trigger ops is in the model:
                        # it would find nothing.
                        self._stats_of(spec)
                        continue
                    label = spec.name if limit == 1 else f"{spec.name} (round {iteration + 1})"
                    self.progress(label)
                    modified = self._run_one(model, spec, check_each, rolled_back, verifier)
                    changed = changed or modified
                if not changed:
                    break
        return rolled_back

    def _run_one(
        self,
        model: ir.Model,
        spec: PassSpec,
        check_each: bool,
        rolled_back: list[str],
        verifier: Verifier | None,
    ) -> bool:
        cls = get_pass(spec.name)
        stats = self._stats_of(spec)
        state: Fingerprint | None = None
        memo_key = (spec.name, repr(sorted(spec.options.items())))
        if cls.memoize and self.skip_idle and not check_each:
            # A pass is a deterministic function of the model: on a state it already left
            # unchanged it would again change nothing (and report no hits).
            state = fingerprint(model)
            if self._fixed_points.get(memo_key) == state:
                return False
        # In replay, exact passes are snapshotted (and checked when there is a verifier); lossy
        # ones are measured, not rolled back.
        snapshot = model.clone() if check_each and cls.exact else None
        before = self._count[1] if self._count and self._count[0] == id(model.graph) else None
        if before is None:
            before = count_nodes(model)
        graph_pass = cls(self.context, **spec.options)
        # A rolled-back pass did nothing: what it noted ("lowered 2 of 2 layers") goes too.
        notes_before = len(self.context.notes)
        began = time.perf_counter()
        try:
            result = graph_pass(model)
        except (UserInputError, MemoryError):
            raise
        except Exception as exc:
            _raise_if_out_of_memory(exc)
            # A pass that crashes must not take the user's run down with it: the model may be
            # half-edited, so it is only safe to continue when we hold a snapshot.
            if snapshot is None:
                raise
            logger.warning("pass %s failed (%s); rolled back", spec.name, exc)
            _restore(model, snapshot)
            del self.context.notes[notes_before:]
            self._forget_state()
            self._disabled.add(spec.name)
            rolled_back.append(spec.name)
            stats.status = "rolled back (error)"
            return False
        stats.seconds += time.perf_counter() - began
        stats.runs += 1
        hits = graph_pass.hits
        if snapshot is not None and result.modified and verifier is not None:
            check = verifier.check(model)
            _raise_if_out_of_memory(check.reason)
            if not check.ok:
                _restore(model, snapshot)
                del self.context.notes[notes_before:]
                self._forget_state()
                self._disabled.add(spec.name)
                rolled_back.append(spec.name)
                stats.status = f"rolled back: {check.reason}"
                return False
        stats.hits += hits
        after = count_nodes(model) if result.modified else before
        self._count = (id(model.graph), after)
        stats.nodes_removed += before - after
        if result.modified:
            self._op_types = None
        elif state is not None:
            # Reported no change; it may still have changed what it reports no hits for
            # (e.g. inferred shapes): only an identical state is a fixed point.
            left = fingerprint(model)
            self._op_types = (id(model.graph), left.op_types)
            if left == state:
                self._fixed_points[memo_key] = left
        return result.modified

    def _stats_of(self, spec: PassSpec) -> PassStats:
        cls = get_pass(spec.name)
        return self._stats.setdefault(spec.name, PassStats(spec.name, cls.exact))

    def _present_op_types(self, model: ir.Model) -> frozenset[str]:
        if self._op_types is None or self._op_types[0] != id(model.graph):
            self._op_types = (id(model.graph), op_types(model))
        return self._op_types[1]

    def _forget_state(self) -> None:
        """After a rollback swapped the graph: recount, re-collect, fingerprint anew."""
        self._count = None
        self._op_types = None
        self._fixed_points.clear()


def op_types(model: ir.Model) -> frozenset[str]:
    """Op types (any domain) of every node: subgraphs and functions included."""
    found: set[str] = set()
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    while graphs:
        for node in graphs.pop():
            found.add(node.op_type)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    graphs.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    graphs.extend(attr.value)
    return frozenset(found)


def _restore(model: ir.Model, snapshot: ir.Model) -> None:
    """Make ``model`` equal to ``snapshot`` (passes edit in place, so swap the graph)."""
    restored = snapshot.clone()
    model.graph = restored.graph
    model.functions.clear()
    model.functions.update(restored.functions)
    # opset imports live on the graph in onnx-ir, so they came along with it
    model.ir_version = restored.ir_version
    # A pass may record what it did in the metadata (the sparse kernels' decisions): a
    # rolled-back pass did nothing, and a replay of its record must not redo it.
    model.metadata_props.clear()
    model.metadata_props.update(restored.metadata_props)


Signature = list[tuple[str | None, ir.TypeProtocol | None, ir.Shape | None]]


def _signature(model: ir.Model) -> tuple[Signature, Signature]:
    """Declared names, types and shapes of the graph inputs and outputs."""

    def declared(values) -> Signature:
        return [(v.name, v.type, v.shape) for v in values]

    return declared(model.graph.inputs), declared(model.graph.outputs)


def _restore_signature(model: ir.Model, signature: tuple[Signature, Signature]) -> None:
    """Give the graph inputs and outputs back their declared types and shapes.

    Passes may learn more about an output than its declaration said (a symbolic dim that
    shape inference resolves to 128); the model's interface must still not change.
    """
    for values, declared in zip((model.graph.inputs, model.graph.outputs), signature, strict=True):
        if len(values) != len(declared):
            continue  # a pass changed the interface; verification reports that
        for value, (name, type_, shape) in zip(values, declared, strict=True):
            if value.name == name:
                value.type, value.shape = type_, shape


def _widen_for_rounding(verifier: Verifier, context: PassContext, names: str) -> None:
    """Loosen the check of the exact passes after a lossy pass whose result rounds at run
    time (int8 activations: DynamicQuantizeLinear, QuantizeLinear), to the tolerance its
    record states (``exact_tolerance_after``).

    Such a model is discontinuous: an exact rewrite before a run-time quantizer (a fusion
    that changes float rounding by one ulp) can move a value across a rounding boundary and
    change an output by a whole quantization step. At the default tolerance that rolled back
    exact fusions (ort-gelu on int8 MiniLM at 0.011). The floor the pass states is its own
    measured error against the original: one flipped step moves an output by less than all
    of them together. What the user gets is still measured against the original model, in
    the lossy check."""
    floor = max(
        (getattr(d, "exact_tolerance_after", 0.0) for d in context.details.values()), default=0.0
    )
    if floor <= verifier.tolerance:
        return
    why = (
        "(the quantized model rounds at run time, in its quantizers or, for fp16/bf16, in every "
        "op: an exact rewrite may move a value across a rounding step or change where it "
        "rounds; its error against the original is measured as ever)"
    )
    own = _own_floors(context)
    if own is not None and verifier.output_tolerances is not None:
        # Each float output at its own measured error: one output that moves a lot (boxes
        # reordered by near-tied scores) no longer loosens the check of the others.
        tolerances = [
            max(tol, own.get(name, 0.0))
            for tol, name in zip(verifier.output_tolerances, verifier.output_names, strict=True)
        ]
        verifier.tolerance_reasons = [
            reason if tol == old else f"{names} rounds at run time"
            for reason, tol, old in zip(
                verifier.tolerance_reasons, tolerances, verifier.output_tolerances, strict=True
            )
        ]
        verifier.output_tolerances = tolerances
        verifier.tolerance = max(tolerances)
        listed = ", ".join(
            f"{name!r} {tol:.3g}"
            for name, tol in zip(verifier.output_names, tolerances, strict=True)
            if name in own
        )
        context.note(
            f"the exact passes after {names} are verified per output at its own error against "
            f"the original ({listed}) {why}"
        )
        return
    verifier.tolerance = floor
    context.note(f"the exact passes after {names} are verified at tolerance {floor:.3g} {why}")


def _own_floors(context: PassContext) -> dict[str, float] | None:
    """Per float output, the largest error a lossy pass of the run states as its own
    (``exact_tolerances_after``); None when a pass that widens states only one number."""
    floors: dict[str, float] = {}
    for details in context.details.values():
        scalar = getattr(details, "exact_tolerance_after", 0.0)
        per_output = getattr(details, "exact_tolerances_after", None) or {}
        if scalar and not per_output:
            return None
        for name, value in per_output.items():
            floors[name] = max(floors.get(name, 0.0), value)
    return floors


def _declared_unrunnable(context: PassContext) -> str:
    """Why a lossy pass's result is not for ONNX Runtime's CPU provider, if its record says
    so (``ort_unrunnable``), else ""."""
    reasons = (getattr(d, "ort_unrunnable", "") for d in context.details.values())
    return next((r for r in reasons if r), "")


def _raise_if_out_of_memory(error: BaseException | str) -> None:
    """Out of memory is not a pass's fault or a failed check: stop the run (the CLI's exit 3)."""
    if error and is_out_of_memory(error):
        raise MemoryError(str(error)) from (error if isinstance(error, BaseException) else None)


def _combined(results: Sequence[VerifyResult]) -> VerifyResult | None:
    """Several checks as one: failed if any failed (with the first reason), each output's
    worst error over all of them, the shapes of the last (every check uses the same inputs)."""
    if len(results) <= 1:
        return results[0] if results else None
    worst: dict[str, OutputError] = {}
    for result in results:
        for out in result.outputs:
            seen = worst.get(out.name)
            worst[out.name] = out if seen is None else _worse(seen, out)
    failed = next((r for r in results if not r.ok), None)
    last = results[-1]
    return VerifyResult(
        ok=failed is None,
        outputs=list(worst.values()),
        reason=failed.reason if failed is not None else "",
        shapes=list(last.shapes),
        shape_note=last.shape_note,
    )


def _worse(a: OutputError, b: OutputError) -> OutputError:
    return OutputError(
        a.name,
        max(a.max_abs, b.max_abs),
        max(a.max_rel, b.max_rel),
        min(a.cosine, b.cosine),
        max(a.mean_abs, b.mean_abs),
        shape_ok=a.shape_ok and b.shape_ok,
        detail=a.detail or b.detail,
    )


def _refuse_lossy_without_targets(cls: type, present: frozenset[str]) -> None:
    """A lossy pass asked for on a model without any op it rewrites: refused
    (:func:`~graphopt.refusals.refuse_nothing_to_do`). Quantization, whose ops depend on the
    mode, refuses the same way from inside (``quantize_checks.refuse_nothing_to_quantize``)."""
    if cls.ops is not None:
        refuse_nothing_to_do(cls.flag or f"pass {cls.name!r}", frozenset(cls.ops), present)
