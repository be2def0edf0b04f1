"""Comparing two models' outputs in ONNX Runtime on the same inputs: ``graphopt compare``.

The inputs are the ones verification would use (:class:`graphopt.verify.Verifier` on model
A): the user's ``.npz`` as given, or generated ones (seeded) at the requested or default
shape plus, where A has symbolic dims, a second shape A runs at. Both models run on every input set;
per output and shape: max abs error, the error relative to A's largest magnitude
(:func:`graphopt.output_errors.compare`: the project's measure, with the same allowance for a
saturated Sigmoid's rounding), cosine, and the share of positions whose argmax over the
last axis agrees (:func:`graphopt.passes.calibration.fidelity.measure`). A float output
passes when its relative error is at most ``rtol`` and, when ``cos_min`` is given, its
cosine at least that. An integer, bool or string output passes only when equal everywhere,
whatever ``rtol`` says (the same rule as verification); its max abs / rel err / cosine are
still the real ones, so that "off by 50 in 9000" reads as such. Sequence, optional and map
outputs are compared element by element (one row per output, its worst element): a
different length, presence or key set fails.

Models that do not line up (other input or output names, an output of another shape or
dtype) fail the comparison with the reason; a model that cannot be read is bad input.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.backends.ort import CPU, SessionConfig, create_session, resolve_providers
from graphopt.backends.ort_bench import json_safe, refuse_unfeedable_inputs
from graphopt.backends.ort_custom_ops import uses_own_kernels
from graphopt.calibration import load_npz
from graphopt.errors import UserInputError
from graphopt.input_dims import graph_inputs, non_tensor_kind, parse_input_shapes
from graphopt.ortrun import run_session
from graphopt.output_errors import (
    SCALE_FLOOR,
    OutputError,
    compare,
    output_resolutions,
    scaled_cosine,
)
from graphopt.tolerances import default_tolerance
from graphopt.verify import NothingToCompare, VerificationUnavailable, Verifier

# Histogram of |a - b| / max|a|: exact, then one bucket per decade from 1e-9 up to 1.
HISTOGRAM_EDGES = tuple(10.0**k for k in range(-9, 1))


@dataclass
class CompareRequest:
    a: str
    b: str
    inputs: str | None = None  # an .npz of one array per input; None: generated
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    rtol: float | None = None  # None: verification's default for A's float type
    cos_min: float | None = None
    histogram: bool = False
    config: SessionConfig = field(default_factory=lambda: SessionConfig(opt_level="disable"))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> CompareRequest:
        if args.inputs is not None and args.seed is not None:
            # The seed only generates inputs; it was ignored without a word.
            raise UserInputError(
                f"--seed {args.seed}: only generated inputs are seeded, and --inputs "
                f"{args.inputs} is used as given; leave one out"
            )
        if args.rtol is not None and not args.rtol >= 0:
            raise UserInputError("--rtol: must be 0 or more")
        if args.cos_min is not None and not -1 <= args.cos_min <= 1:
            raise UserInputError("--cos-min: must be between -1 and 1")
        if args.threads < 0:
            raise UserInputError("--threads: must be 0 (ORT's default) or more")
        config = SessionConfig(
            providers=resolve_providers(args.provider),
            threads=args.threads,
            opt_level=args.opt_level,
        )
        return cls(
            a=args.model_a,
            b=args.model_b,
            inputs=args.inputs,
            input_shapes=parse_input_shapes(args.input_shape),
            seed=0 if args.seed is None else args.seed,
            rtol=args.rtol,
            cos_min=args.cos_min,
            histogram=args.histogram,
            config=config,
        )


@dataclass
class OutputComparison:
    """One output at one input shape."""

    shape_index: int
    name: str
    shape: tuple[int, ...] | None  # None: a sequence, optional or map (see ``layout``)
    max_abs: float
    max_rel: float
    cosine: float
    argmax_agreement: float | None
    ok: bool
    problem: str = ""  # why it failed, when it did
    # Counts per bucket: exact, < 1e-9, [1e-9, 1e-8), ..., [1e-1, 1), >= 1 (relative error).
    histogram: list[int] | None = None
    # What A's output is: "tensor", "sequence", "optional" or "map", and its dims in words
    # ("2x3", "scalar", "sequence of 2: 2x3, scalar", "optional: absent", "map of 3").
    kind: str = "tensor"
    layout: str = ""

    @property
    def empty(self) -> bool:
        """A tensor with no elements (in A, and B alike, else it failed): nothing compared,
        so its cosine says nothing."""
        return self.shape is not None and 0 in self.shape and not self.problem


@dataclass
class CompareResult:
    a: str
    b: str
    inputs: str  # where the inputs came from: the file, or "generated (seed N)"
    shapes: list[str]
    shape_note: str
    rtol: float
    cos_min: float | None
    config: SessionConfig
    rows: list[OutputComparison] = field(default_factory=list)
    # The first reason the comparison failed ("" when it passed).
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def run_compare(request: CompareRequest) -> CompareResult:
    """Run both models on the same inputs and measure every output (see the module doc)."""
    model_a = _load(request.a)
    model_b = _load(request.b)
    rtol = default_tolerance(model_a) if request.rtol is None else request.rtol
    feeds = load_npz(request.inputs, "--inputs") if request.inputs is not None else None
    source = request.inputs if request.inputs is not None else f"generated (seed {request.seed})"
    result = CompareResult(
        request.a, request.b, source, [], "", rtol, request.cos_min, request.config
    )
    result.reason = _mismatch(model_a, model_b)
    if result.reason:
        return result
    _refuse_non_tensor_inputs(request.a, model_a)
    refuse_unfeedable_inputs(request.a, model_a, "compare")
    try:
        verifier = Verifier(
            model_a,
            input_shapes=request.input_shapes,
            tolerance=rtol,
            seed=request.seed,
            feeds=feeds,
            feeds_source=f"--inputs {request.inputs}",
            measure_ort_floors=False,  # compare reads the references, never check()
        )
    except NothingToCompare as exc:
        # Empty in A proves nothing, unless B differs (not empty): that is a difference.
        if _differs_where_a_is_empty(request, model_a, model_b, feeds, result):
            return result
        raise UserInputError(f"{request.a}: nothing to compare: {exc}") from None
    except VerificationUnavailable as exc:
        message = _compare_wording(str(exc))
        raise UserInputError(f"{request.a}: ONNX Runtime cannot run it: {message}") from None
    input_sets, references = verifier.input_sets, verifier.references
    # A model without inputs is described by an empty string: say so instead.
    result.shapes = [text or "no inputs" for text in verifier.shapes]
    result.shape_note = verifier.shape_note
    if not graph_inputs(model_a):
        result.shape_note = "one shape: the model has no inputs"
    if feeds is not None:
        # The user's data as given: verification's second shape would cut or tile it.
        input_sets, references, result.shapes = input_sets[:1], references[:1], result.shapes[:1]
        result.shape_note = "your inputs, as given"
        if verifier.nondeterministic:
            outputs = model_a.graph.outputs
            random = ", ".join(repr(outputs[i].name) for i in verifier.nondeterministic)
            result.shape_note += f"; {random} not compared: differs between two runs of A"
    names = [v.name for v in model_a.graph.outputs]
    config = request.config
    if config.providers != (CPU,) or config.opt_level != "disable" or config.threads:
        # Verification ran A on the CPU without ORT's optimizations; here both models run
        # the way the user asked.
        session_a = _session(request.a, model_a, config)
        if isinstance(session_a, str):
            raise UserInputError(f"{request.a}: {session_a}")
        references = []
        for feeds_set in input_sets:
            try:
                references.append(run_session(session_a, names, feeds_set))
            except Exception as exc:
                raise UserInputError(f"{request.a}: ONNX Runtime fails: {_first(exc)}") from None
    session_b = _session(request.b, model_b, config)
    if isinstance(session_b, str):
        result.reason = f"{request.b}: {session_b}"
        return result
    resolutions = output_resolutions(model_a)
    # Outputs of unseeded random ops differ between two runs of A itself: comparing one run
    # of B with one of A says nothing of B. Left out, as optimize's verification leaves them
    # (its shape note, kept above, names them).
    compared = [i for i in range(len(names)) if i not in set(verifier.nondeterministic)]

    def kept(values: list[Any]) -> list[Any]:
        return [values[i] for i in compared]

    for index, feeds_set in enumerate(input_sets):
        at = f" at shape {index + 1} ({result.shapes[index]})" if len(result.shapes) > 1 else ""
        try:
            # By name, in A's order, whatever order B lists its outputs in.
            got = run_session(session_b, names, feeds_set)
        except Exception as exc:
            result.reason = f"{request.b}: ONNX Runtime fails{at}: {_first(exc)}"
            return result
        _add_rows(
            result,
            request,
            index,
            kept(names),
            kept(references[index]),
            kept(got),
            kept(resolutions),
            at,
        )
    empty = [name for name in kept(names) if _empty_everywhere(result.rows, name)]
    if empty:
        listed = ", ".join(repr(name) for name in empty)
        note = f"{listed} not compared: empty at every shape"
        result.shape_note = f"{result.shape_note}; {note}" if result.shape_note else note
    return result


def _empty_everywhere(rows: list[OutputComparison], name: str) -> bool:
    own = [row for row in rows if row.name == name]
    return bool(own) and all(row.empty for row in own)


def _add_rows(
    result: CompareResult,
    request: CompareRequest,
    index: int,
    names: list[str],
    references: list[Any],
    got: list[Any],
    resolutions: list[float],
    at: str = "",
) -> None:
    """Measure each output at input set ``index`` into ``result`` (its first failure the
    reason)."""
    for name, ref, out, resolution in zip(names, references, got, resolutions, strict=True):
        row = measure_output(index, name, ref, out, resolution, result.rtol, request.cos_min)
        if request.histogram:
            row.histogram = error_histogram(ref, out)
        result.rows.append(row)
        if not row.ok and not result.reason:
            result.reason = f"output {name!r}: {row.problem}{at}"


def _differs_where_a_is_empty(
    request: CompareRequest,
    model_a: Any,
    model_b: Any,
    feeds: dict[str, np.ndarray] | None,
    result: CompareResult,
) -> bool:
    """Whether B differs on the inputs where every output of A is empty (verification's
    refusal: empty against empty proves nothing), ``result`` then holding the rows and the
    reason. B used to go unrun, so an empty A against a non-empty B read "nothing to
    compare" (exit 2) instead of the difference it is (exit 1)."""
    from graphopt.inputs import check_feeds, describe_shapes, input_shapes, make_inputs

    given = request.input_shapes
    if feeds is None:  # the first set verification generated, as it generates it
        shapes = input_shapes(model_a, given)
        feeds_set = make_inputs(model_a, given, seed=request.seed, shapes=shapes)
    else:
        feeds_set = check_feeds(model_a, feeds, f"--inputs {request.inputs}", given)
        shapes = {name: array.shape for name, array in feeds_set.items()}
    names = [v.name for v in model_a.graph.outputs]
    session_a = _session(request.a, model_a, request.config)
    if isinstance(session_a, str):
        return False  # verification ran A; another session config that fails: keep its word
    references = run_session(session_a, names, feeds_set)
    result.shapes = [describe_shapes(model_a, shapes) or "no inputs"]
    session_b = _session(request.b, model_b, request.config)
    if isinstance(session_b, str):
        result.reason = f"{request.b}: {session_b}"
        return True
    try:
        got = run_session(session_b, names, feeds_set)
    except Exception as exc:
        result.reason = f"{request.b}: ONNX Runtime fails: {_first(exc)}"
        return True
    _add_rows(result, request, 0, names, references, got, output_resolutions(model_a))
    if not result.reason:
        result.rows.clear()  # empty in both: the refusal stands
    return bool(result.reason)


