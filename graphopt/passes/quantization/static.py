"""``--quantize int8``: static INT8 with calibrated activation ranges.

The steps, each its own module:

1. checks: calibration data given, opset ≥ 13 (per-channel DequantizeLinear); a model with
   Q/DQ already is refused before, in :mod:`.quantize`;
2. :func:`make_plan`: the placement (:mod:`.placement`), one statistics pass over the
   calibration part of the samples (:mod:`.ranges`), and a range per quantized tensor by the
   chosen method (``auto``: :mod:`.auto_method`);
3. :func:`build_quantized`: a quantized copy for a given set of float-kept nodes (QDQ by
   :mod:`.qdq`, QOperator by :mod:`.qoperator`); mixed precision calls it repeatedly;
4. the record: per node precision and reason, type changes, weight bytes, fidelity on the
   calibration and held-out parts.

Hooks for the accuracy tools: two exact float rewrites before the plan, cross-layer
equalization (:mod:`.equalization`; ``--equalize``, default on for models with depthwise
convolutions) and SmoothQuant (:mod:`.smoothquant`; ``--smoothquant``, default alpha 0.5 on
normalization-fed MatMuls, as int8-dynamic); bias correction (``settings.bias_correction``)
is applied in :func:`build_quantized` from the per-channel input means the plan collects;
data-aware weight rounding (:mod:`.int8_rounding`, ``--int8-weights gptq``, the default with
a calibration file) is computed once in :func:`make_plan`, every build reuses its codes;
mixed precision (``settings.max_error`` / ``settings.min_cosine``) chooses
``excluded_nodes``. One placement refinement lives here: a MatMul's output that only float
ops read stays float (:func:`_float_matmul_outputs`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.editing import name_nodes
from graphopt.errors import UserInputError
from graphopt.opset import raise_in_place
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization import placement as placing
from graphopt.passes.quantization.qdq import Emitted, QuantizedWeight, emit_qdq
from graphopt.passes.quantization.ranges import (
    SYMMETRIC_MIN_SCALE,
    QuantParams,
    Range,
    TensorStats,
    calibrate,
    collect,
    params_for,
)
from graphopt.passes.quantization.record import (
    LayerPrecision,
    QuantRecord,
    measure_fidelity,
    own_max_rel,
    weight_bytes,
)
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.registry import PassContext

PER_CHANNEL_OPSET = 13
# Samples per tensor that ``auto`` replays its consumers on.
AUTO_SAMPLES = 2


@dataclass
class QuantPlan:
    """Everything :func:`build_quantized` needs, computed once from calibration data."""

    settings: QuantSettings
    ranges: dict[str, Range]  # tensor -> range
    input_means: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> per channel
    # --int8-weights gptq: the data-aware weights by (weight name, axis), and what they gained.
    weights: dict[tuple[str, int | None], QuantizedWeight] = field(default_factory=dict)
    weight_note: str = ""


def quantize_static(
    model: ir.Model,
    settings: QuantSettings,
    calib: CalibrationSet | None,
    context: PassContext,
) -> QuantRecord:
    """Quantize ``model`` in place to int8 (weights per-channel s8, activations u8/s8)."""
    if calib is None:
        raise UserInputError("quantize int8: static quantization needs --calib FILE.npz")
    record = QuantRecord(mode="int8")
    note = raise_in_place(model, PER_CHANNEL_OPSET, "per-channel DequantizeLinear needs opset 13")
    if note:
        record.notes.append(note)
    name_nodes(model.graph)
    _refuse_unplaced(model, settings)
    original = model.clone()
    fit, held = calib.split(settings.holdout)
    _equalize(model, settings, fit, record)
    from graphopt.passes.quantization import smoothquant

    smoothquant.apply_settings(model, settings, fit, record.notes)
    merged_into = _merge_shortcuts(model, settings, record)
    plan = make_plan(model, settings, fit)
    excluded: frozenset[str] = frozenset()
    if settings.mixed_precision:
        reference = context.fidelity_reference(original)
        excluded = _mixed_precision(model, original, plan, fit, held, record, reference)
    _pad_channels(model, plan, excluded, record)
    quantized, placement, emitted = _build(model, plan, excluded)
    if settings.compensation:  # EoRA's reference: W before rounding, after SmoothQuant
        record.float_model = model.clone()
    model.graph = quantized.graph
    _fill_record(record, original, model, plan, placement, emitted, merged_into)
    sets = {"calibration": fit} if held is None else {"calibration": fit, "held-out": held}
    # Against the run's original when an earlier lossy pass (prune) changed the model.
    record.fidelity = measure_fidelity(context.fidelity_reference(original), model, sets)
    record.own_max_rel = own_max_rel(context, original, model, sets)
    record.fidelity_source = (
        f"{fit.count} calibration samples"
        + ("" if held is None else f" and {held.count} held-out samples")
        + f" of {calib.source}"
    )
    return record


def _refuse_unplaced(model: ir.Model, settings: QuantSettings) -> None:
    """Refuse, before calibrating, a model whose every Conv/Gemm/MatMul stays float (each
    with its reason): the model would come back unchanged."""
    placement = _place(model, settings)
    if placement.compute:
        return
    layers = [
        LayerPrecision(node.name, node.op_type, "float", placement.floats[node.name])
        for node in model.graph
        if node.op_type in placing.COMPUTE and node.name in placement.floats
    ]
    raise UserInputError(QuantRecord(mode="int8", layers=layers).unchanged_refusal())


def make_plan(model: ir.Model, settings: QuantSettings, calib: CalibrationSet) -> QuantPlan:
    """Ranges of every tensor the placement may quantize, from one pass over ``calib``."""
    placement = _place(model, settings)
    values = _values(model)
    wanted = set(placement.tensors)
    # Compute outputs before their epilogue: a re-placement (an excluded Relu) needs them.
    wanted.update(placement.raw_outputs.values())
    wanted = {name for name in wanted if name in values}
    channel_axes = _input_channel_axes(model, placement) if settings.bias_correction else {}
    consumers: dict[str, list[ir.Node]] = {}
    auto = settings.calib_method == "auto"
    observed = set(wanted) | set(channel_axes)
    if auto:
        runner_inputs = set()
        for name in sorted(set(placement.tensors) & wanted):
            users = _consumers(values[name])
            consumers[name] = users
            for node in users:
                runner_inputs.update(
                    v.name for v in node.inputs if v is not None and not placing.is_weight(v)
                )
        observed |= {n for n in runner_inputs if n in values and placing.is_float(values[n])}
    stats = collect(
        model,
        sorted(observed),
        calib,
        channel_axes=channel_axes,
        keep=AUTO_SAMPLES if auto else 0,
    )
    plan = QuantPlan(settings, {})
    if settings.int8_weights == "gptq":
        from graphopt.passes.quantization.int8_rounding import round_weights

        rounded = round_weights(model, placement.weights, calib, settings.per_channel)
        plan.weights, plan.weight_note = rounded.weights, rounded.note()
    for name, axis in sorted(channel_axes.items()):
        mean = stats[name].channel_mean
        if mean is not None and axis is not None:
            plan.input_means[name] = mean
    outputs = {v.name for v in model.graph.outputs}
    for name in sorted(wanted & outputs):
        # A model output is never clipped: its extremes are the answer (a classifier's top
        # logit is the outlier every clipping method would cut).
        plan.ranges[name] = calibrate(stats[name], "minmax", settings.activation_type)
    spare = wanted - outputs - set(placement.tensors)
    for name in sorted(spare):
        # Only a re-placement uses these (mixed precision keeping an epilogue in float):
        # not worth replaying consumers for.
        method = "percentile" if auto else settings.calib_method
        plan.ranges[name] = calibrate(stats[name], method, settings.activation_type)
    if auto:
        from graphopt.passes.quantization.auto_method import ConsumerRunner, choose

        runner = ConsumerRunner(model)
        for name in sorted(wanted - outputs - spare):
            chosen, _ = choose(
                name,
                stats,
                consumers[name],
                runner,
                lambda r: _params(r, settings),
                settings.activation_type,
            )
            plan.ranges[name] = chosen
    else:
        for name in sorted(wanted - outputs - spare):
            plan.ranges[name] = calibrate(
                stats[name], settings.calib_method, settings.activation_type
            )
    return plan


def build_quantized(
    model: ir.Model, plan: QuantPlan, excluded_nodes: frozenset[str] = frozenset()
) -> ir.Model:
    """A quantized copy of ``model`` (unchanged) with ``excluded_nodes`` kept in float."""
    return _build(model, plan, excluded_nodes)[0]


def _build(
    model: ir.Model, plan: QuantPlan, excluded_nodes: frozenset[str]
) -> tuple[ir.Model, placing.Placement, Emitted]:
    settings = plan.settings
    placement = _place(model, settings, excluded_nodes)
    params: dict[str, QuantParams] = {}
    values = _values(model)
    for root, members in placement.groups().items():
        known = [plan.ranges[m] for m in members if m in plan.ranges]
        if not known:
            # No statistics for this group (a placement the plan did not foresee): float.
            for member in members:
                del placement.tensors[member]
            continue
        lo, hi = min(r.lo for r in known), max(r.hi for r in known)
        clipped = any(_made_by(values, m, "Clip") for m in members)
        params[root] = _params(Range(lo, hi, ""), settings, clipped)
    clone = model.clone()
    means = None
    if settings.bias_correction and plan.input_means:
        means = {
            node.name: plan.input_means[node.inputs[0].name]
            for node in clone.graph
            if node.name in placement.weights and node.inputs[0].name in plan.input_means
        }
    emitted = emit_qdq(clone, placement, params, settings.per_channel, means, plan.weights)
    if settings.quant_format == "qoperator":
        from graphopt.passes.quantization.qoperator import to_qoperator

        to_qoperator(clone, emitted)
    _drop_unused_initializers(clone.graph)
    return clone, placement, emitted


def _place(
    model: ir.Model, settings: QuantSettings, excluded_nodes: frozenset[str] = frozenset()
) -> placing.Placement:
    placement = placing.place(
        model,
        settings.excluded,
        excluded_nodes,
        outputs_too=_outputs_too(settings),
        target=settings.target,
    )
    _float_matmul_outputs(model, placement)
    return placement


def _float_matmul_outputs(model: ir.Model, placement: placing.Placement) -> list[str]:
    """Leave a MatMul's output float when nothing int8 reads it (the bias Add of a
    transformer's projections): a Q/DQ there only rounds what float ops read next, and per
    tensor, where a transformer's hidden state has its outlier channels (on MiniLM it cost
    more than all other rounding together). Runtimes fuse DQ→MatMul with a float output
    (ONNX Runtime: MatMulIntegerToFloat); Conv and Gemm keep theirs (QLinearConv and QGemm
    need the Q). Returns the tensors left float."""
    groups = placement.groups()
    dropped = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.name not in placement.compute:
            continue
        out = node.outputs[0]
        if groups.get(out.name) != [out.name] or out.is_graph_output():
            continue  # an epilogue's output, or a scale shared with data movement
        if any(use.node.name in placement.compute for use in out.uses()):
            continue
        del placement.tensors[out.name]
        placement.compute[node.name] += ", float output (read by float ops)"
        dropped.append(out.name)
    return dropped


def _outputs_too(settings: QuantSettings) -> bool:
    """Quantize graph outputs too: only for ORT, which fuses a Conv/Gemm into its integer
    kernel only with a Q after it (the outputs then carry int8 rounding; the record shows
    it). Portable models keep float outputs (TensorRT fuses DQ→op with a float output)."""
    return settings.target == "ort"


def _params(r: Range, settings: QuantSettings, clipped: bool = False) -> QuantParams:
    # s8: symmetric (zero point 0, what TensorRT requires) unless the target is ORT, whose
    # Relu folding needs the zero point at the bottom of a one-sided range. ``clipped``: a
    # Clip's output, whose scale ORT's optimizer must not read as empty (SYMMETRIC_MIN_SCALE).
    symmetric = settings.activation_type == "s8" and settings.target != "ort"
    floor = SYMMETRIC_MIN_SCALE if clipped else 0.0
    return params_for(r.lo, r.hi, settings.activation_type, symmetric, floor)


def _made_by(values: dict[str, ir.Value], tensor: str, op_type: str) -> bool:
    value = values.get(tensor)
    node = value.producer() if value is not None else None
    return node is not None and node.op_type == op_type


def _values(model: ir.Model) -> dict[str, ir.Value]:
    found = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            found[out.name] = out
    return found


def _consumers(value: ir.Value) -> list[ir.Node]:
    seen: dict[str, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(use.node.name, use.node)
    return [seen[name] for name in sorted(seen)]


def _input_channel_axes(model: ir.Model, placement: placing.Placement) -> dict[str, int]:
    """Inputs of the weighted compute nodes and their channel axis (bias correction)."""
    axes: dict[str, int] = {}
    for node in model.graph:
        if node.name not in placement.weights:
            continue
        value = node.inputs[0]
        if value is None:
            continue
        axes[value.name] = 1 if node.op_type == "Conv" else -1
    return axes


def _drop_unused_initializers(graph: ir.Graph) -> None:
    """The float weights replaced by int8 ones (kept names would double the file)."""
    used = {v.name for node in graph for v in node.inputs if v is not None}
    used |= {v.name for v in graph.outputs}
    for name in sorted(graph.initializers):
        value = graph.initializers[name]
        if name not in used and not value.uses() and not value.is_graph_input():
            del graph.initializers[name]


def _equalize(
    model: ir.Model, settings: QuantSettings, calib: CalibrationSet, record: QuantRecord
) -> None:
    """Cross-layer equalization before the plan: ``--equalize`` forces it either way; unset,
    it runs on models with depthwise convolutions (whose per-channel weight ranges differ
    most, while the activation between them and the pointwise Conv has one scale)."""
    from graphopt.passes.quantization import equalization

    wanted = settings.equalize
    if "equalize" in settings.defaulted:
        wanted = equalization.has_depthwise(model)
        if wanted:
            record.notes.append("--equalize defaulted on: the model has depthwise convolutions")
    if wanted:
        record.notes.append(equalization.equalize(model, settings, calib))


def _merge_shortcuts(
    model: ir.Model, settings: QuantSettings, record: QuantRecord
) -> dict[str, str]:
    """For ``--target ort``: ``Add(Conv1x1, Conv1x1)`` as one Conv over both inputs
    (:mod:`.shortcut_merge`). Before the plan: calibration and rounding see the merged Conv.
    Returns each merged node's name -> the Conv it became (for the per-layer table)."""
    if settings.target != "ort":
        return {}
    from graphopt.passes.quantization import shortcut_merge

    merged = shortcut_merge.merge_summed_pointwise_convs(model, settings.excluded)
    if merged:
        record.notes.append(shortcut_merge.note(merged))
    return shortcut_merge.final_names(merged)


