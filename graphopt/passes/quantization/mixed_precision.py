"""Mixed precision: keep the fewest, most sensitive layers in float until a fidelity target
holds. Generic over the quantization mode (int8-dynamic and static int8 both use it).

The caller gives three things:

* ``build(kept_float) -> ir.Model``: the model quantized except the named layers (a fresh
  model per call; the search never edits it);
* ``evaluate(model) -> Measured`` (mean cosine, max relative error, argmax agreement) against
  the float original on calibration (fit) samples: sensitivities are measured with it;
* a :class:`Target` (``--min-cosine``, ``--max-error`` and/or ``--min-agreement``), checked
  with ``check``
  (by default ``evaluate``; pass one on held-out samples so the target is not judged on the
  data the order was chosen on).

:func:`search` measures each candidate layer's sensitivity once (by default the gain of
keeping only that layer in float, "all-but-one"; ``method="only-one"``: the loss of
quantizing only that layer), then returns layers to float, most sensitive first, until the
target holds: galloping over the number of float layers (1, 2, 4, …) and bisecting the
last step, so a model with dozens of candidate layers needs a handful of builds, not one
per layer.
Every step is a :class:`~graphopt.passes.quantization.record.CurvePoint` (fidelity, and a
short paired ORT timing when ``speed`` is given): the speed/accuracy curve of the report.
:func:`fidelity_evaluator` and :func:`speed_meter` build ``evaluate``/``check`` and ``speed``
from calibration samples.
"""

from __future__ import annotations

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
from graphopt.passes.quantization.record import CurvePoint, worst_cosine, worst_max_rel


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
            parts.append(f"mean cosine >= {self.min_cosine:g}")
        if self.max_error is not None:
            parts.append(f"max rel error <= {self.max_error:g}")
        if self.min_agreement is not None:
            parts.append(f"argmax agreement >= {self.min_agreement:g}")
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
    """The fewest most-sensitive layers to keep in float so that ``target`` holds (on
    ``check``'s samples), and the curve walked: point 0 is everything quantized, a point
    with k layers kept has the k most sensitive ones in float. When no prefix meets the
    target, every candidate is kept (the last point says how far that got).

    The layers are ranked once; ``strategy`` says which prefixes are tried: ``linear`` every
    k from 1 up; ``gallop`` (default) k = 1, 2, 4, … until the target holds, then a
    bisection between the last miss and the first hit, which assumes fidelity grows with k
    (it does on the ranked order, up to noise) and costs ~2·log2(k) builds instead of k:
    a transformer has dozens of candidates."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}; expected one of {STRATEGIES}")
    check = check or evaluate
    candidates = sorted(set(candidates))
    points: dict[int, CurvePoint] = {}
    order: list[str] = []

    def met(k: int) -> bool:
        if k not in points:
            model = build(frozenset(order[:k]))
            measured = check(model)
            speedup = speed(model) if speed is not None else None
            points[k] = CurvePoint(
                k,
                measured.cosine,
                measured.max_rel,
                speedup,
                order[k - 1] if k else "",
                measured.agreement,
            )
        return target.met(point_measure(points[k]))

    def result(k: int) -> tuple[frozenset[str], list[CurvePoint]]:
        return frozenset(order[:k]), [points[i] for i in sorted(points)]

    if met(0) or not candidates:
        return result(0)
    scores = sensitivities(build, candidates, evaluate, target, method)
    order.extend(sorted(candidates, key=lambda name: (-scores[name], name)))
    n = len(order)
    if strategy == "linear":
        k = next((k for k in range(1, n + 1) if met(k)), n)
        return result(k)
    miss, k = 0, 1
    while not met(k):
        if k == n:
            return result(n)
        miss, k = k, min(2 * k, n)
    hit = k
    while hit - miss > 1:
        middle = (miss + hit) // 2
        if met(middle):
            hit = middle
        else:
            miss = middle
    return result(hit)


def fidelity_evaluator(original: ir.Model, samples: CalibrationSet) -> Evaluate:
    """``model -> Measured`` (worst mean cosine, max rel error and argmax agreement) over
    ``original``'s outputs on ``samples``, run with ORT's optimizations on (the deployed
    integer kernels); the original's outputs are computed once."""
    reference = outputs_on(original, samples, reference=True)
    names = [v.name for v in original.graph.outputs]
    mask = padding_mask(samples)

    def evaluate(model: ir.Model) -> Measured:
        fidelities = measure(names, reference, outputs_on(model, samples, optimize=True), mask)
        agreements = [f.argmax_agreement for f in fidelities if f.argmax_agreement is not None]
        return Measured(
            worst_cosine(fidelities),
            worst_max_rel(fidelities),
            min(agreements) if agreements else None,
        )

    return evaluate


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