def measure_output(
    index: int,
    name: str,
    ref: Any,
    got: Any,
    resolution: float,
    rtol: float,
    cos_min: float | None,
) -> OutputComparison:
    """The measures of one output, and whether they are within tolerance.

    ``ref`` and ``got`` are what ONNX Runtime returns: an array, or for a sequence, optional
    or map output a list, None or dict. Those used to go through ``np.asarray``, which
    crashed on a ragged sequence and stacked an even one; they are compared element by
    element now. Integer and bool outputs used to show verification's 0/1 pass flag as max
    abs, rel err and cosine, and passed under a large enough ``--rtol``.
    """
    # Imported here: the passes package registers every pass on import (a quarter second).
    from graphopt.passes.calibration.fidelity import measure

    kind, layout = _kind(ref), _layout(ref)
    shape = tuple(np.shape(ref)) if kind == "tensor" else None
    pairs, problem = _pairs(ref, got)
    if problem:
        return OutputComparison(
            index,
            name,
            shape,
            math.inf,
            math.inf,
            0.0,
            None,
            False,
            problem,
            kind=kind,
            layout=layout,
        )
    measured = [_measure_pair(label, r, g, resolution) for label, r, g in pairs]
    max_abs = max((m.error.max_abs for m in measured), default=0.0)
    max_rel = max((m.error.max_rel for m in measured), default=0.0)
    cosine = min((m.error.cosine for m in measured), default=1.0)
    argmax = None
    if kind == "tensor" and measured and measured[0].error.shape_ok:
        r, g = pairs[0][1], pairs[0][2]
        if r.dtype.kind in "fc" and r.size:
            argmax = measure([name], [r], [g])[0].argmax_agreement
    problem = next((m.problem for m in measured if m.problem), "")
    exact = [m for m in measured if m.exact]
    differing = sum(m.differing for m in exact)
    if not problem and differing:
        total = sum(m.size for m in exact)
        dtypes = "/".join(dict.fromkeys(m.dtype for m in exact))
        problem = (
            f"{dtypes} values differ in {differing} of {total} elements (integer, bool and "
            "string outputs must match exactly; --rtol applies to floats)"
        )
    elif not problem and not max_rel <= rtol:  # NaN fails too
        problem = f"error {max_rel:.3g} relative to its largest magnitude > --rtol {rtol:g}"
    elif not problem and cos_min is not None and not cosine >= cos_min:
        problem = f"cosine {cosine:.6f} < --cos-min {cos_min:g}"
    return OutputComparison(
        index,
        name,
        shape,
        max_abs,
        max_rel,
        cosine,
        argmax,
        not problem,
        problem,
        kind=kind,
        layout=layout,
    )


