"""``--quantize fp16|bf16|fp8``: lower float32 weights and computation to a smaller float type.

fp16 and bf16 convert the graph in place: every node whose ONNX schema lets its float32
type constraint take the lower type runs in it, its float32 initializers and Constants are
stored in it, and Casts join it to what stays float32. Stays float32, with the reason in the
record:

- the graph's float inputs and outputs (Casts at the boundary, output names kept);
- ``--exclude`` matches (op types or node-name globs);
- ops numerically risky at 16 bits (:data:`RISKY_OPS`: Pow/Exp/Log, the normalizations,
  Softmax, and reductions over 256 elements or more, or over dims not known statically). Why:
  a sum over a long axis, a square or an exponential leaves fp16's range (65504) or drowns
  small terms in its 11-bit mantissa, and the statistics of LayerNorm feed every later layer.
  Measured (ORT 1.32 CPU, held-out max relative error, fp16): MiniLM with the list 2.9e-4
  (last_hidden_state) / 6.3e-4 (sentence_embedding), without it 7.8e-4 / 1.6e-3; the
  difference is LayerNormalization's. ResNet-50's global-average ReduceMean (49 elements):
  4.6e-4 float32 vs 4.4e-4 fp16, no difference, hence the length threshold. Softmax: no
  measurable difference on MiniLM either way (7.6e-4 vs 7.6e-4 without calibration), but it
  is where an additive attention mask (-3.4e38, beyond fp16) arrives, which without
  calibration nothing else catches, so it stays listed (two Casts per Softmax). ORT's CPU
  provider computes most fp16 ops in float32 behind Casts, so these numbers understate the
  risk on hardware that accumulates in fp16;
- for fp16, tensors whose calibration range (or a weight's values) exceeds half of fp16's
  maximum, and small constants (epsilons) that fp16 would flush to subnormals or zero: the
  nodes that compute or read them;
- nodes with subgraphs (If/Loop/Scan bodies are left float32; the values they capture are
  cast back to float32 outside them), custom-domain ops, ops whose float output type no
  input carries (an attribute sets it: ConstantOfShape's ``value``, RandomNormal(Like)'s and
  EyeLike's ``dtype``, the windows' ``output_datatype``; or a sequence input), and ops whose
  schema has no 16-bit type (Constants and Casts are rewritten instead: their value or
  ``to``);
- an op with no weight whose neighbours all stay float32 (a Relu between two float32
  Convs): converting it would only add two Casts;
- integer and shape computation is never touched (Shape/Size read any type).

Casts to float32 already in the graph are retargeted to the lower type where everything they
feed runs in it.

The converted model must pass ONNX's type checking wherever the original did
(:func:`check_types`): a node whose declared output type disagrees with what it computes is
a bug here, raised, never measured. Fidelity is measured against the float32 original with
ONNX Runtime (CPU), or, where ORT has no kernel for a converted op (bf16), on a float
simulation of its rounding (:mod:`graphopt.passes.quantization.float_simulation`); the
record says which.

What runs in the lower type is decided in :mod:`graphopt.passes.quantization.float_plan`
and applied in :mod:`graphopt.passes.quantization.float_rewrite`.

fp8 (E4M3 Q/DQ for TensorRT) lives in :mod:`graphopt.passes.quantization.fp8`.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from graphopt import editing
from graphopt.errors import UserInputError
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.float_plan import FP16_LIMIT, observed_ranges, plan_conversion
from graphopt.passes.quantization.float_rewrite import apply_plan
from graphopt.passes.quantization.record import QuantRecord, own_max_rel, weight_bytes
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.registry import PassContext

LOW_TYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}


def quantize_float(
    model: ir.Model, settings: QuantSettings, calib: CalibrationSet | None, context: PassContext
) -> QuantRecord:
    """The mode function for fp16, bf16 and fp8 (``settings.MODES``)."""
    if settings.mode == "fp8":
        from graphopt.passes.quantization.fp8 import quantize_fp8

        return quantize_fp8(model, settings, calib, context)
    return quantize_half(model, settings, calib, context)


def quantize_half(
    model: ir.Model, settings: QuantSettings, calib: CalibrationSet | None, context: PassContext
) -> QuantRecord:
    """Convert ``model`` in place to fp16 or bf16 (``settings.mode``); the record says what."""
    low = LOW_TYPES[settings.mode]
    record = QuantRecord(mode=settings.mode)
    original = model.clone()
    shapes = fill_types(model)
    record.weight_bytes_before = weight_bytes(model)
    fit, held = calib.split(settings.holdout) if calib is not None else (None, None)
    generated = None
    if calib is None:
        from graphopt.passes.calibration.samples import random_calibration

        # Without --calib, fp16's overflow guard still needs ranges: generated inputs show
        # what random data does to the activations (seen: a random-weight Inception-v3 left
        # fp16's range and gave inf with no range at all).
        generated = random_calibration(original, dict(context.input_shapes), owner="quantize")
    source = fit if fit is not None else generated
    ranges = observed_ranges(model, source) if low == ir.DataType.FLOAT16 else {}
    plan = plan_conversion(model, settings, low, ranges, shapes)
    record.layers = plan.layers
    if not plan.convert:  # before measuring anything: the model would come back as given
        raise UserInputError(record.unchanged_refusal())
    record.type_changes = apply_plan(model, plan, low)
    record.weight_bytes_after = weight_bytes(model)
    check_types(original, model, settings.mode)
    if ranges:
        where = "calibration samples" if fit is not None else "generated inputs (no --calib)"
        record.notes.append(
            f"fp16 ranges from {source.count} {where}: tensors above "
            f"{FP16_LIMIT:g} in magnitude kept float32"
        )
    risky = sorted({x.op_type for x in plan.layers if x.reason.startswith("numerically risky")})
    if risky:
        record.notes.append(
            f"kept float32 by default (numerically risky at 16 bits): {', '.join(risky)}; "
            "--exclude adds to the list"
        )
    if calib is not None:
        sets = {"calibration": fit} if held is None else {"calibration": fit, "held-out": held}
        record.fidelity_source = f"{calib.count} samples of {calib.source}" + (
            f", {held.count} held out" if held is not None else ""
        )
    else:
        sets = {"generated": generated}
        record.fidelity_source = f"{sets['generated'].count} generated inputs (no --calib)"
    from graphopt.passes.quantization.float_simulation import fidelity_on_runnable

    reference = context.fidelity_reference(original)  # the run's original, if moved
    record.fidelity, note, record.ort_unrunnable = fidelity_on_runnable(reference, model, sets, low)
    record.own_max_rel = own_max_rel(
        context, original, model, sets, lambda g, q, s: fidelity_on_runnable(g, q, s, low)[0]
    )
    record.notes.append(note)
    if low == ir.DataType.BFLOAT16 and any(x.reason.startswith("Conv-") for x in plan.layers):
        record.notes.append("bf16: Conv takes bfloat16 from opset 22 (--opset 22)")
    return record


# Initializers above this many bytes are handed to ONNX's type check as typed graph inputs
# (their values are not needed to check types; serializing a 1 GiB model's weights would be).
CHECKED_BYTES = 1024


class ConversionError(RuntimeError):
    """A converted model that fails ONNX's type check where its original passed: a bug in the
    conversion, never a model to write or measure (raised, so the run stops with exit 3)."""


def check_types(original: ir.Model, converted: ir.Model, mode: str) -> None:
    """Raise :class:`ConversionError` when ``converted`` fails ONNX's strict type and shape
    inference and ``original`` did not (a model that already fails it says nothing about
    the conversion). Why: ORT refuses such a model at load ("bound to different types"),
    and before this check that refusal was read as ORT lacking a 16-bit kernel, so an
    invalid model was measured on a simulation and written with exit 0."""
    error = type_error(converted)
    if error and not type_error(original):
        raise ConversionError(
            f"quantize {mode}: the converted model fails ONNX type checking ({error}); "
            "nothing was written"
        )


def type_error(model: ir.Model) -> str:
    """The first error of ONNX's strict type and shape inference on ``model``, or ""."""
    clone = model.clone()  # shares the tensors: nothing is copied
    graph = clone.graph
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= CHECKED_BYTES:
            continue
        value.shape = value.shape or tensor.shape
        value.dtype = value.dtype or tensor.dtype
        graph.initializers.pop(name)
        value.const_value = None
        if not value.is_graph_input():
            graph.inputs.append(value)
    try:
        proto = ir.serde.serialize_model(clone)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        return " ".join(str(exc).split())[:300]
    return ""


def fill_types(model: ir.Model) -> dict[str, ir.Shape]:
    """Give every untyped value of the main graph the element type ONNX inference finds
    (which tensors are float32 decides what is converted); returns the shapes it found for
    values that declare none (symbolic dims kept; read, not written into the model)."""
    missing = [out for node in model.graph for out in node.outputs if out.shape is None]
    if not missing and all(out.type is not None for node in model.graph for out in node.outputs):
        return {}
    clone = model.clone()
    editing.fill_missing_shapes(clone)
    found = {out.name: out for node in clone.graph for out in node.outputs}
    for node in model.graph:
        for out in node.outputs:
            twin = found.get(out.name)
            if out.type is None and twin is not None and twin.type is not None:
                out.type = twin.type
    return {
        v.name: found[v.name].shape
        for v in missing
        if v.name in found and found[v.name].shape is not None
    }
