"""How far a lossy pass moved a model's outputs, and on which samples that is measured.

Per output: max error relative to the original's largest magnitude (the project's error
measure), mean absolute error, and the mean over samples of the cosine between original and
pruned output rows (per-sample cosine is what embedding users look at). Integer and bool
outputs (an ArgMax's class ids, a TopK's indices) get the same measures of their values, as
``graphopt compare`` gives them, plus the share of elements equal to the original's: like
verification and ``compare``, an integer output is right only where it is equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.calibration.activations import sequence_mask
from graphopt.passes.calibration.samples import CalibrationSet

if TYPE_CHECKING:
    from graphopt.registry import PassContext


@dataclass
class Fidelity:
    output: str
    max_rel: float
    mean_abs: float
    mean_cosine: float
    # Share of positions whose argmax over the last axis (trailing size-1 axes dropped) is the
    # same (a classifier's or a decoder's prediction); None where the output has no class axis.
    argmax_agreement: float | None = None
    # Integer, bool and string outputs: the share of elements equal to the original's (they
    # are right only where equal); None for float outputs, whose rounding is never exact.
    equal_share: float | None = None

    def to_json(self) -> dict:
        return {
            "output": self.output,
            "max_rel": self.max_rel,
            "mean_abs": self.mean_abs,
            "mean_cosine": self.mean_cosine,
            "argmax_agreement": self.argmax_agreement,
            "equal_share": self.equal_share,
        }


def outputs_on(
    model: ir.Model, calib: CalibrationSet, optimize: bool = True, *, reference: bool = False
) -> list[np.ndarray]:
    """Every output of ``model`` on every sample, concatenated along the sample axis
    (``optimize``: with ONNX Runtime's graph optimizations on). ``reference``: ``model`` is
    the one the samples are measured against (the original), so any failure of its run is
    the samples' (a generated TopK k past the axis, a Loop whose trip count the data sets)."""
    from graphopt.ortrun import run_session
    from graphopt.sessions import make_session

    session = make_session(model, optimize=optimize)
    names = [o.name for o in session.get_outputs()]
    # Full padded width: outputs of every batch must line up to be concatenated.
    try:
        chunks = [run_session(session, names, feeds) for feeds in calib.batches(trim=False)]
    except Exception as exc:
        # ORT's InvalidArgument: feeds of the wrong shape or type for the inputs. The
        # original is measured first, so this is the calibration file's, not a rewrite's.
        if type(exc).__name__ != "InvalidArgument" and not (reference and _ort_error(exc)):
            raise
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"calibration data ({calib.source}) does not run through the model: {line[:200]}"
            + (
                "; these are generated samples: give real data with --calib FILE.npz"
                if calib.source == "random"
                else ""
            )
        ) from None
    # Samples each run was fed: ``batch`` along the batch axes, fewer in the last run; one
    # where the samples have no batch axis (stacked: fed one at a time).
    counts = [min(calib.batch, calib.count - start) for start in range(0, calib.count, calib.batch)]
    return [_joined([_flat(c[i]) for c in chunks], counts) for i in range(len(names))]


def _ort_error(exc: BaseException) -> bool:
    # ONNX Runtime's own exception types (Fail, RuntimeException, ...), not a Python error
    # or the machine running out of memory.
    return type(exc).__module__.startswith("onnxruntime") and "bad_alloc" not in str(exc)


def _flat(value) -> np.ndarray:
    """A sequence, optional or map output as one flat array of its elements (so the same
    measures apply): a list's tensors concatenated, an empty optional as no values."""
    if isinstance(value, np.ndarray):
        return value
    if value is None:
        return np.zeros(0, np.float32)
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value, key=repr)]
    parts = [_flat(v) if not np.isscalar(v) else np.asarray([v]) for v in value]
    if not parts:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(p).ravel() for p in parts])


