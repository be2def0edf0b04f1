"""Mixed precision for a mode with no search of its own: ``--quantize int4-weight`` with
``--min-cosine``/``--max-error``/``--min-agreement`` keeps its most sensitive layers in
float until the target holds, with int8's search (:func:`.mixed_precision.search`).

A candidate set is built by running the mode again on a copy of the model with those
layers kept float (``QuantSettings.keep_float``): the mode's own rounding (GPTQ's error
feedback runs through the layers it quantizes, so a layer kept float changes the others'
rounding) with nothing re-implemented. The layers it quantizes with every candidate in are
the candidates. fp16, bf16 and fp8 are not searched (ORT's CPU runs neither bfloat16 nor
optimized float8 Q/DQ, which the search's evaluator needs): their target is checked on the
model written (:func:`.mixed_precision.judge_written`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_ir as ir

from graphopt.passes.quantization import mixed_precision as mp
from graphopt.passes.quantization.record import QuantRecord
from graphopt.passes.quantization.settings import QuantSettings

if TYPE_CHECKING:
    from graphopt.passes.calibration.samples import CalibrationSet
    from graphopt.registry import PassContext

ModeFunction = Callable[
    [ir.Model, QuantSettings, "CalibrationSet | None", "PassContext"], QuantRecord
]
# Samples the layers are ranked on (as int8-dynamic's): ranking needs fewer than judging.
SENSITIVITY_SAMPLES = 32
KEPT_REASON = "mixed precision: sensitive"


def quantize_searched(
    model: ir.Model,
    settings: QuantSettings,
    calib: CalibrationSet | None,
    context: PassContext,
    function: ModeFunction,
) -> QuantRecord:
    """Run ``function`` (the mode) on ``model`` in place with the fewest layers kept float
    that meet the target (judged as int8's: held-out and calibration samples, ORT's
    optimizations on and off); the record carries the search's curve and verdict."""
    original = model.clone()
    fit, held = _samples(original, settings, calib, context)
    # Every layer the mode takes, quantized: the first point, and the candidates.
    everything = original.clone()
    plain = dataclasses.replace(settings, compensation=0)
    first = function(everything, plain, calib, context)
    candidates = sorted(layer.node for layer in first.layers if layer.precision != "float")
    built: dict[frozenset[str], ir.Model] = {frozenset(): everything}

    def build(kept: frozenset[str]) -> ir.Model:
        if kept not in built:
            candidate = original.clone()
            if not kept >= set(candidates):  # all float: the mode would refuse the model
                function(candidate, dataclasses.replace(plain, keep_float=kept), calib, context)
            built.clear()  # one model at a time: a decoder's copies add up
            built[kept] = candidate
        return built[kept]

    target = mp.Target.from_settings(settings)
    reference = context.fidelity_reference(original)
    evaluate = mp.fidelity_evaluator(reference, fit.first(SENSITIVITY_SAMPLES))
    check = mp.target_check(reference, fit, held, target, fit_evaluator=evaluate)
    kept, curve = mp.search(build, candidates, evaluate, target, check=check.evaluate)
    built.clear()
    if kept >= set(candidates) and candidates:
        # Nothing quantized: the refusal says the target is why (no model is written).
        layers = [
            dataclasses.replace(layer, precision="float", reason=KEPT_REASON)
            if layer.node in kept
            else layer
            for layer in first.layers
        ]
        record = dataclasses.replace(first, layers=layers, curve=curve, notes=[])
        mp.conclude(record, target, kept, candidates, check, reference is not original)
        return record
    record = function(model, dataclasses.replace(settings, keep_float=kept), calib, context)
    record.layers = [
        dataclasses.replace(layer, reason=KEPT_REASON) if layer.node in kept else layer
        for layer in record.layers
    ]
    record.curve = curve
    mp.conclude(record, target, kept, candidates, check, chained=reference is not original)
    return record


def _samples(
    model: ir.Model,
    settings: QuantSettings,
    calib: CalibrationSet | None,
    context: PassContext,
) -> tuple[CalibrationSet, CalibrationSet | None]:
    """The fit and held-out samples; generated inputs (said in the record by the mode's
    fidelity source) without a --calib file."""
    if calib is None:
        from graphopt.passes.calibration.samples import random_calibration

        calib = random_calibration(model, dict(context.input_shapes), owner="quantize")
    return calib.split(settings.holdout)
