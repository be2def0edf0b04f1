"""How far one output of a candidate moved from the reference's: the project's error measure.

:func:`compare` measures one output pair (max abs error, max error relative to the
reference's largest magnitude, cosine similarity; integer, bool and string outputs are right
only where equal; sequence, optional and map outputs element by element), allowing the
producing op's own rounding (:func:`output_resolutions`); :func:`worst_of` combines one output's
errors over several input shapes. A bool output of a comparison of two floats may flip where
the compared values nearly tie (:func:`near_boundary`, on margins that
:func:`graphopt.verify.boundary_margins` measures for the outputs :func:`compared_outputs`
names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

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
    cosine = scaled_cosine(a, b, max_abs)
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


def scaled_cosine(a: np.ndarray, b: np.ndarray, max_abs: float) -> float:
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
    return worst_of(tuple(compare(name, _as_array(r), _as_array(g), resolution) for r, g in pairs))


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


def worst_of(errors: tuple[OutputError, ...]) -> OutputError:
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


def compared_outputs(model: ir.Model) -> dict[int, tuple[str, str]]:
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