# Kinds of numpy dtype that must match exactly: integers, bool, strings and objects.
EXACT_KINDS = "iubOUS"


@dataclass
class _Measured:
    """One tensor of an output (the output itself, or one element of a sequence or map)."""

    error: OutputError
    problem: str = ""  # a shape/dtype or non-finite mismatch
    exact: bool = False  # integer, bool or string: must be equal everywhere
    dtype: str = ""
    differing: int = 0  # elements that differ (exact kinds)
    size: int = 0


def _measure_pair(label: str, ref: np.ndarray, got: np.ndarray, resolution: float) -> _Measured:
    # output_errors.compare's cosine overflows on float64 values near 1e200 (NaN, with numpy's
    # warnings on stderr); it is measured again below on scaled values.
    with np.errstate(over="ignore", invalid="ignore"):
        error = compare(label, ref, got, resolution)
    where = f"{label}: " if label else ""
    if not error.shape_ok:
        return _Measured(error, where + error.detail.replace("->", "in A, B has"))
    if error.detail:
        return _Measured(error, where + error.detail)
    if ref.dtype.kind not in EXACT_KINDS:
        if _all_nan(ref):
            # NaN in A and B alike counts as equal, so an all-NaN output (NaN inputs, say)
            # passed having compared no value at all.
            nan = f"every value is NaN in A and B ({ref.size} elements), so nothing was compared"
            return _Measured(error, where + nan)
        error.cosine = _cosine(ref, got)
        return _Measured(error)
    differing = int(np.count_nonzero(ref != got))
    if ref.dtype.kind in "iub":
        # output_errors.compare gives its pass/fail (0 or 1) here: measure the difference itself.
        error = _integer_error(label, ref, got)
    return _Measured(error, "", True, str(ref.dtype), differing, int(ref.size))


