"""Differential verification: ONNX Runtime runs the original and the result on the same inputs.

The original runs once; its outputs are the reference for every later check. Per output we
report max abs error, max error relative to the reference's largest magnitude (the project's
error measure) and cosine similarity. ORT runs with its own graph optimizations off so that
what is compared is graphopt's rewrite, not ORT's; for a reference that rounds at run time
(int8 activations), what ORT's optimizations themselves move each output by is measured and
allowed (:meth:`Verifier._ort_floors`).
"""

from __future__ import annotations

import contextlib
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
from graphopt.sessions import make_session

# float32 (and float64): the long-standing default, room for float32 sums reassociated over
# large reductions.
DEFAULT_TOLERANCE = 1e-4
# Lower-precision models default to 8 ulps of their type at the output's largest magnitude:
# 8 * 2**-10 ~ 7.8e-3 for float16, 8 * 2**-7 ~ 6.3e-2 for bfloat16. ORT's CPU kernels
# accumulate in float32, so what an exact rewrite changes is rounding to the storage type
# (folding BatchNormalization into a float16 Conv rounds the folded weights and the output
# once, where the original rounded the Conv output and then the BatchNormalization output).
# Measured with graphopt's measure (ORT 1.32 CPU): one Conv+BN fold <= 0.94 ulps over 60
# random float16 models (median 0.5); chains of 8 / 16 / 32 folded Conv+BN+Relu blocks
# <= 1.6 / 2.9 / 6.0 ulps; light_resnet50 converted to float16 (53 folds and the other
# fusions) 1.37 ulps; the differential fuzzer found a single float16 fold at 4.5 ulps (an
# output of magnitude ~1e-3), so 4 ulps would roll back exact folds and 32-block chains.
# 1e-4 rolled back every one of these exact fusions. bfloat16, which
# ORT's CPU provider hardly runs, is the same in ulps: an emulation with float32
# accumulation gives <= 1 ulp per fold for both types. Other types: DEFAULT_TOLERANCE.
DTYPE_TOLERANCES = {
    ir.DataType.FLOAT16: 8 * 2.0**-10,
    ir.DataType.BFLOAT16: 8 * 2.0**-7,
}
# Outputs whose largest magnitude is below this are compared at this scale (see compare).
SCALE_FLOOR = 1e-6
# The floor forgives rounding noise, not a different output: it applies only where the result
# points the way the reference does (cosine at least this) at about its size (norms within a
# factor FLOOR_NORM_RATIO). Rounding that moves a ~0 output moves it by quanta that leave
# its direction: a sigmoid saturated at 3e-8 moved by a quantum or two (counted against
# SIGMOID_RESOLUTION, not here) or a sum of small terms reassociated (relative error ~1e-7 of
# each value, cosine 1 - 1e-14). x * 1e-12 rewritten to x * -1e-12 has cosine -1 and passed
# at 4.7e-6 (rel) against the floor; its real error is 2. 0.9 leaves room for an output a few
# elements of which are pure noise, and is far from what a wrong sign, a swapped pair of
# values or a zeroed half of the tensor gives (<= 0.7 for a half).
FLOOR_COSINE = 0.9
FLOOR_NORM_RATIO = 2.0
# ORT's CPU Sigmoid (MLAS) is accurate in absolute, not relative, terms: its float32 outputs
# are off by up to 1.8e-7 (3 * 2**-24; measured against float64 over [-40, 40], ORT 1.32)
# and below ~1e-6 they are multiples of 2**-25. On a saturated sigmoid (PP-OCR det's
# probability map on random 32x32 inputs: max 3e-8) two exact rewrites of the logits (5.9e-7
# apart, relative) then differ by whole quanta: "off by 0.03 (rel)". For a float32 output the
# original computes with Sigmoid, differences up to 2**-21 (~4.8e-7: both runs' rounding,
# with margin) count as rounding; anything beyond counts in full. Other dtypes: not measured.
SIGMOID_RESOLUTION = 2.0**-21
# Ops that round a value computed at run time to integers: a model with one is discontinuous
# (see Verifier.ort_floors). QLinear* ops requantize their outputs.
RUN_TIME_ROUNDING = frozenset(("QuantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"))
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
class OutputError:
    """How far one output moved."""

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    mean_abs: float
    shape_ok: bool = True
    detail: str = ""
    # Integer, bool and string outputs: the share of elements equal to the reference's (they
    # are right only where equal, so their max rel and cosine are 0 or 1 and say nothing of
    # how many moved); None for float outputs.
    equal_share: float | None = None
    # Why the output was not compared at all ("" when it was): it differs between two runs
    # of the original (random ops), or it is empty at every shape checked. Its measures are
    # zeros then, and say nothing.
    not_compared: str = ""


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


