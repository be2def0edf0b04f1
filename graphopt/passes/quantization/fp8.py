"""``--quantize fp8``: FLOAT8E4M3FN Q/DQ around Conv/MatMul/Gemm, the form TensorRT reads.

Weights are stored in E4M3 (one byte) behind a DequantizeLinear: per output channel with
``--per-channel`` (the default; DequantizeLinear-19 takes an axis for float8, and TensorRT
reads per-channel FP8 weights), else per tensor. Activations entering those ops get a
QuantizeLinear/DequantizeLinear pair whose scale is the calibration data's max |x| / 448
(E4M3's largest finite value), so ``--calib`` is required. The float8 zero points are 0 (E4M3
has no asymmetric form) and QuantizeLinear saturates (its default), so an activation beyond
the calibrated range clips to ±448 steps instead of becoming NaN.

Float8 types and their Q/DQ exist from opset 19: an older model is a user error naming
``--opset 19``. ONNX Runtime's CPU provider runs float8 Q/DQ (it computes the Conv/MatMul in
float32 between them), so fidelity is measured on the emitted model itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.errors import UserInputError
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.placement import (
    overridable,
    overridable_reason,
    weight_refusal,
)
from graphopt.passes.quantization.record import (
    LayerPrecision,
    QuantRecord,
    TypeChange,
    dtype_name,
    measure_fidelity,
    own_max_rel,
    weight_bytes,
)
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.registry import PassContext

FP8 = ir.DataType.FLOAT8E4M3FN
E4M3_MAX = 448.0
MIN_OPSET = 19
FP8_IR_VERSION = 9  # float8 tensors (onnx.checker and ORT refuse them at a lower IR version)
TARGET_OPS = ("Conv", "MatMul", "Gemm")


def quantize_fp8(
    model: ir.Model, settings: QuantSettings, calib: CalibrationSet | None, context: PassContext
) -> QuantRecord:
    """Insert E4M3 Q/DQ in place; the record lists every layer and the weights converted."""
    opset = editing.opset_version(model)
    if opset < MIN_OPSET:
        raise UserInputError(
            f"quantize fp8: FLOAT8E4M3FN Q/DQ needs opset {MIN_OPSET} or higher (the model is "
            f"at opset {opset}): pass --opset {MIN_OPSET} (or higher)"
        )
    if calib is None:
        raise UserInputError("quantize fp8: activation scales need --calib FILE.npz")
    from graphopt.passes.quantization.float_types import fill_types

    fill_types(model)
    record = QuantRecord(mode="fp8")
    original = model.clone()
    record.weight_bytes_before = weight_bytes(model)
    fit, held = calib.split(settings.holdout)
    plan = _candidates(model, settings, record)
    if not plan:  # before observing anything: the model would come back as given
        raise UserInputError(record.unchanged_refusal())
    if model.ir_version < FP8_IR_VERSION:  # --opset 19 keeps the IR version it found
        model.ir_version = FP8_IR_VERSION
    peaks = _activation_peaks(model, [x for _, x, _ in plan], fit)
    graph = model.graph
    # Value and node names in one table: a weight read at two axes (MatMul and a transB
    # Gemm) gets two DequantizeLinear nodes from one base name, and ONNX wants node names
    # unique too (editing.unique_name checks value names only).
    names = editing.NameTable(graph)
    dequantized: dict[int, ir.Value] = {}  # activation value id -> its Q/DQ output
    weights: dict[tuple[int, int | None], ir.Value] = {}  # (weight id, axis) -> DQ output
    for node, activation, (weight, axis) in plan:
        key = (id(weight), axis)
        if key not in weights:
            listed = any(k[0] == id(weight) for k in weights)  # once per tensor in the record
            weights[key] = _dequantized_weight(graph, names, weight, axis, node)
            if not listed:
                record.type_changes.append(
                    TypeChange(weight.name or "weight", "float", dtype_name(FP8))
                )
        node.replace_input_with(1, weights[key])
        if id(activation) not in dequantized:
            # A tensor calibration never saw nonzero keeps a unit range, not a zero scale.
            scale = (peaks.get(activation.name, 0.0) or 1.0) / E4M3_MAX
            dequantized[id(activation)] = _qdq(graph, names, activation, scale)
        node.replace_input_with(0, dequantized[id(activation)])
        record.layers.append(
            LayerPrecision(
                node.name or "",
                node.op_type,
                "fp8",
                f"E4M3 weights {'per channel' if axis is not None else 'per tensor'}, "
                f"activation scale {peaks.get(activation.name, 0.0):.3g}/448",
            )
        )
    record.layers.sort(key=_order(graph))
    replaced = {id(weight): weight for _, _, (weight, _) in plan}
    for weight in replaced.values():  # the float weights now stored in E4M3
        if not weight.uses() and not weight.is_graph_output() and weight.is_initializer():
            graph.initializers.pop(weight.name)
    record.weight_bytes_after = weight_bytes(model)
    record.notes.append(
        "fp8: Conv/MatMul/Gemm inputs through FLOAT8E4M3FN QuantizeLinear/DequantizeLinear "
        "(activation scale = calibration max |x| / 448); other ops run in float"
    )
    sets = {"calibration": fit} if held is None else {"calibration": fit, "held-out": held}
    record.fidelity_source = f"{calib.count} samples of {calib.source}" + (
        f", {held.count} held out" if held is not None else ""
    )
    # Measured with ORT's graph optimizations off only: ORT 1.32's QDQ optimizer mistakes
    # float8 Q/DQ for integer ones. It removes a Relu in front of a float8 QuantizeLinear
    # (valid for uint8 with zero point 0, not for E4M3, which keeps negatives) and fails the
    # session outright on a Clip (Relu6) in front of one. Neither is the model's numerics.
    reference = context.fidelity_reference(original)  # the run's original, if moved
    record.fidelity = measure_fidelity(reference, model, sets, unoptimized_only=True)
    record.own_max_rel = own_max_rel(context, original, model, sets)
    record.notes.append(
        "fp8: fidelity from ONNX Runtime CPU with graph optimizations off (the model's own "
        "float8 Q/DQ numerics); ORT 1.32's optimizer mishandles float8 Q/DQ (removes Relus "
        "before them, fails on Clip), so no 'ORT optimized' rows; TensorRT is the target"
    )
    return record


def _order(graph: ir.Graph):
    place = {node.name: i for i, node in enumerate(graph)}
    return lambda layer: place.get(layer.node, len(place))


def _candidates(
    model: ir.Model, settings: QuantSettings, record: QuantRecord
) -> list[tuple[ir.Node, ir.Value, tuple[ir.Value, int | None]]]:
    """(node, activation input, (float weight, channel axis or None)) to quantize; the rest
    of the Conv/MatMul/Gemm nodes go to the record as float with the reason."""
    plan = []
    for node in model.graph:
        if not editing.is_op(node, TARGET_OPS):
            continue
        reason = _skip_reason(node, settings)
        if reason:
            record.layers.append(LayerPrecision(node.name or "", node.op_type, "float", reason))
            continue
        weight = node.inputs[1]
        plan.append((node, node.inputs[0], (weight, _channel_axis(node, settings))))
    return plan


def _skip_reason(node: ir.Node, settings: QuantSettings) -> str:
    if settings.excluded(node):
        return "--exclude"
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return "no weight input"
    if node.inputs[0].dtype != ir.DataType.FLOAT:
        return f"activation is {dtype_name(node.inputs[0].dtype)}, not float32"
    weight = node.inputs[1]
    if overridable(weight):
        return overridable_reason(weight.name)
    if weight.dtype != ir.DataType.FLOAT or editing.constant_array(weight) is None:
        return weight_refusal(node) or "weight is not a float32 constant"
    if node.op_type == "Gemm" and editing.attribute(node, "transA", 0):
        return "Gemm with transA"
    return ""


def _channel_axis(node: ir.Node, settings: QuantSettings) -> int | None:
    """The weight's output-channel axis for per-channel scales, or None (per tensor)."""
    if not settings.per_channel:
        return None
    rank = len(editing.constant_array(node.inputs[1]).shape)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if editing.attribute(node, "transB", 0) else 1
    return 1 if rank == 2 else None  # MatMul [K, N]; batched weights per tensor