def _integer_error(name: str, ref: np.ndarray, got: np.ndarray) -> OutputError:
    """Max abs, error relative to the largest magnitude, and cosine of integer (or bool)
    tensors of one shape, as :func:`graphopt.output_errors.compare` measures floats."""
    a = ref.astype(np.float64).ravel()
    b = got.astype(np.float64).ravel()
    if a.size == 0:
        return OutputError(name, 0.0, 0.0, 1.0, 0.0)
    diff = np.abs(a - b)
    max_abs = float(diff.max())
    # An integer's smallest nonzero magnitude is 1: with the float floor (1e-6), an all-zero
    # A against a 1 read "rel err 1e+06".
    scale = max(float(np.abs(a).max()), 1.0)
    return OutputError(name, max_abs, max_abs / scale, _cosine(a, b), float(diff.mean()))


def _all_nan(array: np.ndarray) -> bool:
    """Whether a non-empty float tensor holds NaN only (False for types without NaN)."""
    try:
        return bool(array.size) and bool(np.isnan(array).all())
    except TypeError:  # an integer-like ml_dtypes type (int4): no NaN
        return False


def _cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Cosine of two same-shaped numeric tensors over the positions finite in both, computed
    on values scaled by their largest magnitude: float64 values near 1e200 overflowed the
    dot product (NaN, so a model compared with itself failed --cos-min). Two all-zero
    tensors are alike (1); one all-zero against another is not (0)."""
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(got, dtype=np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    return scaled_cosine(a, b, float(np.abs(a - b).max(initial=0.0)))


def _pairs(ref: Any, got: Any, label: str = "") -> tuple[list[tuple[str, Any, Any]], str]:
    """The tensors of two outputs, paired (label, A's, B's) where their structure matches;
    else why it does not (a different kind, sequence length, optional presence, key set)."""
    where = f"{label}: " if label else ""
    kinds = _kind(ref), _kind(got)
    if kinds[0] != kinds[1]:
        if "optional" in kinds:  # ORT returns a present optional as its value
            shown = ["absent" if v is None else "present" for v in (ref, got)]
            return [], f"{where}optional {shown[0]} in A, {shown[1]} in B"
        return [], f"{where}{_article(kinds[0])} in A, {_article(kinds[1])} in B"
    if ref is None:
        return [], ""  # absent in both
    if isinstance(ref, dict):
        keys_a, keys_b = sorted(map(repr, ref)), sorted(map(repr, got))
        if keys_a != keys_b:
            return [], f"{where}map keys differ: A has {_few(keys_a)}; B has {_few(keys_b)}"
        items = [(f"{label}[{key!r}]", ref[key], got[key]) for key in ref]
    elif isinstance(ref, (list, tuple)):
        if len(ref) != len(got):
            return [], f"{where}sequence of {len(ref)} in A, {len(got)} in B"
        items = [
            (f"{label or 'element'} {i}", r, g)
            for i, (r, g) in enumerate(zip(ref, got, strict=True))
        ]
    else:
        return [(label, np.asarray(ref), np.asarray(got))], ""
    pairs: list[tuple[str, Any, Any]] = []
    for item_label, r, g in items:
        found, problem = _pairs(r, g, item_label)
        if problem:
            return [], problem
        pairs.extend(found)
    return pairs, ""


def _kind(value: Any) -> str:
    if value is None:
        return "optional"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return "tensor"


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _layout(value: Any) -> str:
    """An output's dims in words: ``2x3``, ``scalar``, ``sequence of 2: 2x3, scalar``,
    ``sequence of 4: 2x3 each``, ``optional: absent``, ``map of 3``."""
    if value is None:
        return "optional: absent"
    if isinstance(value, dict):
        return f"map of {len(value)}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "sequence of 0"
        parts = [_layout(v) for v in value]
        if len(set(parts)) == 1:
            return f"sequence of {len(parts)}: {parts[0]}{' each' if len(parts) > 1 else ''}"
        return f"sequence of {len(parts)}: {_few(parts, 3)}"
    return "x".join(str(d) for d in np.shape(value)) or "scalar"


def error_histogram(ref: Any, got: Any) -> list[int] | None:
    """Counts of |a - b| / max|a| per bucket (exact, then per decade; see
    :data:`HISTOGRAM_EDGES`), over every tensor of the output (a sequence's or map's
    elements each at its own scale); None where a tensor is not numeric or the two outputs
    do not line up (another shape, length, key set). A sequence used to reach here as a
    list and fail on ``.shape``."""
    pairs, problem = _pairs(ref, got)
    if problem or not pairs:
        return None
    counts = [_tensor_histogram(r, g) for _, r, g in pairs]
    if any(c is None for c in counts):
        return None
    return [sum(column) for column in zip(*counts, strict=True)]  # type: ignore[misc]


def _tensor_histogram(ref: np.ndarray, got: np.ndarray) -> list[int] | None:
    numeric = "fciub"
    if ref.shape != got.shape or ref.dtype.kind not in numeric or got.dtype.kind not in numeric:
        return None
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(got, dtype=np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    scale = max(float(np.abs(a[finite]).max()) if finite.any() else 0.0, SCALE_FLOOR)
    # Differences of finite positions only: inf - inf warned "invalid value in subtract".
    # 1e308 - (-1e308) overflows to inf, in the ">= 1" bucket where it belongs anyway.
    rel = np.full(a.shape, np.inf)
    with np.errstate(over="ignore"):
        rel[finite] = np.abs(a[finite] - b[finite]) / scale
    # Same non-finite values on both sides are equal, as verification counts them.
    same = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
    rel = np.where(same, 0.0, rel)
    exact = int(np.count_nonzero(rel == 0))
    nonzero = rel[rel > 0]
    edges = np.array((0.0, *HISTOGRAM_EDGES, math.inf))
    counts, _ = np.histogram(nonzero, bins=edges)
    # np.histogram's last bin is closed: an infinite error belongs in ">= 1" anyway.
    return [exact, *(int(c) for c in counts)]


def histogram_labels() -> list[str]:
    """Bucket names matching :func:`error_histogram`'s counts."""
    labels = ["exact", f"< {HISTOGRAM_EDGES[0]:.0e}"]
    labels += [f"{lo:.0e}-{hi:.0e}" for lo, hi in itertools.pairwise(HISTOGRAM_EDGES)]
    labels.append(f">= {HISTOGRAM_EDGES[-1]:.0e}")
    return labels