def _pad_channels(
    model: ir.Model, plan: QuantPlan, excluded: frozenset[str], record: QuantRecord
) -> None:
    """For ``--target ort``: stem Convs folded by SpaceToDepth (stride 2,
    :mod:`.stem_space_to_depth`) or else padded to 4k input channels, so that ORT runs them
    with its direct int8 conv kernels (:mod:`.channel_padding`). After the plan, which carries over
    to the padded names unchanged: the zero channel must not move the input's range (a
    histogram of 25% zeros would) nor the weights' rounding."""
    settings = plan.settings
    if settings.target != "ort":
        return
    from graphopt.passes.quantization import channel_padding, stem_space_to_depth

    def keep(node: ir.Node) -> bool:
        return settings.excluded(node) or node.name in excluded

    folded = stem_space_to_depth.fold_stems(model, keep)
    for stem in folded:
        _carry_plan(
            plan,
            (stem.x.name, stem.folded.name),
            stem.fold_channels,
            (stem.weight, stem.new_weight),
            stem.fold_weight,
        )
    if folded:
        record.notes.append(stem_space_to_depth.note(folded))
    padded = channel_padding.pad_stem_channels(model, keep)
    for conv in padded:
        _carry_plan(
            plan,
            (conv.x.name, conv.padded.name),
            lambda mean, c=conv: channel_padding.zero_channels(mean, c.extra, axis=0),
            (conv.weight, conv.padded_weight),
            lambda codes, c=conv: channel_padding.zero_channels(codes, c.extra, axis=1),
        )
    if padded:
        record.notes.append(channel_padding.note(padded))