def compare(name: str, ref: np.ndarray, got: np.ndarray, resolution: float = 0.0) -> OutputError:
    """Error of ``got`` against ``ref`` as graphopt measures it.

    ``resolution``: absolute differences up to this are the producing op's rounding; only the
    excess counts toward ``max_rel`` (``max_abs`` stays the raw difference). Sequence,
    optional and map outputs (lists, None, dicts from ONNX Runtime) are compared element by
    element (:func:`_compare_structured`).
    """
    if not isinstance(ref, np.ndarray) or not isinstance(got, np.ndarray):
        return _compare_structured(name, ref, got, resolution)
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return OutputError(
            name,
            np.inf,
            np.inf,
            0.0,
            np.inf,
            shape_ok=False,
            detail=f"shape/dtype {ref.shape} {ref.dtype} -> {got.shape} {got.dtype}",
        )
    if ref.dtype.kind in "OUSb" or ref.dtype.kind in "iu":
        equal = bool(np.array_equal(ref, got))
        err = 0.0 if equal else 1.0
        return OutputError(
            name, err, err, 1.0 if equal else 0.0, err, equal_share=_equal_share(ref, got)
        )
    a = ref.astype(np.float64).ravel()
    b = got.astype(np.float64).ravel()
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    # NaN where the original has NaN, and the same infinities, count as equal.
    same_nonfinite = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
    if np.any(finite_a != finite_b) or np.any(~finite_a & ~same_nonfinite):
        return OutputError(name, np.inf, np.inf, 0.0, np.inf, detail="non-finite values differ")
    keep = finite_a
    a, b = a[keep], b[keep]
    if a.size == 0:
        return OutputError(name, 0.0, 0.0, 1.0, 0.0)
    diff = np.abs(a - b)
    max_abs = float(diff.max())
    cosine = _scaled_cosine(a, b, max_abs)
    # A reference whose largest magnitude is ~0 (e.g. a saturated sigmoid on generated
    # inputs) makes the relative measure meaningless: below SCALE_FLOOR it is absolute, as
    # long as the result looks like it (FLOOR_COSINE); a different output counts in full.
    largest = float(np.abs(a).max())
    scale = max(largest, SCALE_FLOOR)
    if largest < SCALE_FLOOR and largest > 0 and float(np.abs(b).max()) > 0:
        with np.errstate(over="ignore", invalid="ignore"):
            norms = float(np.linalg.norm(a / largest)), float(np.linalg.norm(b / largest))
        if not (
            cosine >= FLOOR_COSINE
            and norms[1] <= FLOOR_NORM_RATIO * norms[0]
            and norms[0] <= FLOOR_NORM_RATIO * norms[1]
        ):
            scale = largest
    max_rel = max(max_abs - resolution, 0.0) / scale
    return OutputError(name, max_abs, max_rel, cosine, float(diff.mean()))


def _scaled_cosine(a: np.ndarray, b: np.ndarray, max_abs: float) -> float:
    """Cosine of two finite float64 vectors, computed on values scaled by their largest
    magnitude (float64 values near 1e155 overflowed the dot product: NaN and numpy warnings).
    Two all-zero vectors are alike (1); an all-zero one against another is not (0)."""
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    if scale == 0:
        return 1.0
    a, b = a / scale, b / scale
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0:
        return 1.0 if max_abs == 0 else 0.0
    return min(max(float(np.dot(a, b)) / norm, -1.0), 1.0)


def _equal_share(ref: np.ndarray, got: np.ndarray) -> float:
    """The share of elements of ``got`` equal to ``ref``'s (same shape), 1 when empty."""
    if not ref.size:
        return 1.0
    return float(np.mean(np.asarray(ref == got, dtype=bool)))