def _joined(pieces: list[np.ndarray], counts: list[int] | None = None) -> np.ndarray:
    """One output's runs as one array whose first axis is the measures' samples (each one a
    row of the cosine, an argmax position set): the runs laid end to end along their batch
    axis where the output has one, else one row per run.

    The batch axis of an output need not be the first (``[2, B, H]`` recurrent states) and
    an output may have none: a scalar per run, or a ``[16]`` vector of a model whose input
    has no batch axis (fed one sample a run). Those used to be laid end to end along axis 0,
    so each element was a "sample" and the mean cosine the share of elements of the same
    sign (0.9961 for a per-sample cosine of 0.99996). ``counts``: the samples each run was
    fed (in order); an output with no axis of that size in every run has no batch axis, and
    so has any output of runs of one sample whose first axis is not 1. Reference and
    candidate are joined alike, which is all the measures need.
    """
    first = pieces[0]
    if first.ndim == 0:
        return np.stack(pieces)
    if all(p.shape == first.shape for p in pieces):
        if counts is not None and _no_batch_axis(pieces, counts):
            return np.stack(pieces)
        return np.concatenate(pieces)
    differ = {
        axis
        for p in pieces
        if p.ndim == first.ndim
        for axis in range(first.ndim)
        if p.shape[axis] != first.shape[axis]
    }
    if len(differ) == 1 and all(p.ndim == first.ndim for p in pieces):
        return np.concatenate(pieces, axis=differ.pop())
    return np.concatenate([p.reshape(-1) for p in pieces])


def _no_batch_axis(pieces: list[np.ndarray], counts: list[int]) -> bool:
    """Whether same-shaped runs of an output hold no batch axis: no axis is as long as the
    samples each run was fed, or the runs are of one sample each and the first axis is not
    1 (a size-1 axis past the first, a ``[16, 1]`` column, is no evidence of a batch axis,
    and a run of one sample is that sample whichever axis holds it)."""
    if len(counts) != len(pieces):
        return False
    runs = list(zip(pieces, counts, strict=True))
    if all(p.shape[0] == n for p, n in runs):
        return False  # batch-first: laid end to end as before
    if all(n == 1 for n in counts):
        return True
    return not any(all(p.shape[axis] == n for p, n in runs) for axis in range(pieces[0].ndim))


def padding_mask(calib: CalibrationSet) -> np.ndarray | None:
    """The [samples, sequence] mask of the calibration inputs, if they are padded sequences."""
    return sequence_mask(calib.arrays)


def measure(
    names: list[str],
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    mask: np.ndarray | None = None,
) -> list[Fidelity]:
    """Per output; positions a [samples, sequence] ``mask`` marks as padding are left out."""
    results = []
    for name, ref, got in zip(names, reference, candidate, strict=True):
        if ref.shape != got.shape:
            # Nothing lines up to be measured: the largest error, no agreement.
            inf = float("inf")
            exact = None if ref.dtype.kind in "fc" else 0.0
            results.append(Fidelity(name, inf, inf, 0.0, equal_share=exact))
            continue
        if ref.dtype.kind not in "fciub":
            # Strings (and objects) have no magnitude: equal or not, as verification has it.
            equal = ref == got
            share = float(np.mean(equal)) if equal.size else 1.0
            flag = 0.0 if share == 1.0 else 1.0
            results.append(Fidelity(name, flag, flag, 1.0 - flag, equal_share=share))
            continue
        a, b = ref.astype(np.float64), got.astype(np.float64)
        keep = None
        if mask is not None and a.ndim >= 2 and a.shape[:2] == mask.shape:
            # Padded positions compute garbage the model masks out downstream: not data.
            # Zeroing them keeps them out of max rel and cosine (a zero adds nothing to
            # either); the means are taken over ``keep`` alone, since a zeroed position
            # still counted as an error of 0 and an agreeing argmax there.
            keep = mask != 0
            a = np.where(keep.reshape(*keep.shape, *(1,) * (a.ndim - 2)), a, 0.0)
            b = np.where(keep.reshape(*keep.shape, *(1,) * (b.ndim - 2)), b, 0.0)
        fidelity = _measure_floats(name, a, b, keep)
        if ref.dtype.kind in "iub":
            # Integer and bool values are measured as numbers, as ``graphopt compare`` does
            # (its ``_integer_error``): an ArgMax off by 5 in 10% of samples used to read "max
            # rel 1, mean abs 0, cosine 0". Their own measure is the share of equal elements;
            # an argmax over an axis of indices or counts means nothing.
            equal = a == b
            if keep is not None and keep.any():
                equal = equal[keep]
            fidelity.equal_share = float(np.mean(equal)) if equal.size else 1.0
            fidelity.argmax_agreement = None
        results.append(fidelity)
    return results


