"""Mixed precision: keep the fewest, most sensitive layers in float until a fidelity target
holds. Generic over the quantization mode (int8-dynamic and static int8 both use it).

The caller gives three things:

* ``build(kept_float) -> ir.Model``: the model quantized except the named layers (a fresh
  model per call; the search never edits it);
* ``evaluate(model) -> Measured`` (mean cosine, max relative error, argmax agreement) against
  the float original on calibration (fit) samples: sensitivities are measured with it;
* a :class:`Target` (``--min-cosine``, ``--max-error`` and/or ``--min-agreement``), checked
  with ``check`` (by default ``evaluate``; the passes use :func:`target_check`: the worst of
  every fidelity row the report prints, held-out and calibration samples with ORT's
  optimizations on and off, refusing an agreement target the held-out samples cannot
  resolve), and the verdict said by :func:`conclude`.

:func:`search` measures each candidate layer's sensitivity once (by default the gain of
keeping only that layer in float, "all-but-one"; ``method="only-one"``: the loss of
quantizing only that layer), then returns layers to float, most sensitive first, until the
target holds: galloping over the number of float layers (1, 2, 4, …) and bisecting the
last step, so a model with dozens of candidate layers needs a handful of builds, not one
per layer. When that keeps two layers or more in float it also walks up from all float,
quantizing the layers least sensitive alone first, and keeps whichever set has fewer
layers in float (one order alone misses sets that meet a max-error target).
Every step is a :class:`~graphopt.passes.quantization.record.CurvePoint` (fidelity, and a
short paired ORT timing when ``speed`` is given): the speed/accuracy curve of the report.
:func:`fidelity_evaluator`, :func:`target_check` and :func:`speed_meter` build ``evaluate``,
``check`` and ``speed`` from calibration samples.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.passes.calibration.fidelity import measure, outputs_on, padding_mask
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.record import (
    CurvePoint,
    QuantRecord,
    worst_cosine,
    worst_max_rel,
)


class Measured(NamedTuple):
    """One model's fidelity against the original: the worst output's mean cosine, max relative
    error, and argmax agreement along the last axis (None: no output has a class axis)."""

    cosine: float
    max_rel: float
    agreement: float | None = None


Build = Callable[[frozenset[str]], ir.Model]
Evaluate = Callable[[ir.Model], Measured]
METHODS = ("all-but-one", "only-one")
STRATEGIES = ("gallop", "linear")


@dataclass(frozen=True)
class Target:
    """A fidelity target: mean cosine at least ``min_cosine``, max relative error at most
    ``max_error``, argmax agreement at least ``min_agreement`` (several: all must hold).

    Argmax agreement is what a classifier's or a CTC decoder's user sees; on softmax outputs
    cosine tracks it poorly (a step whose top two classes are close flips at a cosine of
    0.9999), so such models are better served by ranking and stopping on agreement itself.
    """

    min_cosine: float | None = None
    max_error: float | None = None
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        if self.min_cosine is None and self.max_error is None and self.min_agreement is None:
            raise ValueError(
                "a mixed-precision target needs min_cosine, max_error or min_agreement"
            )

    @classmethod
    def from_settings(cls, settings) -> Target:
        """From a :class:`~graphopt.passes.quantization.settings.QuantSettings`."""
        return cls(settings.min_cosine, settings.max_error, settings.min_agreement)

    def met(self, measured: Measured) -> bool:
        if self.min_cosine is not None and not measured.cosine >= self.min_cosine:
            return False
        if self.min_agreement is not None and not _agreement(measured) >= self.min_agreement:
            return False
        return self.max_error is None or measured.max_rel <= self.max_error

    def badness(self, measured: Measured) -> float:
        """One number to rank layers by: each measure in units of its target's allowance."""
        total = 0.0
        if self.min_cosine is not None:
            total += (1.0 - measured.cosine) / max(1.0 - self.min_cosine, 1e-12)
        if self.max_error is not None:
            total += measured.max_rel / max(self.max_error, 1e-12)
        if self.min_agreement is not None:
            total += (1.0 - _agreement(measured)) / max(1.0 - self.min_agreement, 1e-12)
            # Agreement moves in whole flipped positions: many layers flip none alone. The
            # cosine, far below one flip's weight, orders those ties by how close they come.
            total += 1e-3 * (1.0 - measured.cosine) / max(1.0 - (self.min_cosine or 0.999), 1e-12)
        return total

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"mean cosine >= {self.min_cosine:.12g}")
        if self.max_error is not None:
            parts.append(f"max rel error <= {self.max_error:.12g}")
        if self.min_agreement is not None:
            parts.append(f"argmax agreement >= {self.min_agreement:.12g}")
        return " and ".join(parts)