def _carry_plan(
    plan: QuantPlan,
    inputs: tuple[str, str],
    map_mean: Callable[[np.ndarray], np.ndarray],
    weights: tuple[str, str],
    map_codes: Callable[[np.ndarray], np.ndarray],
) -> None:
    """The plan of a Conv whose input and weight were renamed (old, new) by an exact layout
    rewrite: the same range, the per-channel mean and the int8 codes laid out as the new
    weight is (the scales are per output channel, which the rewrites keep)."""
    old_input, new_input = inputs
    if old_input in plan.ranges:
        plan.ranges[new_input] = plan.ranges[old_input]
    if old_input in plan.input_means:
        plan.input_means[new_input] = map_mean(plan.input_means[old_input])
    old_weight, new_weight = weights
    for (name, axis), weight in list(plan.weights.items()):
        if name == old_weight:
            plan.weights[(new_weight, axis)] = QuantizedWeight(
                map_codes(weight.values), weight.scale, weight.axis
            )


def _mixed_precision(
    model: ir.Model,
    original: ir.Model,
    plan: QuantPlan,
    fit: CalibrationSet,
    held: CalibrationSet | None,
    record: QuantRecord,
    reference: ir.Model | None = None,
) -> frozenset[str]:
    """The compute layers (Conv/Gemm/MatMul) to keep in float so --min-cosine/--max-error
    holds on held-out samples (sensitivities measured on the fit samples)."""
    from graphopt.passes.quantization import mixed_precision as mp

    placement = _place(model, plan.settings)
    candidates = sorted(
        node.name
        for node in model.graph
        if node.name in placement.compute and node.op_type in placing.COMPUTE
    )
    target = mp.Target.from_settings(plan.settings)
    # The target is the user's: measured against the run's original (``reference``) when an
    # earlier lossy pass changed the model, else a pruned model meets --min-cosine on the
    # pruning's error alone. Speed-ups stay against the model given (what this pass adds).
    reference = reference if reference is not None else original
    evaluate = mp.fidelity_evaluator(reference, fit)
    # Judged on held-out and calibration samples, the worst (and refused when the held-out
    # samples cannot resolve an agreement target): mp.target_check.
    check = mp.target_check(reference, fit, held, target, fit_evaluator=evaluate)
    feeds = next(iter((held or fit).batches(trim=False)))
    kept, curve = mp.search(
        lambda kept: build_quantized(model, plan, kept),
        candidates,
        evaluate,
        target,
        check=check.evaluate,
        speed=mp.speed_meter(original, feeds),
    )
    record.curve = curve
    mp.conclude(record, target, kept, candidates, check, chained=reference is not original)
    return kept