def _measure_floats(
    name: str, a: np.ndarray, b: np.ndarray, keep: np.ndarray | None = None
) -> Fidelity:
    """One float output. Non-finite values are compared as verification compares them: the
    same NaN or infinity in both is equal (and left out of the numbers), a different one is
    an infinite error and a cosine of 0 for its sample. Without this, ``-inf - -inf`` (a Log
    of a Relu output) made every measure NaN and printed numpy warnings. ``keep``: the
    [samples, sequence] positions that are real tokens; the means are over those alone."""
    if not a.size:
        return Fidelity(name, 0.0, 0.0, 1.0)  # an empty output moved nowhere
    if keep is not None and not keep.any():
        keep = None  # nothing marked real: measure every position rather than none
    finite = np.isfinite(a) & np.isfinite(b)
    same = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
    differ = ~finite & ~same
    a, b = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
    rows_a = _unit_scale(a.reshape(len(a), -1) if a.ndim else a.reshape(1, -1))
    rows_b = _unit_scale(b.reshape(len(b), -1) if b.ndim else b.reshape(1, -1))
    norms = np.linalg.norm(rows_a, axis=1) * np.linalg.norm(rows_b, axis=1)
    cos = np.einsum("ij,ij->i", rows_a, rows_b) / np.where(norms > 0, norms, 1.0)
    # A row that is zero on one side only has no direction to compare: it moved entirely
    # (0), as verification counts it; zero on both sides is equal (1). It used to be 1
    # either way, so a class id turned from 3 to 0 kept a cosine of 1.
    equal_rows = np.all(rows_a == rows_b, axis=1)
    cos = np.where(norms > 0, np.clip(cos, -1.0, 1.0), np.where(equal_rows, 1.0, 0.0))
    cos = np.where(differ.reshape(len(rows_a), -1).any(axis=1), 0.0, cos)
    mean_cosine = float(cos.mean())
    if differ.any():
        return Fidelity(name, float("inf"), float("inf"), mean_cosine)
    diff = np.abs(a - b)
    scale = float(np.abs(a).max()) or 1.0
    mean_abs = float(diff[keep].mean()) if keep is not None else float(diff.mean())
    return Fidelity(
        name, float(diff.max() / scale), mean_abs, mean_cosine, _argmax_agreement(a, b, keep)
    )


def _argmax_agreement(a: np.ndarray, b: np.ndarray, keep: np.ndarray | None = None) -> float | None:
    # Trailing size-1 axes hold no classes: a classifier ending in a 1x1 Conv or a pool gives
    # [N, classes, 1, 1], whose class axis is the last one that is not 1.
    while a.ndim > 2 and a.shape[-1] == 1 and a.shape == b.shape:
        a, b = a[..., 0], b[..., 0]
    if a.ndim < 2 or a.shape[-1] < 2:
        return None
    same = a.argmax(axis=-1) == b.argmax(axis=-1)
    if keep is not None and same.ndim >= 2 and same.shape[:2] == keep.shape:
        # Only real tokens predict anything: a padded position "agreeing" is no agreement.
        return float(same[keep].mean())
    return float(np.mean(same))