def sensitivities(
    build: Build,
    candidates: Sequence[str],
    evaluate: Evaluate,
    target: Target,
    method: str = "all-but-one",
) -> dict[str, float]:
    """Per candidate, how much keeping it in float helps (larger: more sensitive).

    ``all-but-one``: badness(all quantized) - badness(all but this one quantized), which sees
    the layer in the company it will run in; ``only-one``: badness(only this one quantized)
    (the float model's, a constant, left out), blind to interactions. Both cost one build
    and one evaluation per candidate.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity method {method!r}; expected one of {METHODS}")
    everything = frozenset(candidates)
    if method == "all-but-one":
        base = target.badness(evaluate(build(frozenset())))
        return {
            name: base - target.badness(evaluate(build(frozenset([name])))) for name in candidates
        }
    return {name: target.badness(evaluate(build(everything - {name}))) for name in candidates}


def search(
    build: Build,
    candidates: Sequence[str],
    evaluate: Evaluate,
    target: Target,
    *,
    check: Evaluate | None = None,
    speed: Callable[[ir.Model], float] | None = None,
    method: str = "all-but-one",
    strategy: str = "gallop",
) -> tuple[frozenset[str], list[CurvePoint]]:
    """The layers to keep in float so that ``target`` holds (on ``check``'s samples), and
    the curve walked, the set chosen last. When no set tried meets the target, every
    candidate is kept (the curve says how far each try got).

    Two walks, because one sensitivity order misleads on a non-additive measure (a max
    error: digits met 0.015 with two of four layers int8, while returning layers to float
    by the all-but-one ranking never got under 0.024 short of all four float):

    * down from all quantized: the layers ranked once by ``method``, returned to float most
      sensitive first; ``strategy`` ``linear`` tries every count from 1 up, ``gallop``
      (default) 1, 2, 4, … until the target holds, then bisects between the last miss and
      the first hit (~2·log2(k) builds, not k: a transformer has dozens of candidates);
    * up from all float, when the first walk keeps two layers or more: the layers ranked by
      the loss of quantizing only that one, quantized least sensitive first, galloping and
      bisecting the same way, starting where it would beat the first walk (one check when
      it cannot).

    The set with fewer layers in float wins (the first walk's on a tie)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}; expected one of {STRATEGIES}")
    check = check or evaluate
    candidates = sorted(set(candidates))
    points: dict[frozenset[str], CurvePoint] = {}

    def met(kept: frozenset[str], label: str) -> bool:
        if kept not in points:
            model = build(kept)
            measured = check(model)
            speedup = speed(model) if speed is not None else None
            points[kept] = CurvePoint(
                len(kept), measured.cosine, measured.max_rel, speedup, label, measured.agreement
            )
        return target.met(point_measure(points[kept]))

    def result(kept: frozenset[str]) -> tuple[frozenset[str], list[CurvePoint]]:
        # The chosen set last: conclude() and the report read its fidelity there.
        chosen = points[kept]
        up = [p for p in points.values() if p.layer.startswith(_UP)]
        down = [p for p in points.values() if not p.layer.startswith(_UP)]
        walked = sorted(down, key=lambda p: p.kept_float) + sorted(up, key=lambda p: -p.kept_float)
        return kept, [p for p in walked if p is not chosen] + [chosen]

    if met(frozenset(), "") or not candidates:
        return result(frozenset())
    scores = sensitivities(build, candidates, evaluate, target, method)
    order = sorted(candidates, key=lambda name: (-scores[name], name))
    n = len(order)

    def down(k: int) -> bool:
        return met(frozenset(order[:k]), order[k - 1])

    k = _first_hit(down, 1, n, strategy)
    kept = frozenset(order[:k]) if k is not None else frozenset(candidates)
    if k is None:
        down(n)  # measured, for the report: everything float and still short (chained)
    if k is None or k < 2:
        return result(kept)
    alone = (
        scores
        if method == "only-one"
        else sensitivities(build, candidates, evaluate, target, "only-one")
    )
    rise = sorted(candidates, key=lambda name: (alone[name], name))

    def up(q: int) -> bool:  # q least sensitive layers quantized, the rest float
        return met(frozenset(rise[q:]), _quantized_label(rise[:q]))

    # Only a count above n - k beats the first walk; n (all quantized) already missed.
    q = _last_hit(up, n - k + 1, n - 1, strategy)
    return result(frozenset(rise[q:]) if q is not None else kept)


def _first_hit(met: Callable[[int], bool], low: int, high: int, strategy: str) -> int | None:
    """The smallest count in ``low..high`` that ``met``, assuming it stays met above it
    (``gallop``: 1, 2, 4, … steps then a bisection; ``linear``: each in turn); None: none."""
    if strategy == "linear":
        return next((k for k in range(low, high + 1) if met(k)), None)
    miss, k = low - 1, low
    while not met(k):
        if k == high:
            return None
        miss, k = k, min(low + 2 * (k - low + 1) - 1, high)
    return _bisect(met, miss, k)


def _last_hit(met: Callable[[int], bool], low: int, high: int, strategy: str) -> int | None:
    """The largest count in ``low..high`` that ``met``, assuming it stays met below it;
    None when ``low`` misses (or the range is empty)."""
    if low > high or not met(low):
        return None
    if strategy == "linear":
        return next((q for q in range(low + 1, high + 1) if not met(q)), high + 1) - 1
    hit, step = low, 1
    while hit < high:
        q = min(hit + step, high)
        if not met(q):
            # Between the last hit and this miss: the miss is the first failing count.
            return _bisect(lambda c: not met(c), hit, q) - 1
        hit, step = q, 2 * step
    return hit


def _bisect(met: Callable[[int], bool], miss: int, hit: int) -> int:
    """The first count that ``met`` between a known ``miss`` and a known ``hit`` above it."""
    while hit - miss > 1:
        middle = (miss + hit) // 2
        if met(middle):
            hit = middle
        else:
            miss = middle
    return hit


_UP = "quantized only"  # how the rows of the walk up from all float begin


def _quantized_label(names: Sequence[str]) -> str:
    """A curve row of the walk up from all float: which layers it quantized."""
    if len(names) <= 3:
        return f"{_UP}: " + ", ".join(names)
    return f"{_UP} the {len(names)} least sensitive (last: {names[-1]})"


class FidelityEvaluator:
    """``model -> Measured`` (worst mean cosine, max rel error and argmax agreement) over
    ``original``'s outputs on ``samples``, run with ORT's optimizations on (the deployed
    integer kernels), and with ``reference_numerics`` also off (the Q/DQ reference numerics:
    the worst of both); the original's outputs are computed once. ``count``: the samples;
    ``positions``: the fewest argmax positions of an output with a class axis (None: none
    has one), which sets how finely an agreement share can be measured on them."""

    def __init__(
        self,
        original: ir.Model,
        samples: CalibrationSet,
        reference_numerics: bool = False,
        *,
        _reference: list[np.ndarray] | None = None,
    ) -> None:
        if _reference is None:
            _reference = outputs_on(original, samples, reference=True)
        self._original = original
        self._reference = _reference
        self._names = [v.name for v in original.graph.outputs]
        self._samples = samples
        self._mask = padding_mask(samples)
        self._levels = (True, False) if reference_numerics else (True,)
        self.count = samples.count
        self.positions = agreement_positions(self._reference, self._mask)

    def both_numerics(self) -> FidelityEvaluator:
        """The same samples, judged with ORT's optimizations on and off (the original's
        outputs shared, not run again)."""
        return FidelityEvaluator(self._original, self._samples, True, _reference=self._reference)

    def __call__(self, model: ir.Model) -> Measured:
        fidelities = []
        for optimize in self._levels:
            got = outputs_on(model, self._samples, optimize=optimize)
            fidelities += measure(self._names, self._reference, got, self._mask)
        agreements = [f.argmax_agreement for f in fidelities if f.argmax_agreement is not None]
        return Measured(
            worst_cosine(fidelities),
            worst_max_rel(fidelities),
            min(agreements) if agreements else None,
        )


def fidelity_evaluator(original: ir.Model, samples: CalibrationSet) -> FidelityEvaluator:
    """A :class:`FidelityEvaluator` of ``original`` on ``samples``."""
    return FidelityEvaluator(original, samples)


def agreement_positions(outputs: Sequence[np.ndarray], mask: np.ndarray | None) -> int | None:
    """The fewest positions an argmax agreement is taken over, among the float outputs with a
    class axis (None: no such output), counted as :func:`~graphopt.passes.calibration.
    fidelity.measure` counts them: trailing size-1 axes dropped, padded positions left out."""
    counts = []
    for output in outputs:
        shape = output.shape
        if output.dtype.kind not in "fc":
            continue  # integer outputs get a share of equal values, not an agreement
        while len(shape) > 2 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) < 2 or shape[-1] < 2:
            continue
        lead = shape[:-1]
        count = int(np.prod(lead))
        if mask is not None and len(lead) >= 2 and lead[:2] == mask.shape and mask.any():
            count = int((mask != 0).sum()) * int(np.prod(lead[2:]))
        counts.append(count)
    return min(counts) if counts else None


# Fewer held-out samples than this and a cosine or error verdict rests on a handful of
# samples: said as a warning (an agreement share has an exact test, below).
FEW_HELD_OUT = 16


@dataclass(frozen=True)
class TargetCheck:
    """How a target is judged: ``evaluate`` gives the worst of the sets it runs on, ``where``
    names them for the verdict, ``warning`` says when they are few ("" otherwise)."""

    evaluate: Evaluate
    where: str
    warning: str = ""


def target_check(
    reference: ir.Model,
    fit: CalibrationSet,
    held: CalibrationSet | None,
    target: Target,
    fit_evaluator: FidelityEvaluator | None = None,
) -> TargetCheck:
    """The check the search stops on: the worst of every row the report's fidelity table
    shows, the held-out and the calibration samples (``fit``) with ORT's optimizations on
    and off. "Met" on 8 held-out samples, optimized, beside calibration rows at 95.8%
    claimed what the same report contradicted; now "met" holds on every row printed.

    An agreement target the held-out samples cannot resolve is refused (exit 2) before any
    search: when one flipped position weighs more than the share the target allows (8
    positions against 0.99: one flip is 12.5%), "met" can only mean that none flipped, which
    shows nothing about 0.99 (a classifier "met" 0.99 on 8 samples and agreed on 95.5% of 200
    fresh ones). Cosine and error targets have no such exact bound: few held-out samples
    give a warning. ``fit_evaluator``: one already built on ``fit``, whose reference
    outputs are reused."""
    if fit_evaluator is not None and fit_evaluator.count == fit.count:
        fit_eval = fit_evaluator.both_numerics()
    else:
        fit_eval = FidelityEvaluator(reference, fit, reference_numerics=True)
    if held is None:
        judged = fit_eval
        where = f"{fit_eval.count} calibration samples (none held out: too few in the file)"
        sets: tuple[FidelityEvaluator, ...] = (fit_eval,)
        unbiased = "calibration"
    else:
        judged = FidelityEvaluator(reference, held, reference_numerics=True)
        where = f"{judged.count} held-out and {fit_eval.count} calibration samples"
        sets = (judged, fit_eval)
        unbiased = "held-out"
    where += " (the worst of them, ORT's optimizations on and off: every fidelity row)"
    _refuse_unresolvable(target, judged, unbiased)
    warning = ""
    if judged.count < FEW_HELD_OUT and (
        target.min_cosine is not None or target.max_error is not None
    ):
        warning = (
            f"warning: mixed precision: the target is judged on {judged.count} {unbiased} "
            f"samples (fewer than {FEW_HELD_OUT}): a verdict on so few is weak; a --calib file "
            "with more samples makes it firmer"
        )

    def evaluate(model: ir.Model) -> Measured:
        return worst_of([measured(model) for measured in sets])

    return TargetCheck(evaluate, where, warning)


def _refuse_unresolvable(target: Target, judged: FidelityEvaluator, unbiased: str) -> None:
    if target.min_agreement is None or judged.positions is None:
        return  # no class axis: Target.met says so in its own error
    allowed = 1.0 - target.min_agreement
    # An allowance of 0 (--min-agreement 1) is exact on any count: one flip misses it.
    if allowed <= 0 or judged.positions * allowed >= 1.0 - 1e-9:
        return
    needed = math.ceil(1.0 / allowed - 1e-9)
    raise UserInputError(
        f"quantize: --min-agreement {target.min_agreement:g} cannot be shown on "
        f"{judged.positions} {unbiased} position(s) ({judged.count} samples): one disagreement "
        f"is {1 / judged.positions:.1%}, more than the {allowed:.1%} the target allows; it "
        f"needs at least {needed}: give more calibration samples (the pass's holdout share of "
        "them is held out) or a lower target"
    )


def worst_of(measures: Sequence[Measured]) -> Measured:
    """The worst of each measure over several sample sets (lowest cosine and agreement,
    largest error)."""
    agreements = [m.agreement for m in measures if m.agreement is not None]
    return Measured(
        min(m.cosine for m in measures),
        max(m.max_rel for m in measures),
        min(agreements) if agreements else None,
    )


def conclude(
    record: QuantRecord,
    target: Target,
    kept: frozenset[str],
    candidates: Sequence[str],
    check: TargetCheck,
    chained: bool,
    extra: str = "",
) -> None:
    """The search's verdict, said in the record's notes, with what it was judged on. A
    missed target sets ``record.target_missed`` (the CLI's exit 1 after the report: the
    check the user asked for failed); ``record.target_verdict`` is what a refusal of a run
    that quantized nothing says (:meth:`QuantRecord.unchanged_refusal`)."""
    last = record.curve[-1]
    met = target.met(point_measure(last))
    verdict = "met" if met else "NOT met"
    all_float = bool(candidates) and len(kept) == len(candidates)
    if not met and all_float and chained:
        # Every layer float and still short: the earlier lossy passes alone miss the target
        # (measured end to end). Said, not left to the reader of the curve.
        verdict += " (the earlier lossy passes alone already miss it: nothing was quantized)"
    record.curve_source = check.where
    record.notes.append(
        f"mixed precision: target {target.describe()} {verdict} on {check.where} with "
        f"{len(kept)} of {len(candidates)} layers kept in float{extra}"
    )
    if check.warning:
        record.notes.append(check.warning)
    record.target_verdict = ""
    if all_float:
        # The refusal that follows prints no curve: what was tried is said in it, and only
        # that (the sets not tried may meet the target: no claim that only float does).
        tried = [p for p in record.curve if p.kept_float < len(kept)]
        nearest = ""
        if tried:
            best = min(tried, key=lambda p: target.badness(point_measure(p)))
            nearest = (
                f"; none of the {len(tried)} set(s) with a layer quantized that the search "
                f"tried met it (the closest: {_measured_text(best)} with {best.kept_float} in "
                "float)"
            )
        record.target_verdict = (
            f"target {target.describe()} {verdict} with all {len(kept)} layers in float{nearest}"
        )
    if not met:
        record.target_missed = (
            f"quantize {record.mode}: mixed-precision target {target.describe()} NOT met on "
            f"{check.where.split(' (')[0]} (worst: {_measured_text(last)}) with {len(kept)} "
            f"of {len(candidates)} layers kept in float"
        )


def judge_written(record: QuantRecord, target: Target) -> None:
    """The target judged on the fidelity ``record`` measured, for the modes with no search
    (int4-weight, fp16, bf16, fp8 quantize every layer they take): the worst of every row
    (calibration and held-out, ORT's optimizations on and off where measured). Said in the
    notes; a miss sets ``record.target_missed`` (exit 1 after the report), as int8's does: a
    target the user set is a check, never ignored."""
    mode = record.mode
    rows = [f for fs in record.fidelity.values() for f in fs]
    if not rows:
        record.target_missed = (
            f"quantize {mode}: target {target.describe()} not judged: no fidelity was measured"
        )
        return
    agreements = [f.argmax_agreement for f in rows if f.argmax_agreement is not None]
    worst = CurvePoint(
        0,
        worst_cosine(rows),
        worst_max_rel(rows),
        agreement=min(agreements) if agreements else None,
    )
    where = record.fidelity_source or ", ".join(record.fidelity)
    met = target.met(point_measure(worst))
    record.notes.append(
        f"target {target.describe()} {'met' if met else 'NOT met'} on {where} (worst row: "
        f"{_measured_text(worst)}); {mode} has no mixed-precision search: every layer it "
        "takes is quantized (--exclude keeps layers float)"
    )
    if not met:
        record.target_missed = (
            f"quantize {mode}: target {target.describe()} NOT met on {where} (worst: "
            f"{_measured_text(worst)})"
        )


def _measured_text(point: CurvePoint) -> str:
    text = f"cosine {point.cosine:.4f}, max rel error {point.max_rel:.3g}"
    if point.agreement is not None:
        text += f", argmax agreement {point.agreement:.2%}"
    return text


def point_measure(point: CurvePoint) -> Measured:
    """A curve point's fidelity, as :meth:`Target.met` takes it."""
    return Measured(point.cosine, point.max_rel, point.agreement)


def _agreement(measured: Measured) -> float:
    if measured.agreement is None:
        # A target no measure can meet must not pass (or fail) silently.
        raise UserInputError(
            "quantize: --min-agreement needs an output with a class axis (rank >= 2, last "
            "dim >= 2); use --min-cosine or --max-error"
        )
    return measured.agreement


def speed_meter(
    reference: ir.Model, feeds: dict[str, np.ndarray], pairs: int = 15
) -> Callable[[ir.Model], float]:
    """``model -> speed-up over reference``: ORT CPU, 1 thread, all optimizations, warm-up,
    then ``pairs`` interleaved runs, the median of per-pair time ratios (short: a curve has
    many points; the benchmark's own timing uses more pairs)."""
    base = _timing_session(reference)

    def speedup(model: ir.Model) -> float:
        session = _timing_session(model)
        for s in (base, session):
            s.run(None, feeds)
        ratios = []
        for _ in range(pairs):
            start = time.perf_counter()
            base.run(None, feeds)
            middle = time.perf_counter()
            session.run(None, feeds)
            ratios.append((middle - start) / max(time.perf_counter() - middle, 1e-9))
        return float(statistics.median(ratios))

    return speedup


def _timing_session(model: ir.Model):
    import onnxruntime as ort

    from graphopt import io

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    data = io.to_proto(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