def quantize_e4m3(array: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(E4M3 values, float32 scale: scalar or one per channel along ``axis``)."""
    import ml_dtypes

    values = array.astype(np.float32)
    if axis is None:
        peak = np.array(np.abs(values).max(initial=0.0), dtype=np.float32)
        shaped = peak
    else:
        other = tuple(i for i in range(values.ndim) if i != axis)
        peak = np.abs(values).max(axis=other, initial=0.0).astype(np.float32)
        shaped = np.expand_dims(peak, other)
    scale = np.where(peak > 0, peak / E4M3_MAX, 1.0).astype(np.float32)
    step = np.where(shaped > 0, shaped / E4M3_MAX, 1.0).astype(np.float32)
    # Rounding the division can land a hair above 448, which E4M3FN has no value for.
    scaled = np.clip(values / step, -E4M3_MAX, E4M3_MAX)
    return scaled.astype(ml_dtypes.float8_e4m3fn), scale


def _dequantized_weight(
    graph: ir.Graph,
    names: editing.NameTable,
    weight: ir.Value,
    axis: int | None,
    node: ir.Node,
) -> ir.Value:
    import ml_dtypes

    array = editing.constant_array(weight)
    q, scale = quantize_e4m3(array, axis)
    base = weight.name or "weight"
    stored = names.add_initializer(graph, f"{base}_e4m3", q)
    scale_value = names.add_initializer(graph, f"{base}_scale", scale)
    zero = names.add_initializer(
        graph, f"{base}_zero", np.zeros(scale.shape, dtype=ml_dtypes.float8_e4m3fn)
    )
    attributes = [] if axis is None else [ir.AttrInt64("axis", axis)]
    out = ir.Value(
        name=names.take(f"{base}_dequantized"),
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=weight.shape,
    )
    dq = ir.Node(
        "",
        "DequantizeLinear",
        [stored, scale_value, zero],
        attributes=attributes,
        outputs=[out],
        name=names.take(f"{base}_DequantizeLinear"),
    )
    graph.insert_before(node, dq)
    return out


def _qdq(graph: ir.Graph, names: editing.NameTable, activation: ir.Value, scale: float) -> ir.Value:
    """QuantizeLinear → DequantizeLinear of ``activation`` right after it is produced."""
    import ml_dtypes

    base = activation.name or "activation"
    scale_value = names.add_initializer(
        graph, f"{base}_fp8_scale", np.array(scale, dtype=np.float32)
    )
    zero = names.add_initializer(
        graph, f"{base}_fp8_zero", np.zeros((), dtype=ml_dtypes.float8_e4m3fn)
    )
    quantized = ir.Value(
        name=names.take(f"{base}_e4m3"),
        type=ir.TensorType(FP8),
        shape=activation.shape,
    )
    q = ir.Node(
        "",
        "QuantizeLinear",
        [activation, scale_value, zero],
        outputs=[quantized],
        name=names.take(f"{base}_QuantizeLinear"),
    )
    restored = ir.Value(
        name=names.take(f"{base}_fp8_dequantized"),
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=activation.shape,
    )
    dq = ir.Node(
        "",
        "DequantizeLinear",
        [quantized, scale_value, zero],
        outputs=[restored],
        name=names.take(f"{base}_DequantizeLinear"),
    )
    producer = activation.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, [q, dq])
    else:
        graph.insert_before(graph.node(0), [q, dq])
    return restored


def _activation_peaks(
    model: ir.Model, activations: list[ir.Value], calib: CalibrationSet
) -> dict[str, float]:
    """max |x| of each activation over ``calib``."""
    from graphopt.passes.calibration.activations import observe
    from graphopt.passes.quantization.float_plan import peak_magnitude

    names = sorted({v.name for v in activations if v.name})
    peaks: dict[str, float] = {}
    inputs = {v.name for v in model.graph.inputs}
    for name in names:
        if name in inputs and name in calib.arrays:
            peaks[name] = peak_magnitude(calib.arrays[name])
    observed = [n for n in names if n not in inputs]
    if observed:
        for _, values in observe(model, observed, calib):
            for name, array in values.items():
                peaks[name] = max(peaks.get(name, 0.0), peak_magnitude(array))
    return peaks
