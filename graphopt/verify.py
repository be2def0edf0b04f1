"""Differential verification: ONNX Runtime runs the original and the result on the same inputs.

The original runs once; its outputs are the reference for every later check. Per output we
report max abs error, max error relative to the reference's largest magnitude (the project's
error measure) and cosine similarity. ORT runs with its own graph optimizations off so that
what is compared is graphopt's rewrite, not ORT's; for a reference that rounds at run time
(int8 activations), what ORT's optimizations themselves move each output by is measured and
allowed (:meth:`Verifier._ort_floors`).

How one output pair is measured, and when a flipped bool output is rounding near a tie, is
:mod:`graphopt.output_errors`; the default tolerances and what sets them,
:mod:`graphopt.tolerances`; ORT's error messages made readable, :mod:`graphopt.ort_messages`.
This module runs the models: the reference, the second input shape, the candidates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError, is_out_of_memory
from graphopt.input_dims import check_input_shapes, dims_of, graph_inputs
from graphopt.inputs import (
    ENLARGE_FACTOR,
    bind_dims,
    check_feeds,
    describe_feeds,
    describe_shapes,
    distinct_second_dims,
    enlarged_dims,
    make_inputs,
    repeated_axes,
    resize_feeds,
    second_shape_candidates,
)
from graphopt.inputs import input_shapes as bound_shapes  # `input_shapes` is a parameter name
from graphopt.ort_messages import first_line, innermost_message, one_line
from graphopt.output_errors import (
    SCALE_FLOOR,
    OutputError,
    compare,
    compared_outputs,
    near_boundary,
    output_resolutions,
    worst_of,
)
from graphopt.sessions import make_session
from graphopt.tolerances import (
    DEFAULT_TOLERANCE,
    output_tolerances,
    rounds_at_run_time,
    tolerance_reason,
)

# Ops whose outputs are random: a model with one may give other outputs on every run. ORT
# seeds a seeded one once per session, so it repeats across sessions, not across runs.
RANDOM_OPS = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
        "BiasDropout",
        "BitmaskDropout",
        "BitmaskBiasDropout",
    }
)
# Second shape: at most this many dims are tried one by one when changing all at once fails
# (each try is one run of the original; a failing run usually stops at the first bad node).
MAX_DIMS_TRIED = 8


@dataclass
class VerifyResult:
    ok: bool
    outputs: list[OutputError] = field(default_factory=list)
    reason: str = ""
    # The input shapes checked (``N=1: x 1x4``), and why there is only one when so; and,
    # when ORT's own optimizations widened an output's tolerance, by how much and why
    # (printed as the note under the shapes).
    shapes: list[str] = field(default_factory=list)
    shape_note: str = ""
    # ``at tolerance 0.0625 (bfloat16 in its computation)`` when the tolerance is not the
    # default 1e-4 for every output (see Verifier.tolerance_text).
    tolerance_text: str = ""

    @property
    def worst_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)


class VerificationUnavailable(Exception):
    """The original model cannot be run, so nothing can be compared."""


class NothingToCompare(VerificationUnavailable):
    """The original runs, but every output is empty: a comparison would prove nothing."""


def run_model(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from graphopt.ortrun import run_session

    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    return run_session(session, names, feeds)


class Verifier:
    """Holds the reference outputs of the original model and checks candidates against them.

    Inputs come in up to two sets (``input_sets``): the requested or default shape, and when
    the model has symbolic dims a second one where each takes another value the original
    accepts. A rewrite that baked one value of a dim (shape folding on a stale value_info)
    matches at the first and fails at the second. Candidates are checked on every set with
    one ORT session, so the second shape costs one more run per check, not a session.
    """

    def __init__(
        self,
        original: ir.Model,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        tolerance: float | None = None,
        seed: int = 0,
        feeds: dict[str, np.ndarray] | None = None,
        feeds_source: str = "--verify-inputs",
        measure_ort_floors: bool = True,
    ) -> None:
        """``measure_ort_floors``: False for a caller that reads the references and never
        calls :meth:`check` (``graphopt compare``): the floors cost an optimized session."""
        # None: the default for the float type the model computes in (DTYPE_TOLERANCES).
        # Per output, the default for the float types that can affect it (output_tolerances),
        # used while the tolerance is that default (None: one given, or widened: the same for
        # every output), and why each is what it is.
        self.output_tolerances: list[float] | None = None
        self.tolerance_reasons = [""] * len(original.graph.outputs)
        if tolerance is None:
            self.output_tolerances = output_tolerances(original)
            self.tolerance_reasons = [
                tolerance_reason(original, i) for i in range(len(self.output_tolerances))
            ]
        self.tolerance = (
            max(self.output_tolerances, default=DEFAULT_TOLERANCE)
            if self.output_tolerances is not None
            else tolerance
        )
        # What the tolerance was before the pipeline widened it (_widen_for_rounding): what an
        # output may differ by beyond ORT's own optimizations (see ort_floors).
        self.base_tolerance = self.tolerance
        given = dict(input_shapes or {})
        check_input_shapes(original, given)
        if feeds is None:
            dims = bind_dims(original, given)
            shapes = bound_shapes(original, given)
            self.feeds = make_inputs(original, given, seed=seed, shapes=shapes)
        else:
            self.feeds = check_feeds(original, feeds, feeds_source, given)
            shapes = {name: array.shape for name, array in self.feeds.items()}
            dims = dims_of(original, shapes)
            # An input without a declared shape keeps the user's at the second shape too.
            undeclared = [v.name for v in graph_inputs(original) if v.shape is None]
            given.update({name: shapes[name] for name in undeclared})
        self.output_names = [v.name for v in original.graph.outputs]
        self.resolutions = output_resolutions(original)
        try:
            session = make_session(original)
        except UserInputError:
            # The user's setup, not the model (two libraries claiming one op domain, graphopt's
            # kernels not built): said before anything is written.
            raise
        except Exception as exc:  # the model itself: no inputs would help
            raise VerificationUnavailable(one_line(exc)) from None
        # Said with the shapes checked when the generated inputs had to be enlarged.
        self.input_note = ""
        try:
            self.reference = _run(session, self.feeds)
        except Exception as exc:
            if feeds is not None:
                raise VerificationUnavailable(_rejected(exc, self.feeds, feeds_source)) from None
            found = self._enlarge(original, session, given, dims, seed, exc)
            if found is None:
                tried = _tried_text(dims, enlarged_dims(original, given, dims))
                raise VerificationUnavailable(_rejected(exc, self.feeds, None, tried)) from None
            dims, shapes, self.feeds, self.reference = found
        refuse_empty_reference(self.reference, self.feeds)
        self.input_sets = [self.feeds]
        self.references = [self.reference]
        self.shapes = [describe_shapes(original, shapes)]
        self.shape_note = ""
        # The shapes the original runs at on generated inputs (the first set): what other
        # generated data of the run (pruning's --calib random and its check) should use.
        self.generated_shapes: dict[str, tuple[int, ...]] = dict(shapes) if feeds is None else {}
        if not dims:
            self.shape_note = "one shape: the inputs have no symbolic dims"
        else:
            self._add_second_shape(original, session, given, dims, seed, feeds is not None)
        self.shape_note = "; ".join(n for n in (self.input_note, self.shape_note) if n)
        del session  # one ORT session at a time (README, Memory limits)
        # Outputs the original itself gives otherwise on another run: not compared.
        self.nondeterministic = self._nondeterministic(original)
        self.ort_floors = (
            self._ort_floors(original) if measure_ort_floors else [0.0] * len(self.output_names)
        )
        self.margins = boundary_margins(original, self.input_sets) if measure_ort_floors else []

    def _enlarge(
        self,
        original: ir.Model,
        session,
        given: dict,
        dims: dict[str, int],
        seed: int,
        rejection: BaseException,
    ) -> tuple[dict[str, int], dict, dict[str, np.ndarray], list[np.ndarray]] | None:
        """The first of :func:`~graphopt.inputs.enlarged_dims` the original runs at:
        (dims, shapes, feeds, outputs), with ``input_note`` saying what changed and why; None
        when it runs at none of them.

        A window or reflect Pad the input reaches only through a Reshape or an If branch
        (silero-vad's STFT) is invisible to :func:`~graphopt.input_dims.dim_limits`; ORT's
        rejection of the defaults is the evidence, and a larger size the remedy.
        """
        for trial in enlarged_dims(original, given, dims):
            shapes = bound_shapes(original, given, trial)
            try:
                feeds = make_inputs(original, seed=seed, shapes=shapes)
                outputs = _run(session, feeds)
            except UserInputError:
                return None  # the size cap: larger tries would pass it too
            except Exception as exc:
                if is_out_of_memory(exc):
                    return None  # larger tries would run out too; the defaults' error stands
                continue
            changed = ", ".join(f"{k} {dims[k]} -> {v}" for k, v in trial.items() if v != dims[k])
            self.input_note = (
                f"generated inputs enlarged: {changed} (x{ENLARGE_FACTOR} per try until the "
                f"original model runs); at the default size it fails in "
                f"{innermost_message(rejection)}; --input-shape sets other sizes"
            )
            return trial, shapes, feeds, outputs
        return None

    def _add_second_shape(
        self,
        original: ir.Model,
        session,
        given: dict,
        dims: dict[str, int],
        seed: int,
        users_data: bool,
    ) -> None:
        """Find a second binding of the symbolic dims that the original runs at, and keep it.

        All dims move at once, distinct dims to distinct values
        (:func:`~graphopt.inputs.distinct_second_dims`: a rewrite that takes one symbol for
        another fails there); if the original rejects that (dims an exporter named twice),
        every dim moves by its own step, equal dims staying equal; if it rejects that too,
        dims are moved one at a time (kept where it runs), so a dim the model fixes in
        practice (an image height a recognizer's reshape needs) stays and the others are
        still checked. The user's data (``--verify-inputs``) is cut/tiled to the second
        shape rather than replaced.
        """
        candidates = second_shape_candidates(original, dims)
        limited = sorted(k for k, values in candidates.items() if not values)
        movable = [k for k, values in candidates.items() if values]
        if not movable:
            names = ", ".join(limited)
            self.shape_note = f"one shape only: no other value the graph allows for {names}"
            return
        tried: dict[tuple[tuple[str, int], ...], _Attempt] = {}

        def attempt(changed: dict[str, int]) -> _Attempt:
            # Each binding runs once: the fall-backs below may ask for one already tried.
            binding = {**dims, **changed}
            key = tuple(sorted(binding.items()))
            if key not in tried:
                tried[key] = self._attempt(original, session, given, binding, seed, users_data)
            return tried[key]

        together = {k: candidates[k][0] for k in movable}
        notes = []
        if limited:
            notes.append(f"no other value the graph allows for {', '.join(limited)}")
        distinct = distinct_second_dims(original, dims, candidates)
        for binding in distinct:
            found = attempt(binding)
            if found.outputs is not None:
                break
        failure = found
        if found.outputs is None and together not in distinct:
            found = attempt(together)
            if found.outputs is not None:
                notes.append(_tied_note(dims, distinct[0], together, failure.why))
            else:
                failure = found
        if found.outputs is None:
            found, kept = _move_one_at_a_time(movable, candidates, distinct[0], attempt)
            if kept:
                notes.append(
                    f"{', '.join(kept)} kept at one value (the original model fails when "
                    f"{'it changes' if len(kept) == 1 else 'they change'}: {failure.why})"
                )
        if found.outputs is None or found.feeds is None:
            self.shape_note = "one shape only: " + "; ".join(notes)
            return
        self.input_sets.append(found.feeds)
        self.references.append(found.outputs)
        shown = describe_shapes(original, found.shapes)
        if all(isinstance(o, np.ndarray) and o.size == 0 for o in found.outputs):
            # Still checks that a candidate runs there and keeps the shapes, nothing more.
            shown += " (every output empty: compared nothing)"
        repeated = repeated_axes(self.feeds, found.shapes) if users_data else []
        if repeated:
            # Tiled from the user's data: no new values there, and one given row gives
            # identical rows (a rewrite that mixes the batch's rows passes).
            shown += " (your data repeated)"
            notes.append(
                f"the second shape repeats your data ({'; '.join(repeated)}): what differs "
                "between repeated rows (a rewrite that mixes them) is not checked there; "
                "give more rows in --verify-inputs to check it"
            )
        self.shapes.append(shown)
        self.shape_note = "; ".join(notes)

    def _attempt(
        self,
        original: ir.Model,
        session,
        given: dict,
        binding: dict[str, int],
        seed: int,
        users_data: bool,
    ) -> _Attempt:
        """Inputs at ``binding`` and the original's outputs there (None when it fails)."""
        shapes = bound_shapes(original, given, binding)
        try:
            if users_data:
                feeds = resize_feeds(self.feeds, shapes)
            else:
                feeds = make_inputs(original, seed=seed, shapes=shapes)
            return _Attempt(feeds, _run(session, feeds), shapes)
        except UserInputError as exc:  # the size cap
            return _Attempt(None, None, shapes, str(exc))
        except Exception as exc:
            # The failing node and what it said: the first line's 300 characters were ORT's
            # source location, cut mid-word before the reason.
            return _Attempt(None, None, shapes, innermost_message(exc))

    def _nondeterministic(self, original: ir.Model) -> list[int]:
        """The outputs that differ between two runs of the original on the same inputs, for
        a model with a random op without a seed (:data:`RANDOM_OPS`: RandomNormal, Dropout
        with training_mode); :class:`NothingToCompare` when that is every output.

        Comparing such an output against one run says nothing of a rewrite: a correct pass
        was rolled back by chance (or a run with nothing to change failed), and ORT's
        optimizations were blamed for the variation (:meth:`_ort_floors`). The two runs are
        in a session of their own, so that the reference session's runs stay as a
        candidate's session repeats them. ORT draws an unseeded op's numbers from a seed
        that depends on the graph (a rewritten one draws others) and advances them run by
        run; a seeded op advances too, but repeats in every session, which is what the check
        relies on: a model whose random ops all have a seed is compared as before.
        """
        unseeded = sorted(
            {
                node.op_type
                for node in ir.traversal.RecursiveGraphIterator(original.graph)
                if node.op_type in RANDOM_OPS
                and node.domain in ("", "ai.onnx", "com.microsoft")
                and "seed" not in node.attributes
            }
        )
        if not unseeded:
            return []
        try:
            session = make_session(original)
            first = _run(session, self.input_sets[0])
            again = _run(session, self.input_sets[0])
        except Exception as exc:
            if is_out_of_memory(exc):
                raise VerificationUnavailable(one_line(exc)) from None
            return []
        del session
        found = []
        for index, (ref, got) in enumerate(zip(first, again, strict=True)):
            error = compare(self.output_names[index], ref, got)
            if not error.shape_ok or error.detail or error.max_abs != 0:
                found.append(index)
        if not found:
            return []
        names = ", ".join(repr(self.output_names[i]) for i in found)
        why = (
            f"the original's outputs ({names}) differ between two runs on the same inputs "
            f"(random ops without a seed: {', '.join(unseeded)})"
        )
        if len(found) == len(self.output_names):
            raise NothingToCompare(f"{why}: comparing them with another run proves nothing")
        note = f"not compared: {why}"
        self.shape_note = "; ".join(n for n in (self.shape_note, note) if n)
        return found

    def _ort_floors(self, model: ir.Model) -> list[float]:
        """Per output, how far ONNX Runtime's own graph optimizations move ``model``'s outputs
        on the verification inputs (max relative error over the input sets), for a model that
        rounds values it computes at run time (:func:`rounds_at_run_time`); else zeros.

        Such a model is discontinuous: ORT's fused integer kernels (QLinearMatMul,
        MatMulIntegerToFloat) sum in int32 where the reference, run with optimizations off,
        multiplies dequantized floats, and the last-bit difference moves a value across a
        rounding step of a later QuantizeLinear: a whole step at the output (int8 MiniLM:
        0.0384 at the second shape). An exact rewrite that computes the layer the integer
        way (graphopt's SparseQMatMul) differs from the reference by just as much, and was
        rolled back when run apart from the quantization (inside one run the pipeline widens
        the tolerance to the quantization's own error: _widen_for_rounding). So the check
        allows what ORT's own deployed numerics already differ by, measured on these inputs
        rather than assumed; the reference stays the unoptimized run.
        """
        floors = [0.0] * len(self.output_names)
        if not rounds_at_run_time(model):
            return floors
        try:
            session = make_session(model, optimize=True)
            runs = [_run(session, feeds) for feeds in self.input_sets]
        except Exception as exc:
            if is_out_of_memory(exc):
                raise VerificationUnavailable(one_line(exc)) from None
            return floors  # ORT's optimizer failing on the model loosens nothing
        del session
        for outputs, references in zip(runs, self.references, strict=True):
            if len(outputs) != len(floors):
                return [0.0] * len(floors)
            for index, (ref, got) in enumerate(zip(references, outputs, strict=True)):
                if index in getattr(self, "nondeterministic", ()):
                    continue  # run-to-run variation, not ORT's optimizations
                error = compare(self.output_names[index], ref, got, self.resolutions[index])
                # Non-finite values that differ, or a changed shape, widen nothing.
                if error.shape_ok and not error.detail and np.isfinite(error.max_rel):
                    floors[index] = max(floors[index], error.max_rel)
        return floors

    def _per_output(self, tolerance: float) -> list[float]:
        """``tolerance`` per output: each output's own default while it is the default (the
        largest of them), else the same for all."""
        own = getattr(self, "output_tolerances", None)
        if own is not None and len(own) == len(self.ort_floors) and tolerance == max(own):
            return list(own)
        return [tolerance] * len(self.ort_floors)

    def tolerances(self, tolerance: float) -> list[float]:
        """Per output, what its error may be at ``tolerance`` (its own default while that is
        the default: :meth:`_per_output`): more where ORT's own optimizations already move it
        (``ort_floors``), by that plus the base tolerance. A rewrite within the base tolerance
        of ORT's optimized run is then within this of the reference (the triangle
        inequality), whichever steps it rounds differently."""
        bases = self._per_output(self.base_tolerance)
        return [
            max(tol, floor + base) if floor > 0 else tol
            for tol, floor, base in zip(
                self._per_output(tolerance), self.ort_floors, bases, strict=True
            )
        ]

    def tolerance_text(self, tolerance: float) -> str:
        """``at tolerance 0.0625 (bfloat16 in its computation)``: the tolerance the verdict
        was reached at, when it is not DEFAULT_TOLERANCE for every output ("" then)."""
        per_output = self._per_output(tolerance)
        if all(t == DEFAULT_TOLERANCE for t in per_output):
            return ""
        own = getattr(self, "output_tolerances", None)
        if own is None or per_output != list(own):
            # Given (--tolerance) or widened by the pipeline: the same for every output.
            return f"at tolerance {tolerance:.3g}"
        reasons = getattr(self, "tolerance_reasons", None) or [""] * len(per_output)
        loose = [
            (name, t, why)
            for name, t, why in zip(self.output_names, per_output, reasons, strict=True)
            if t != DEFAULT_TOLERANCE
        ]
        if len(set(per_output)) == 1:
            why = loose[0][2] if len({w for _, _, w in loose}) == 1 else ""
            return f"at tolerance {tolerance:.3g}" + (f" ({why})" if why else "")
        parts = [f"{t:.3g} for {name!r}" + (f" ({why})" if why else "") for name, t, why in loose]
        return f"at tolerance {', '.join(parts)}, {DEFAULT_TOLERANCE:.3g} for the other outputs"

    def _floor_note(self, tolerance: float) -> str:
        """What the report says when ``ort_floors`` widened some output's tolerance."""
        limits = self.tolerances(tolerance)
        widened = [
            f"{name!r} {floor:.3g}"
            for name, floor, limit, tol in zip(
                self.output_names, self.ort_floors, limits, self._per_output(tolerance), strict=True
            )
            if limit > tol
        ]
        if not widened:
            return ""
        return (
            "the reference rounds values it computes at run time (quantized activations), and ONNX "
            "Runtime's own optimizations already move its outputs by a rounding step on these "
            f"inputs ({', '.join(widened)}, rel): those outputs are checked within that "
            f"+ {self.base_tolerance:.3g}"
        )

    def rebased(self, reference: ir.Model) -> Verifier:
        """A verifier with the same inputs whose reference is ``reference``'s outputs."""
        other = object.__new__(Verifier)
        other.tolerance, other.feeds = self.tolerance, self.feeds
        other.base_tolerance = self.base_tolerance
        other.output_tolerances = getattr(self, "output_tolerances", None)
        other.nondeterministic = getattr(self, "nondeterministic", [])
        other.tolerance_reasons = getattr(self, "tolerance_reasons", None)
        other.input_sets, other.shapes = self.input_sets, self.shapes
        other.shape_note = self.shape_note
        other.input_note, other.generated_shapes = self.input_note, self.generated_shapes
        other.output_names = [v.name for v in reference.graph.outputs]
        other.resolutions = output_resolutions(reference)
        try:
            session = make_session(reference)
        except Exception as exc:
            raise VerificationUnavailable(first_line(exc)) from None
        other.references = []
        for index, feeds in enumerate(self.input_sets):
            try:
                other.references.append(_run(session, feeds))
            except Exception as exc:
                raise VerificationUnavailable(f"{first_line(exc)}{self._at(index)}") from None
        other.reference = other.references[0]
        del session
        # Now: the pipeline goes on editing ``reference`` in place.
        other.ort_floors = other._ort_floors(reference)
        other.margins = boundary_margins(reference, other.input_sets)
        return other

    def _at(self, index: int) -> str:
        """`` at shape 2 (N=2: x 2x4)`` when there are several shapes, else nothing."""
        if len(self.input_sets) < 2:
            return ""
        return f" at shape {index + 1} ({self.shapes[index]})"

    def check(self, candidate: ir.Model, tolerance: float | None = None) -> VerifyResult:
        tol = self.tolerance if tolerance is None else tolerance
        limits = self.tolerances(tol)
        bases = self._per_output(tol)
        names = [v.name for v in candidate.graph.outputs]
        empty = [repr(self.output_names[i]) for i in _empty_everywhere(self.references)]
        # Zeros in its row would read "equal": an empty tensor compares nothing.
        unchecked = f"not compared: {', '.join(empty)} (empty at every shape checked)"
        note = "; ".join(
            n for n in (self.shape_note, self._floor_note(tol), unchecked if empty else "") if n
        )
        shapes = {
            "shapes": list(self.shapes),
            "shape_note": note,
            "tolerance_text": self.tolerance_text(tol) if np.isfinite(tol) else "",
        }
        if names != self.output_names:
            return VerifyResult(
                False, reason=f"outputs changed: {self.output_names} -> {names}", **shapes
            )
        try:
            session = make_session(candidate)
        except Exception as exc:
            return VerifyResult(
                False, reason=f"optimized model fails in ONNX Runtime: {first_line(exc)}", **shapes
            )
        per_shape: list[list[OutputError]] = []
        reason = ""
        for index, feeds in enumerate(self.input_sets):
            try:
                got = _run(session, feeds)
            except Exception as exc:
                return VerifyResult(
                    False,
                    reason=f"optimized model fails in ONNX Runtime{self._at(index)}: "
                    f"{first_line(exc)}",
                    **shapes,
                )
            references = self.references[index]
            row = [
                compare(n, r, g, res)
                for n, r, g, res in zip(names, references, got, self.resolutions, strict=True)
            ]
            margins = self.margins[index] if index < len(getattr(self, "margins", ())) else {}
            row = [
                near_boundary(e, r, g, margins.get(i), limit)
                for i, (e, r, g, limit) in enumerate(zip(row, references, got, limits, strict=True))
            ]
            for i in getattr(self, "nondeterministic", ()):
                row[i] = OutputError(
                    names[i], 0.0, 0.0, 1.0, 0.0, not_compared="differs between runs"
                )
            per_shape.append(row)
            bad = [
                (e, limit, base)
                for e, limit, base in zip(row, limits, bases, strict=True)
                if not e.shape_ok or e.detail or not e.max_rel <= limit  # NaN: bad
            ]
            if bad:
                worst, limit, base = bad[0]
                reason = worst.detail or f"output {worst.name!r} off by {worst.max_rel:.3g} (rel)"
                if not worst.detail and base != DEFAULT_TOLERANCE and limit == base:
                    reason += f" (allowed {limit:.3g})"
                if not worst.detail and limit > base:
                    reason += f" (allowed {limit:.3g}: ONNX Runtime's optimizations move it too)"
                reason += self._at(index)
                break  # failed already: another shape's run would only cost time
        errors = [worst_of(column) for column in zip(*per_shape, strict=True)]
        for i in _empty_everywhere(self.references):
            if i < len(errors) and errors[i].shape_ok and not errors[i].detail:
                errors[i].not_compared = "empty at every shape"
        return VerifyResult(not reason, errors, reason, **shapes)


def boundary_margins(
    model: ir.Model, input_sets: Sequence[Mapping[str, np.ndarray]]
) -> list[dict[int, np.ndarray]]:
    """Per input set, per bool output that compares two float tensors (``Greater(y, 0)``):
    how far apart the reference's compared values are at each element, relative to their
    largest magnitude. An exact rewrite may move floats within the tolerance; where the
    compared values are closer than that, the bool may flip (:func:`near_boundary`). Empty
    when the model has no such output, or its compared values cannot be read."""
    compared = compared_outputs(model)
    if not compared or not input_sets:
        return []
    clone = model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    values.update({name: v for name, v in clone.graph.initializers.items()})
    for node in clone.graph:
        values.update({v.name: v for v in node.outputs if v.name})
    wanted = sorted({name for pair in compared.values() for name in pair})
    constants: dict[str, np.ndarray] = {}
    outputs = {v.name for v in clone.graph.outputs}
    inputs = {v.name for v in clone.graph.inputs}
    for name in wanted:
        value = values.get(name)
        if value is None:
            return []
        if value.const_value is not None and value.producer() is None:
            # An initializer (also a graph input: its stored value unless fed).
            constants[name] = value.const_value.numpy()
        elif name not in outputs and name not in inputs:
            clone.graph.outputs.append(value)
    try:
        session = make_session(clone)
        names = [o.name for o in session.get_outputs()]
        runs = [dict(zip(names, _run(session, dict(feeds)), strict=True)) for feeds in input_sets]
    except Exception as exc:
        if is_out_of_memory(exc):
            raise VerificationUnavailable(one_line(exc)) from None
        return []  # no margins: the outputs are compared as they were, equal or not
    del session
    margins = []
    for feeds, run in zip(input_sets, runs, strict=True):
        found: dict[int, np.ndarray] = {}
        for index, (a_name, b_name) in compared.items():
            arrays = [feeds.get(n, constants.get(n, run.get(n))) for n in (a_name, b_name)]
            if any(x is None for x in arrays):
                continue
            a, b = (np.asarray(x, np.float64) for x in arrays)
            with np.errstate(invalid="ignore", over="ignore"):
                scale = max(
                    [float(np.abs(x[np.isfinite(x)]).max()) for x in (a, b) if np.isfinite(x).any()]
                    + [SCALE_FLOOR]
                )
                margin = np.abs(a - b) / scale
            found[index] = np.where(np.isfinite(margin), margin, np.inf)
        margins.append(found)
    return margins


@dataclass
class _Attempt:
    """The original run at one binding of the symbolic dims (``outputs`` None: it failed)."""

    feeds: dict[str, np.ndarray] | None
    outputs: list[np.ndarray] | None
    shapes: dict[str, tuple[int, ...]]
    why: str = ""


def _move_one_at_a_time(
    movable: list[str],
    candidates: Mapping[str, list[int]],
    distinct: Mapping[str, int],
    attempt: Callable[[dict[str, int]], _Attempt],
) -> tuple[_Attempt, list[str]]:
    """Move dims one by one (at most :data:`MAX_DIMS_TRIED`), each to the first value the
    original runs at with the ones moved before (its distinct value first); returns the last
    run that worked (or a failed one) and the dims kept at their first value."""
    chosen: dict[str, int] = {}
    found = _Attempt(None, None, {})
    for key in movable[:MAX_DIMS_TRIED]:
        values = dict.fromkeys([distinct[key], *candidates[key]])
        for value in values:
            trial = attempt({**chosen, key: value})
            if trial.outputs is not None:
                chosen[key] = value
                found = trial
                break
    return found, [k for k in movable if k not in chosen]


def _tied_note(
    dims: Mapping[str, int],
    distinct: Mapping[str, int],
    together: Mapping[str, int],
    why: str,
) -> str:
    """Which dims share a value at the second shape because the original rejected them apart
    (an exporter that gave one dim two names)."""
    second = {**dims, **together}
    shared = {together[k] for k in together if distinct[k] != together[k]}
    tied = [k for k, value in second.items() if value in shared]
    return (
        f"{', '.join(tied)} share a value at the second shape (the original model fails when "
        f"they differ: {why})"
    )


def _run(session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from graphopt.ortrun import run_session

    names = [o.name for o in session.get_outputs()]
    return run_session(session, names, feeds)


def _empty_everywhere(references: Sequence[Sequence[Any]]) -> list[int]:
    """The outputs empty (size 0) in the reference at every input set."""
    if not references:
        return []
    return [
        i
        for i in range(len(references[0]))
        if all(isinstance(r[i], np.ndarray) and r[i].size == 0 for r in references)
    ]


def _rejected(
    exc: BaseException, feeds: dict[str, np.ndarray], source: str | None, tried: str = ""
) -> str:
    """Why ORT could not run the original, naming what it was fed and how to feed otherwise
    (and ``tried``: the larger sizes that failed too)."""
    message = one_line(exc)
    if source is not None:
        return f"{message} (on {source}: {describe_feeds(feeds)})"
    parts = [message]
    if len(feeds) > 1:
        # The input ORT's message names ("for input: x", "(x)", 'x'), first; "idx=13" in an
        # index error is not a name.
        named = [
            n
            for n in feeds
            if re.search(rf"(input\W{{1,3}}|['\"(]){re.escape(n)}(?![\w=])", message)
        ]
        if named:
            parts.append(f"input {named[0]!r} was {describe_feeds({named[0]: feeds[named[0]]})}")
    parts.append(f"generated inputs: {describe_feeds(feeds)}")
    if tried:
        parts.append(tried)
    parts.append(
        "bind dims with --input-shape NAME:DxD... or verify on your own data with "
        "--verify-inputs FILE.npz"
    )
    return "; ".join(parts)


def _tried_text(dims: Mapping[str, int], tried: list[dict[str, int]]) -> str:
    """``also fails with seq up to 16384 (4 larger sizes tried)``: the enlarged sizes."""
    if not tried:
        return ""
    last = tried[-1]
    moved = ", ".join(f"{k} up to {v}" for k, v in last.items() if v != dims.get(k))
    count = f"{len(tried)} larger size{'s' if len(tried) > 1 else ''}"
    return f"also fails with {moved} ({count} tried)"


def refuse_empty_reference(outputs: Sequence, feeds: Mapping[str, np.ndarray]) -> None:
    """:class:`NothingToCompare` when every reference output is empty or all NaN.

    Any candidate's empty outputs compare equal to them, so "passed" would prove nothing: a
    zero-sized dim the model itself fixes, or a graph that slices everything away at the
    generated shapes. An output that is NaN everywhere matches any candidate NaN at the same
    places (``Log(x - 10)`` of the generated normal values): nothing was compared either.
    """
    if outputs and all(isinstance(o, np.ndarray) and _holds_no_value(o) for o in outputs):
        shapes = ", ".join(
            f"{name} {'x'.join(str(d) for d in np.shape(a)) or 'scalar'}"
            for name, a in feeds.items()
        )
        nan = any(o.size for o in outputs)
        what = "empty or NaN everywhere" if nan else "empty"
        raise NothingToCompare(
            f"every output of the original model is {what} on the inputs used ({shapes}), "
            f"and comparing {'them' if nan else 'empty tensors'} proves nothing"
            + ("; give inputs in its domain with --verify-inputs FILE.npz" if nan else "")
        )


def _holds_no_value(output: np.ndarray) -> bool:
    """Empty, or a float tensor that is NaN everywhere."""
    if output.size == 0:
        return True
    return output.dtype.kind in "fc" and bool(np.isnan(output).all())
