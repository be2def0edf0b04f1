"""Differential verification: ONNX Runtime runs the original and the result on the same inputs.

The original runs once; its outputs are the reference for every later check. Per output we
report max abs error, max error relative to the reference's largest magnitude (the project's
error measure) and cosine similarity. ORT runs with its own graph optimizations off so that
what is compared is graphopt's rewrite, not ORT's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt import io
from graphopt.inputs import make_inputs

DEFAULT_TOLERANCE = 1e-4
# Outputs whose largest magnitude is below this are compared at this scale (see compare).
SCALE_FLOOR = 1e-6
# ORT's CPU Sigmoid (MLAS) is accurate in absolute, not relative, terms: its float32 outputs
# are off by up to 1.8e-7 (3 * 2**-24; measured against float64 over [-40, 40], ORT 1.32)
# and below ~1e-6 they are multiples of 2**-25. On a saturated sigmoid (PP-OCR det's
# probability map on random 32x32 inputs: max 3e-8) two exact rewrites of the logits (5.9e-7
# apart, relative) then differ by whole quanta: "off by 0.03 (rel)". For a float32 output the
# original computes with Sigmoid, differences up to 2**-21 (~4.8e-7: both runs' rounding,
# with margin) count as rounding; anything beyond counts in full. Other dtypes: not measured.
SIGMOID_RESOLUTION = 2.0**-21
# Serialize to memory below this; above it ORT reads a temporary file with external data.
IN_MEMORY_LIMIT_BYTES = 1 << 30


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


@dataclass
class VerifyResult:
    ok: bool
    outputs: list[OutputError] = field(default_factory=list)
    reason: str = ""

    @property
    def worst_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)


class VerificationUnavailable(Exception):
    """The original model cannot be run, so nothing can be compared."""


def make_session(model: ir.Model, threads: int = 0, optimize: bool = False):
    """An ORT CPU session for an in-memory model (temporary external data when large)."""
    import onnxruntime as ort  # imported here: --no-verify runs never pay for it

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # Fatal only: a model ORT cannot run is reported by graphopt in one line, not by ORT's
    # multi-line error log on the user's stderr.
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
    if io.total_tensor_bytes(model) < IN_MEMORY_LIMIT_BYTES:
        data = io.to_proto(model).SerializeToString()
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        io.save(model, path, external_data=True)
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_model(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from graphopt.ortrun import run_session

    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    return run_session(session, names, feeds)


def compare(name: str, ref: np.ndarray, got: np.ndarray, resolution: float = 0.0) -> OutputError:
    """Error of ``got`` against ``ref`` as graphopt measures it.

    ``resolution``: absolute differences up to this are the producing op's rounding; only the
    excess counts toward ``max_rel`` (``max_abs`` stays the raw difference).
    """
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
        return OutputError(name, err, err, 1.0 if equal else 0.0, err)
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
    # A reference whose largest magnitude is ~0 (e.g. a saturated sigmoid on generated
    # inputs) makes the relative measure meaningless: below SCALE_FLOOR it is absolute.
    scale = max(float(np.abs(a).max()), SCALE_FLOOR)
    max_rel = max(max_abs - resolution, 0.0) / scale
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.dot(a, b) / norm) if norm > 0 else (1.0 if max_abs == 0 else 0.0)
    return OutputError(name, max_abs, max_rel, cosine, float(diff.mean()))


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
    """Holds the reference outputs of the original model and checks candidates against them."""

    def __init__(
        self,
        original: ir.Model,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        seed: int = 0,
    ) -> None:
        self.tolerance = tolerance
        self.feeds = make_inputs(original, input_shapes, seed=seed)
        self.output_names = [v.name for v in original.graph.outputs]
        self.resolutions = output_resolutions(original)
        try:
            self.reference = run_model(original, self.feeds)
        except Exception as exc:
            raise VerificationUnavailable(_first_line(exc)) from None

    def rebased(self, reference: ir.Model) -> Verifier:
        """A verifier with the same inputs whose reference is ``reference``'s outputs."""
        other = object.__new__(Verifier)
        other.tolerance, other.feeds = self.tolerance, self.feeds
        other.output_names = [v.name for v in reference.graph.outputs]
        other.resolutions = output_resolutions(reference)
        try:
            other.reference = run_model(reference, self.feeds)
        except Exception as exc:
            raise VerificationUnavailable(_first_line(exc)) from None
        return other

    def check(self, candidate: ir.Model, tolerance: float | None = None) -> VerifyResult:
        tol = self.tolerance if tolerance is None else tolerance
        names = [v.name for v in candidate.graph.outputs]
        if names != self.output_names:
            return VerifyResult(False, reason=f"outputs changed: {self.output_names} -> {names}")
        try:
            got = run_model(candidate, self.feeds)
        except Exception as exc:
            return VerifyResult(
                False, reason=f"optimized model fails in ONNX Runtime: {_first_line(exc)}"
            )
        errors = [
            compare(n, r, g, res)
            for n, r, g, res in zip(names, self.reference, got, self.resolutions, strict=True)
        ]
        bad = [e for e in errors if not e.shape_ok or e.detail or e.max_rel > tol]
        reason = ""
        if bad:
            worst = bad[0]
            reason = worst.detail or f"output {worst.name!r} off by {worst.max_rel:.3g} (rel)"
        return VerifyResult(not bad, errors, reason)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:300]
