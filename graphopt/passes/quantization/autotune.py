"""``--autotune``: time the int8 candidates on this machine and keep the fastest.

The rule table (:mod:`.cpu_rules`) gives the usual best activation type per CPU family from
measurements and ORT's sources; a user's CPU, ORT version and model may disagree. With
``--autotune`` (``--target ort``, static int8) every candidate of {QDQ, QOperator} x {u8, s8}
(less those the user fixed with ``--quant-format`` / ``--activation-type``) is built and
timed in ONNX Runtime on this machine: 1 thread, graph optimizations on, warm-up, then paired
interleaved rounds on the first calibration batch, median of each candidate's time relative
to the first. The fastest is kept; the measured choice goes into the output's metadata
(``graphopt.autotune``: the settings chosen, and the relative times rounded to 2 digits) and
the report, so a rerun with ``--quant-format X --activation-type Y`` reproduces the file's
quantization without measuring.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import onnx_ir as ir

from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.record import QuantRecord
from graphopt.passes.quantization.settings import ACTIVATION_TYPES, QUANT_FORMATS, QuantSettings
from graphopt.registry import PassContext

METADATA_KEY = "graphopt.autotune"
WARMUP = 2
ROUNDS = 10

ModeFunction = Callable[
    [ir.Model, QuantSettings, "CalibrationSet | None", PassContext], QuantRecord
]


@dataclasses.dataclass
class Candidate:
    settings: QuantSettings
    model: ir.Model
    record: QuantRecord
    context: PassContext
    relative_time: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.settings.quant_format}/{self.settings.activation_type}"


def candidate_settings(settings: QuantSettings) -> list[QuantSettings]:
    """The settings to try: every format and activation type the user left to defaults."""
    formats = QUANT_FORMATS if "quant_format" in settings.defaulted else (settings.quant_format,)
    types = (
        ACTIVATION_TYPES if "activation_type" in settings.defaulted else (settings.activation_type,)
    )
    return [
        dataclasses.replace(settings, quant_format=f, activation_type=a, autotune=False)
        for f in formats
        for a in types
    ]


def autotune(
    model: ir.Model,
    settings: QuantSettings,
    calib: CalibrationSet,
    context: PassContext,
    quantize: ModeFunction,
) -> QuantRecord:
    """Build every candidate, time them, and leave the fastest in ``model``; its record
    (with the measurement in its notes) is returned."""
    candidates = []
    for option in candidate_settings(settings):
        trial_context = dataclasses.replace(context, notes=[], details={})
        trial = model.clone()
        record = quantize(trial, option, calib, trial_context)
        candidates.append(Candidate(option, trial, record, trial_context))
    if len(candidates) > 1:
        _time(candidates, calib)
    best = min(candidates, key=lambda c: c.relative_time)
    model.graph = best.model.graph
    for note in best.context.notes:
        context.note(note)
    measured = ", ".join(f"{c.label} {c.relative_time:.2f}" for c in candidates)
    best.record.notes.append(
        f"--autotune: time relative to {candidates[0].label} on this machine (ORT, 1 thread): "
        f"{measured}; kept {best.label} (rerun with --quant-format "
        f"{best.settings.quant_format} --activation-type {best.settings.activation_type} to "
        "reproduce without measuring)"
    )
    model.metadata_props[METADATA_KEY] = json.dumps(
        {
            "quant_format": best.settings.quant_format,
            "activation_type": best.settings.activation_type,
            "relative_times": {c.label: round(c.relative_time, 2) for c in candidates},
        },
        sort_keys=True,
    )
    return best.record


def _time(candidates: list[Candidate], calib: CalibrationSet) -> None:
    from graphopt.sessions import make_session

    feeds = next(calib.batches())
    sessions = [make_session(c.model, threads=1, optimize=True) for c in candidates]
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    wanted = [{i.name for i in s.get_inputs()} for s in sessions]
    runs = [
        (lambda s=s, n=n, w=w: s.run(n, {k: v for k, v in feeds.items() if k in w}))
        for s, n, w in zip(sessions, names, wanted, strict=True)
    ]
    for run in runs:
        for _ in range(WARMUP):
            run()
    ratios: list[list[float]] = [[] for _ in runs]
    for _ in range(ROUNDS):
        times = []
        for run in runs:
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        for i, t in enumerate(times):
            ratios[i].append(t / times[0])
    for candidate, r in zip(candidates, ratios, strict=True):
        candidate.relative_time = statistics.median(r)