def _compare_structured(name: str, ref: Any, got: Any, resolution: float) -> OutputError:
    """A sequence (list), optional (None when empty) or map (dict) output: the worst error of
    its elements; a different kind, length, presence or key set is a mismatch."""

    def mismatch(what: str) -> OutputError:
        return OutputError(name, np.inf, np.inf, 0.0, np.inf, shape_ok=False, detail=what)

    if ref is None or got is None:
        if ref is None and got is None:
            return OutputError(name, 0.0, 0.0, 1.0, 0.0)
        shown = ["absent" if v is None else "present" for v in (ref, got)]
        return mismatch(f"output {name!r}: optional {shown[0]} -> {shown[1]}")
    if isinstance(ref, dict) and isinstance(got, dict):
        if sorted(map(repr, ref)) != sorted(map(repr, got)):
            return mismatch(f"output {name!r}: map keys differ")
        pairs = [(ref[k], got[k]) for k in ref]
    elif isinstance(ref, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(ref) != len(got):
            return mismatch(f"output {name!r}: sequence of {len(ref)} -> {len(got)}")
        pairs = list(zip(ref, got, strict=True))
    elif np.isscalar(ref) and np.isscalar(got):
        pairs = [(ref, got)]
    else:
        return mismatch(f"output {name!r}: {type(ref).__name__} -> {type(got).__name__}")
    if not pairs:
        return OutputError(name, 0.0, 0.0, 1.0, 0.0)
    return _worst(tuple(compare(name, _as_array(r), _as_array(g), resolution) for r, g in pairs))


def _as_array(value: Any) -> Any:
    # Plain values (a map's numbers) become arrays; nested sequences/maps/None stay as they are.
    if value is None or isinstance(value, (list, tuple, dict, np.ndarray)):
        return value
    return np.asarray(value)


def output_resolutions(model: ir.Model) -> list[float]:
    """Per graph output, the absolute difference that is rounding of the op producing it."""
    resolutions = []
    for value in model.graph.outputs:
        node = value.producer()
        sigmoid = node is not None and node.op_type == "Sigmoid" and node.domain in ("", "ai.onnx")
        resolutions.append(
            SIGMOID_RESOLUTION if sigmoid and value.dtype == ir.DataType.FLOAT else 0.0
        )
    return resolutions


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
            raise VerificationUnavailable(_one_line(exc)) from None
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
                raise VerificationUnavailable(_one_line(exc)) from None
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
                raise VerificationUnavailable(_one_line(exc)) from None
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
            raise VerificationUnavailable(_first_line(exc)) from None
        other.references = []
        for index, feeds in enumerate(self.input_sets):
            try:
                other.references.append(_run(session, feeds))
            except Exception as exc:
                raise VerificationUnavailable(f"{_first_line(exc)}{self._at(index)}") from None
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
                False, reason=f"optimized model fails in ONNX Runtime: {_first_line(exc)}", **shapes
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
                    f"{_first_line(exc)}",
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
        errors = [_worst(column) for column in zip(*per_shape, strict=True)]
        for i in _empty_everywhere(self.references):
            if i < len(errors) and errors[i].shape_ok and not errors[i].detail:
                errors[i].not_compared = "empty at every shape"
        return VerifyResult(not reason, errors, reason, **shapes)


# Comparisons of two float tensors: a bool output of one flips where an exact rewrite moves
# the compared values across each other, which it may do within the tolerance.
_COMPARISONS = frozenset({"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal"})
# Rounding flips a comparison only where its operands nearly tie: an exact rewrite within the
# tolerance moves a value by about an ulp (not by the whole tolerance), so the elements it can
# flip are the few within an ulp or so of the boundary (for normal operands and 1e-4, about
# 1e-4 of them; for bfloat16's 8 ulps, under 1%). Beyond this share (at least one element)
# of flipped elements whose operands did not tie exactly, a bool output is wrong: 7 of 8
# elements flipped used to pass because each was within the tolerance of the boundary
# relative to the largest compared value (1e6 at one element). Elements whose operands tie
# exactly (Equal of a value and its copy) flip with any rounding, and are not counted.
MAX_FLIP_SHARE = 0.01


def _compared_outputs(model: ir.Model) -> dict[int, tuple[str, str]]:
    """Per graph output made by a comparison of two float tensors: the names of those."""
    found = {}
    for index, value in enumerate(model.graph.outputs):
        node = value.producer()
        if node is None or node.op_type not in _COMPARISONS or node.domain not in ("", "ai.onnx"):
            continue
        operands = list(node.inputs)
        if len(operands) == 2 and all(
            v is not None and v.name and v.dtype is not None and v.dtype.is_floating_point()
            for v in operands
        ):
            found[index] = (operands[0].name, operands[1].name)
    return found


def boundary_margins(
    model: ir.Model, input_sets: Sequence[Mapping[str, np.ndarray]]
) -> list[dict[int, np.ndarray]]:
    """Per input set, per bool output that compares two float tensors (``Greater(y, 0)``):
    how far apart the reference's compared values are at each element, relative to their
    largest magnitude. An exact rewrite may move floats within the tolerance; where the
    compared values are closer than that, the bool may flip (:func:`near_boundary`). Empty
    when the model has no such output, or its compared values cannot be read."""
    compared = _compared_outputs(model)
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
            raise VerificationUnavailable(_one_line(exc)) from None
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


def near_boundary(
    error: OutputError, ref: Any, got: Any, margin: np.ndarray | None, limit: float
) -> OutputError:
    """A bool output of a comparison whose flipped elements all sit where the reference's
    compared values are within ``limit`` (rel) of each other, and are few (MAX_FLIP_SHARE):
    what rounding within the tolerance can do, so within it; its max rel is the widest such
    distance. Other integer and bool outputs are right only where equal."""
    if (
        margin is None
        or error.equal_share is None
        or error.max_rel == 0
        or not error.shape_ok
        or error.detail
        or not isinstance(ref, np.ndarray)
        or not isinstance(got, np.ndarray)
    ):
        return error
    try:
        margin = np.broadcast_to(margin, ref.shape)
    except ValueError:
        return error
    flipped = ref != got
    widest = float(margin[flipped].max()) if flipped.any() else 0.0
    if not widest <= limit:
        return error
    count = int(np.count_nonzero(flipped & (margin > 0)))
    if count > max(1, int(MAX_FLIP_SHARE * ref.size)):
        return OutputError(
            error.name,
            error.max_abs,
            error.max_rel,
            error.cosine,
            error.mean_abs,
            detail=f"output {error.name!r}: {count} of {ref.size} elements flipped, more than "
            f"rounding near a tie flips (at most {MAX_FLIP_SHARE:.0%}, or 1 element)",
            equal_share=error.equal_share,
        )
    return OutputError(
        error.name,
        error.max_abs,
        widest,
        error.cosine,
        error.mean_abs,
        equal_share=error.equal_share,
    )


def rounds_at_run_time(model: ir.Model) -> bool:
    """Whether ``model`` rounds values it computes to integers at run time: a QuantizeLinear
    or DynamicQuantizeLinear (or DynamicQuantizeMatMul, or a QLinear op's requantized output)
    of a value that is not a constant, subgraphs included."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        if node.op_type not in RUN_TIME_ROUNDING and not node.op_type.startswith("QLinear"):
            continue
        value = node.inputs[0] if node.inputs else None
        if value is not None and not _constant(value):
            return True
    return False


def _constant(value: ir.Value) -> bool:
    """An initializer (not one a graph input can override) or a Constant node's output."""
    if value.is_graph_input():
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ("", "ai.onnx")
    )


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