def to_json(result: CompareResult) -> dict[str, Any]:
    """The result as strict JSON-ready data: a non-finite number as text (``"inf"``,
    ``"nan"``; :func:`~graphopt.backends.ort_bench.json_safe`), as JSON has none. ``--rtol
    inf`` printed ``Infinity``, which JSON parsers refuse."""
    return json_safe(
        {
            "a": result.a,
            "b": result.b,
            "ok": result.ok,
            "reason": result.reason,
            "inputs": result.inputs,
            "shapes": result.shapes,
            "shape_note": result.shape_note,
            "rtol": result.rtol,
            "cos_min": result.cos_min,
            "session": result.config.to_json(),
            "histogram_buckets": histogram_labels(),
            "outputs": [
                {
                    "shape_index": row.shape_index + 1,
                    "name": row.name,
                    "kind": row.kind,
                    "shape": None if row.shape is None else list(row.shape),
                    "dims": row.layout,
                    "max_abs": row.max_abs,
                    "max_rel": row.max_rel,
                    "cosine": None if row.empty else row.cosine,
                    "empty": row.empty,
                    "argmax_agreement": row.argmax_agreement,
                    "ok": row.ok,
                    "problem": row.problem,
                    "histogram": row.histogram,
                }
                for row in result.rows
            ],
        }
    )


