"""Comparing two models' outputs in ONNX Runtime on the same inputs: ``graphopt compare``.

The inputs are the ones verification would use (:class:`graphopt.verify.Verifier` on model
A): the user's ``.npz`` as given, or generated ones (seeded) at the requested or default
shape plus, where A has symbolic dims, a second shape A runs at. Both models run on every input set;
per output and shape: max abs error, the error relative to A's largest magnitude
(:func:`graphopt.verify.compare`: the project's measure, with the same allowance for a
saturated Sigmoid's rounding), cosine, and the share of positions whose argmax over the
last axis agrees (:func:`graphopt.passes.calibration.fidelity.measure`). An output passes
when its relative error is at most ``rtol`` and, when ``cos_min`` is given, its cosine at
least that.

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
from graphopt.calibration import load_npz
from graphopt.errors import UserInputError
from graphopt.input_dims import graph_inputs, parse_input_shapes
from graphopt.ortrun import run_session
from graphopt.verify import (
    SCALE_FLOOR,
    NothingToCompare,
    VerificationUnavailable,
    Verifier,
    compare,
    default_tolerance,
    output_resolutions,
)

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
            seed=args.seed,
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
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    argmax_agreement: float | None
    ok: bool
    problem: str = ""  # why it failed, when it did
    # Counts per bucket: exact, < 1e-9, [1e-9, 1e-8), ..., [1e-1, 1), >= 1 (relative error).
    histogram: list[int] | None = None


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
    try:
        verifier = Verifier(
            model_a,
            input_shapes=request.input_shapes,
            tolerance=rtol,
            seed=request.seed,
            feeds=feeds,
            feeds_source=f"--inputs {request.inputs}",
        )
    except NothingToCompare as exc:
        raise UserInputError(f"{request.a}: nothing to compare: {exc}") from None
    except VerificationUnavailable as exc:
        raise UserInputError(f"{request.a}: ONNX Runtime cannot run it: {exc}") from None
    input_sets, references = verifier.input_sets, verifier.references
    result.shapes, result.shape_note = list(verifier.shapes), verifier.shape_note
    if feeds is not None:
        # The user's data as given: verification's second shape would cut or tile it.
        input_sets, references, result.shapes = input_sets[:1], references[:1], result.shapes[:1]
        result.shape_note = "your inputs, as given"
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
    for index, feeds_set in enumerate(input_sets):
        at = f" at shape {index + 1} ({result.shapes[index]})" if len(result.shapes) > 1 else ""
        try:
            # By name, in A's order, whatever order B lists its outputs in.
            got = run_session(session_b, names, feeds_set)
        except Exception as exc:
            result.reason = f"{request.b}: ONNX Runtime fails{at}: {_first(exc)}"
            return result
        rows = zip(names, references[index], got, resolutions, strict=True)
        for name, ref, out, resolution in rows:
            row = measure_output(index, name, ref, out, resolution, rtol, request.cos_min)
            if request.histogram:
                row.histogram = error_histogram(ref, out)
            result.rows.append(row)
            if not row.ok and not result.reason:
                result.reason = f"output {name!r}: {row.problem}{at}"
    return result


def measure_output(
    index: int,
    name: str,
    ref: np.ndarray,
    got: np.ndarray,
    resolution: float,
    rtol: float,
    cos_min: float | None,
) -> OutputComparison:
    """The measures of one output, and whether they are within tolerance."""
    # Imported here: the passes package registers every pass on import (a quarter second).
    from graphopt.passes.calibration.fidelity import measure

    ref, got = np.asarray(ref), np.asarray(got)
    error = compare(name, ref, got, resolution)
    argmax = None
    if error.shape_ok and ref.dtype.kind in "fc" and ref.size:
        argmax = measure([name], [ref], [got])[0].argmax_agreement
    problem = ""
    if not error.shape_ok:
        problem = error.detail.replace("->", "in A, B has")
    elif error.detail:
        problem = error.detail
    elif error.max_rel > rtol:
        problem = f"error {error.max_rel:.3g} relative to its largest magnitude > --rtol {rtol:g}"
    elif cos_min is not None and error.cosine < cos_min:
        problem = f"cosine {error.cosine:.6f} < --cos-min {cos_min:g}"
    return OutputComparison(
        index,
        name,
        tuple(ref.shape),
        error.max_abs,
        error.max_rel,
        error.cosine,
        argmax,
        not problem,
        problem,
    )


def error_histogram(ref: np.ndarray, got: np.ndarray) -> list[int] | None:
    """Counts of |a - b| / max|a| per bucket (exact, then per decade; see
    :data:`HISTOGRAM_EDGES`); None where the output is not a float tensor of equal shape."""
    if ref.shape != got.shape or ref.dtype.kind not in "fc" or got.dtype.kind not in "fc":
        return None
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(got, dtype=np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    scale = max(float(np.abs(a[finite]).max()) if finite.any() else 0.0, SCALE_FLOOR)
    rel = np.where(finite, np.abs(a - b) / scale, np.inf)
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
    """The result as JSON-ready data."""
    return {
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
                "shape": list(row.shape),
                "max_abs": _finite_or_text(row.max_abs),
                "max_rel": _finite_or_text(row.max_rel),
                "cosine": row.cosine,
                "argmax_agreement": row.argmax_agreement,
                "ok": row.ok,
                "problem": row.problem,
                "histogram": row.histogram,
            }
            for row in result.rows
        ],
    }


def _finite_or_text(value: float) -> float | str:
    # JSON has no infinity; "inf" says what it is.
    return value if math.isfinite(value) else str(value)


def _load(path: str):
    from graphopt import io

    if os.fspath(path).lower().endswith(".ort"):
        raise UserInputError(f"{path}: compare reads ONNX models (.onnx), not the .ort format")
    try:
        return io.load(path).model
    except UserInputError:
        raise
    except Exception as exc:  # a file onnx-ir chokes on is the file's fault
        raise UserInputError(f"{path}: cannot read the model ({_first(exc)})") from None


def _mismatch(model_a, model_b) -> str:
    """Why the two models cannot be compared output by output ("" when they can)."""
    ins_a = [(v.name, v.dtype) for v in graph_inputs(model_a)]
    ins_b = [(v.name, v.dtype) for v in graph_inputs(model_b)]
    if sorted(ins_a, key=str) != sorted(ins_b, key=str):
        return f"inputs differ: A has {_listed(ins_a)}, B has {_listed(ins_b)}"
    outs_a = [v.name for v in model_a.graph.outputs]
    outs_b = [v.name for v in model_b.graph.outputs]
    if sorted(outs_a) != sorted(outs_b):
        return f"outputs differ: A has {', '.join(outs_a)}; B has {', '.join(outs_b)}"
    return ""


def _listed(inputs: list) -> str:
    return ", ".join(f"{name} ({dtype})" for name, dtype in inputs)


def _session(path: str, model, config: SessionConfig) -> Any:
    """A session, or the one-line reason ORT refuses the model."""
    try:
        return create_session(path, config, model)
    except UserInputError:
        raise
    except Exception as exc:
        return f"ONNX Runtime cannot load it: {_first(exc)}"


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