def _fill_record(
    record: QuantRecord,
    original: ir.Model,
    quantized: ir.Model,
    plan: QuantPlan,
    placement: placing.Placement,
    emitted: Emitted,
    merged_into: dict[str, str],
) -> None:
    settings = plan.settings
    for node in original.graph:
        if node.op_type in placing.UNREPORTED:
            continue
        merged = merged_into.get(node.name)
        if merged is not None:
            # Reported as the Conv it became runs: int8, or kept float (mixed precision).
            if merged in placement.compute:
                how, precision = placement.compute[merged], "int8"
            else:
                how, precision = placement.floats.get(merged, "float (not placed)"), "float"
            record.layers.append(
                LayerPrecision(node.name, node.op_type, precision, f"merged into {merged}: {how}")
            )
        elif node.name in placement.compute:
            record.layers.append(
                LayerPrecision(node.name, node.op_type, "int8", placement.compute[node.name])
            )
        else:
            reason = placement.floats.get(node.name, "float (not placed)")
            record.layers.append(LayerPrecision(node.name, node.op_type, "float", reason))
    record.type_changes = emitted.type_changes
    record.weight_bytes_before = weight_bytes(original)
    record.weight_bytes_after = weight_bytes(quantized)
    symmetric = settings.activation_type == "s8" and settings.target != "ort"
    record.notes.append(
        f"{settings.quant_format.upper()} form; weights s8 "
        f"{'per-channel' if settings.per_channel else 'per-tensor'} symmetric; activations "
        f"{settings.activation_type} {'symmetric' if symmetric else 'asymmetric'}"
    )
    outputs = {v.name for v in original.graph.outputs}
    ranged = [t for t in placement.tensors if t in plan.ranges and t not in outputs]
    methods = Counter(plan.ranges[t].method for t in ranged)
    counts = ", ".join(f"{m} {n}" for m, n in sorted(methods.items()))
    label = "auto chose" if settings.calib_method == "auto" else "method"
    if ranged:  # none: nothing was quantized, and the note would end in "auto chose "
        record.notes.append(
            f"activation ranges of {len(ranged)} tensors ({len(placement.groups())} scales): "
            f"{label} {counts}"
        )
    # Only those a node computes: a graph input passed through to an output stays as fed.
    computed = {out.name for node in original.graph for out in node.outputs}
    quantized_outputs = sorted(outputs & set(placement.tensors) & computed)
    if not placement.outputs_quantized:
        quantized_outputs = []  # read by int8 layers through a Q/DQ, left float as outputs
    if quantized_outputs:
        record.notes.append(
            f"model outputs quantized too (ORT fuses Conv/Gemm only with a Q after it), "
            f"with their full range: {', '.join(quantized_outputs)}"
        )
    if plan.weight_note:
        record.notes.append(plan.weight_note)
    if settings.bias_correction:
        corrected = sum(1 for n in emitted.weights if n in emitted.corrected)
        record.notes.append(f"bias correction (weight rounding shift) on {corrected} layers")
    if emitted.bias_fitted:
        record.notes.append(
            "weight scales raised so the int32 bias fits (input ~0 next to its bias, as "
            f"quantized): {', '.join(sorted(emitted.bias_fitted))}"
        )


__all__ = ["QuantPlan", "TensorStats", "build_quantized", "make_plan", "quantize_static"]