def _worst(errors: tuple[OutputError, ...]) -> OutputError:
    """One output's error over all input shapes: the worst of each measure."""
    if len(errors) == 1:
        return errors[0]
    return OutputError(
        errors[0].name,
        max(e.max_abs for e in errors),
        max(e.max_rel for e in errors),
        min(e.cosine for e in errors),
        max(e.mean_abs for e in errors),
        shape_ok=all(e.shape_ok for e in errors),
        detail=next((e.detail for e in errors if e.detail), ""),
        equal_share=(
            None
            if any(e.equal_share is None for e in errors)
            else min(e.equal_share for e in errors if e.equal_share is not None)
        ),
        not_compared=errors[0].not_compared if all(e.not_compared for e in errors) else "",
    )


def _rejected(
    exc: BaseException, feeds: dict[str, np.ndarray], source: str | None, tried: str = ""
) -> str:
    """Why ORT could not run the original, naming what it was fed and how to feed otherwise
    (and ``tried``: the larger sizes that failed too)."""
    message = _one_line(exc)
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


def innermost_message(exc: BaseException) -> str:
    """ORT's message from the innermost node that failed: an If wraps its branch's error
    ("...running If node. Name:'If_0' Status Message: ...running Pad node. Name:..."), and
    what matters is the Pad and what it said."""
    text = _one_line(exc)
    cut = text.rfind("while running ")
    text = text[cut + len("while running ") :] if cut >= 0 else text
    node = re.match(r"(\w+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if node is not None:
        text = f"{node[1]} node {node[2]!r}: {node[3]}"
    # ORT's source location ("/onnxruntime_src/.../reshape_helper.h:91 onnxruntime::
    # ReshapeHelper::ReshapeHelper(...)") says nothing to a user and pushed the reason (the
    # shapes) past the cut.
    text = _SOURCE_LOCATION.sub("", text).strip()
    if len(text) <= 300:
        return text
    cut = text.rfind(" ", 0, 297)
    return text[: cut if cut > 200 else 297] + "..."


_SOURCE_LOCATION = re.compile(r"\S+\.(?:h|hpp|cc|cpp|cu):\d+ (?:[\w:~<>*&]+\([^)]*\)\s*)?")


def _one_line(exc: BaseException) -> str:
    """The whole message on one line, uncut: ORT puts what failed after a long source
    location (a Reshape's "Input shape:{1,16}, requested shape:{1,3,4}" past 300 characters)
    or on later lines (the dims of "Got invalid dimensions for input")."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:300]


def default_tolerance(model: ir.Model) -> float:
    """The default tolerance for the lowest-precision float type ``model`` computes its
    outputs in: the largest of :func:`output_tolerances` (DEFAULT_TOLERANCE without outputs).
    """
    return max(output_tolerances(model), default=DEFAULT_TOLERANCE)


def output_tolerances(model: ir.Model) -> list[float]:
    """Per graph output, the default tolerance for the lowest-precision float type that can
    affect it (:func:`live_dtypes`): a float16 model with float32 outputs still computes in
    float16, while a float16 value nothing reads (an unused Cast to bfloat16, an unused
    float16 graph input) or another output's float16 branch loosens nothing: a 5% change of
    a float32 output used to pass next to a dead Cast to bfloat16."""
    return [
        max((DTYPE_TOLERANCES.get(t, DEFAULT_TOLERANCE) for t in types), default=DEFAULT_TOLERANCE)
        for types in live_dtypes(model)
    ]


def tolerance_reason(model: ir.Model, output_index: int) -> str:
    """``bfloat16 in its computation``: why an output's default tolerance is what it is."""
    types = live_dtypes(model)[output_index]
    lowest = max(
        (t for t in types if t in DTYPE_TOLERANCES), key=DTYPE_TOLERANCES.get, default=None
    )
    return f"{lowest.name.lower()} in its computation" if lowest is not None else ""


def live_dtypes(model: ir.Model) -> list[set[ir.DataType]]:
    """Per graph output, the types of the values it is computed from, and the targets of the
    Casts on the way: graph inputs, initializers and node inputs and outputs with a known
    type, back from the output through producers; a node with subgraphs counts with
    everything in them (and the outer values they read)."""
    result = []
    for output in model.graph.outputs:
        found: set[ir.DataType] = set()
        seen_nodes: set[int] = set()
        stack: list[ir.Value | None] = [output]
        seen_values: set[int] = set()
        while stack:
            value = stack.pop()
            if value is None or id(value) in seen_values:
                continue
            seen_values.add(id(value))
            if value.dtype is not None:
                found.add(value.dtype)
            node = value.producer()
            if node is None or id(node) in seen_nodes:
                continue
            nodes = [node]
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    nodes.extend(ir.traversal.RecursiveGraphIterator(attr.value))
                elif attr.type == ir.AttributeType.GRAPHS:
                    for graph in attr.value:
                        nodes.extend(ir.traversal.RecursiveGraphIterator(graph))
            for inner in nodes:
                seen_nodes.add(id(inner))
                to = inner.attributes.get("to") if inner.op_type == "Cast" else None
                if to is not None and isinstance(to.value, int):
                    with contextlib.suppress(ValueError):  # not a type (a hostile model)
                        found.add(ir.DataType(to.value))
                found.update(v.dtype for v in inner.outputs if v is not None and v.dtype)
                stack.extend(inner.inputs)
        result.append(found)
    return result


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