def _compare_wording(message: str) -> str:
    """Verification's advice in compare's flags: compare takes your data with ``--inputs``
    (``--verify-inputs`` is optimize's)."""
    return message.replace(
        "verify on your own data with --verify-inputs", "give your own data with --inputs"
    )


def _load(path: str):
    from graphopt import io

    if os.fspath(path).lower().endswith(".ort"):
        raise UserInputError(f"{path}: compare reads ONNX models (.onnx), not the .ort format")
    try:
        # Map outputs (ZipMap) untyped: onnx-ir cannot hold their type, and compare only runs
        # the model (ONNX Runtime infers it again).
        return io.load(path, untype_maps=True).model
    except UserInputError:
        raise
    except Exception as exc:  # a file onnx-ir chokes on is the file's fault
        raise UserInputError(f"{path}: cannot read the model ({_first(exc)})") from None


def _mismatch(model_a, model_b) -> str:
    """Why the two models cannot be compared output by output ("" when they can)."""
    ins_a = [(v.name, v.dtype) for v in graph_inputs(model_a)]
    ins_b = [(v.name, v.dtype) for v in graph_inputs(model_b)]
    if sorted(ins_a, key=str) != sorted(ins_b, key=str):
        # ';' between the lists: ',' separates the inputs within each.
        return f"inputs differ: A has {_listed(ins_a)}; B has {_listed(ins_b)}"
    outs_a = [v.name for v in model_a.graph.outputs]
    outs_b = [v.name for v in model_b.graph.outputs]
    if sorted(outs_a) != sorted(outs_b):
        return f"outputs differ: A has {', '.join(outs_a)}; B has {', '.join(outs_b)}"
    return ""


def _listed(inputs: list) -> str:
    return ", ".join(f"{name} ({dtype})" for name, dtype in inputs) or "no inputs"


def _refuse_non_tensor_inputs(path: str, model) -> None:
    """A one-line error for an input compare cannot feed: it generates (and ``--inputs``
    holds) tensors only. The message used to end "run with --no-verify", a flag compare
    does not have."""
    for value in graph_inputs(model):
        kind = non_tensor_kind(value)
        if kind is not None:
            raise UserInputError(
                f"{path}: input {value.name!r} is {kind}, not a tensor: compare feeds tensors "
                "only (generated, or from --inputs), so it cannot run this model"
            )


def _session(path: str, model, config: SessionConfig) -> Any:
    """A session, or the one-line reason ORT refuses the model."""
    try:
        return create_session(path, config, model)
    except UserInputError as exc:
        if uses_own_kernels(model) and not str(exc).startswith(path):
            # Of the two models, name the one that needs graphopt's kernels.
            raise UserInputError(f"{path}: {exc}") from None
        raise
    except Exception as exc:
        return f"ONNX Runtime cannot load it: {_first(exc)}"


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