def _unit_scale(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their largest magnitude: the cosine is unchanged, and squaring cannot
    overflow (outputs of a diverging model reach 1e38 in float32)."""
    peak = np.abs(rows).max(axis=1, keepdims=True)
    return rows / np.where(peak > 0, peak, 1.0)


def summary(fidelities: list[Fidelity]) -> str:
    """One line for the output with the worst cosine: every number is that output's, and
    with more than one output it is named. (It used to print the worst output's cosine and
    mean abs beside the largest max rel of any output, three numbers of two outputs.)"""
    # Integer outputs are judged by their share of equal values, not by the cosine of ids
    # or counts: the worst output is a float one where there is one.
    floats = [f for f in fidelities if f.equal_share is None]
    if floats:
        worst = min(floats, key=lambda f: f.mean_cosine)
        lead = f"cosine {worst.mean_cosine:.4f}"
    else:
        worst = min(fidelities, key=lambda f: f.equal_share or 0.0)
        lead = f"{worst.equal_share:.1%} equal"
    line = f"{lead}, max rel {worst.max_rel:.3g}, mean abs {worst.mean_abs:.3g}"
    if len(fidelities) > 1:
        line = f"{worst.output}: {line}"
        # Another output may still move further by max rel: say which, so no larger error
        # is hidden behind the worst-cosine output's line.
        larger = max(fidelities, key=lambda f: f.max_rel)
        if larger is not worst and larger.max_rel > worst.max_rel:
            line += f" ({larger.output}: max rel {larger.max_rel:.3g})"
        # An integer output (class ids) whose values moved: say how many are still equal.
        for f in fidelities:
            if f is not worst and f.equal_share is not None and f.equal_share < 1.0:
                line += f"; {f.output}: {f.equal_share:.1%} equal"
    return line


def fidelity_table(title: str, fidelity: dict[str, list[Fidelity]]):
    """A lossy pass's fidelity as a rich table: one row per output and sample set (phase)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False)
    for column in ("output", "samples", "max rel err", "mean abs err", "mean cosine", "argmax"):
        table.add_column(column, justify="left" if column in ("output", "samples") else "right")
    for phase, fidelities in fidelity.items():
        for f in fidelities:
            argmax = "" if f.argmax_agreement is None else f"{f.argmax_agreement:.1%}"
            if f.equal_share is not None:
                # An integer output's agreement is its share of equal values (an ArgMax
                # output's is its argmax agreement).
                argmax = f"{f.equal_share:.1%} equal"
            # The cosine of class ids or counts says nothing of them ("1.0000" beside 9% of
            # ArgMax ids moved): not shown; their share of equal values is.
            cosine = "-" if f.equal_share is not None else f"{f.mean_cosine:.4f}"
            table.add_row(f.output, phase, f"{f.max_rel:.3g}", f"{f.mean_abs:.3g}", cosine, argmax)
    return table


# Fitted samples a lossy pass's "calibration" fidelity is measured on (at most).
FIDELITY_SAMPLES = 64


def fidelity_sets(
    model: ir.Model,
    fit: CalibrationSet | None,
    held: CalibrationSet | None,
    context: PassContext,
    owner: str,
) -> tuple[dict[str, CalibrationSet], str]:
    """Where pass ``owner`` measures fidelity, and a line saying so: the first fitted samples
    and the held-out ones, else (no calibration file) generated inputs at the run's shapes."""
    if fit is not None:
        # The fitted samples' fidelity says how well the fit went, the held-out one whether
        # it carries over; a subset of the former says the first as well as all of them.
        shown = fit.first(FIDELITY_SAMPLES)
        sets = {"calibration": shown}
        if held is not None:
            sets["held-out"] = held
        extra = f", {held.count} held out" if held is not None else ", none held out"
        return sets, f"{shown.count} of the fitted samples of {fit.source}{extra}"
    from graphopt.errors import UserInputError
    from graphopt.passes.calibration.samples import random_calibration

    try:
        generated = random_calibration(model, dict(context.input_shapes), owner=owner)
    except UserInputError as exc:
        context.note(f"{owner}: fidelity not measured: {exc}")
        return {}, ""
    return {"generated": generated}, f"{generated.count} generated inputs (no --calib file)"
