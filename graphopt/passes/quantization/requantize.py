"""``--requantize symmetric``: an asymmetrically quantized model in the form TensorRT takes.

ONNX Runtime's quantizers write uint8 tensors with non-zero zero points (``quantize_static``
activations, ``quantize_dynamic`` embeddings and its MatMulInteger form); TensorRT quantizes
symmetrically to int8 and its parser rejects them. graphopt never rewrites that silently: this
lossy pass, asked for by flag, re-rounds each one and measures what it cost:

- a weight DequantizeLinear (constant uint8/int8 input, non-zero zero point): dequantized and
  re-rounded to int8 with a symmetric scale over the same axis, zero point 0;
- an activation QuantizeLinear and the DequantizeLinears reading it: the same representable
  range, made symmetric (scale = max(|lo|, |hi|) / 127, zero point int8 0);
- ORT's dynamic form (DynamicQuantizeLinear -> MatMulInteger/ConvInteger -> Cast -> Mul by
  the scales): becomes MatMul/Conv(x, DequantizeLinear(int8 symmetric weight)), weight-only
  int8 (activations are no longer quantized at run time: a declared precision change, in
  the report);
- a constant DequantizeLinear that is no layer's weight (ORT quantizes the scalar factors of
  Mul/Add too) and is asymmetric, or any rank-0 one: stored as the float constant it computes
  (exact, noted in the report). TensorRT's builder rejects a rank-0 quantized constant
  ("Quantized constant ... is only allowed before DQ"), which its parser accepts.

Fidelity against the model as given is measured on --calib data or generated inputs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.errors import UserInputError
from graphopt.passes.calibration import CALIB_OPTION
from graphopt.passes.quantization.record import (
    LayerPrecision,
    QuantRecord,
    TypeChange,
    measure_fidelity,
    weight_bytes,
)
from graphopt.registry import GraphPass, PassOption, Stage, register

_LEVELS = 127.0  # int8 symmetric: [-127, 127], as TensorRT rounds
_INTEGER_OPS = (
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "QAttention",
)


@register
class RequantizeSymmetricPass(GraphPass):
    """Asymmetric (uint8, zero-point) Q/DQ → symmetric int8 as TensorRT needs (lossy)."""

    name = "requantize"
    exact = False
    stage = Stage.QUANTIZE
    handles_subgraphs = False
    flag = "--requantize"
    flag_metavar = "symmetric"
    flag_help = (
        "re-round an asymmetrically quantized model (ORT's uint8 / zero-point Q/DQ, "
        "MatMulInteger and ConvInteger) to symmetric int8, which TensorRT's parser takes; "
        "fidelity reported"
    )
    ops = frozenset(("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger"))
    options = (
        PassOption("mode", str, "symmetric", "requantization", choices=("symmetric",)),
        CALIB_OPTION,
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        if text.strip().lower() != "symmetric":
            raise UserInputError(f"--requantize {text}: expected symmetric")
        return {"mode": "symmetric"}

    def rewrite(self, model: ir.Model) -> int:
        start = time.perf_counter()
        record = QuantRecord(mode="requantize symmetric")
        record.weight_bytes_before = weight_bytes(model)
        original = model.clone()
        graph = model.graph
        for node in list(graph):
            if editing.is_op(node, ("MatMulInteger", "ConvInteger")):
                _dynamic_matmul(graph, node, record)
        done: set[int] = set()
        floated: list[str] = []
        for node in list(graph):
            if editing.is_op(node, "QuantizeLinear") and _asymmetric(node):
                _activation(node, record, done)
        for node in list(graph):
            weight_reader = editing.is_op(node, "DequantizeLinear") and id(node) not in done
            if weight_reader and _int32_bias(graph, node, record):
                continue
            if weight_reader and _float_constant(graph, node, floated):
                continue
            if weight_reader and _asymmetric(node):
                _weight(graph, node, record)
        if floated:
            scalars = sum(1 for kind in floated if kind == "scalar")
            record.notes.append(
                f"{len(floated)} quantized constant(s) that are no layer's weight ({scalars} "
                "scalar) stored in float, as their DequantizeLinear computed them (exact; "
                "TensorRT's builder rejects a rank-0 quantized constant)"
            )
        left = [n for n in graph if editing.is_op(n, _INTEGER_OPS) or _asymmetric(n)]
        if left:
            record.notes.append(
                f"{len(left)} node(s) left as they were (not a form this pass converts): "
                + ", ".join(sorted({f"{n.op_type}" for n in left}))
            )
        for node in list(graph):  # the float scales and casts the dynamic form left behind
            editing.remove_if_dead(node)
        record.weight_bytes_after = weight_bytes(model)
        if record.layers:
            # No float original exists here: the table's title says what it is against.
            record.fidelity_against = "the model as given (already quantized)"
            sets = self._fidelity_sets(original, record)
            if sets:
                record.fidelity = measure_fidelity(original, model, sets, optimized_too=False)
        record.seconds = time.perf_counter() - start
        record.settings = dict(self.settings)
        record.summary = (
            f"requantize symmetric: {len(record.layers)} tensors re-rounded to int8 with zero "
            "point 0 (lossy)"
        )
        self.context.details["requantize"] = record
        return len(record.layers) + len(floated)

    def _fidelity_sets(self, original: ir.Model, record: QuantRecord) -> dict:
        from graphopt.passes.calibration.samples import load_calibration, random_calibration

        source = self.settings["calib"]
        try:
            if source and source != "random":
                calib = load_calibration(source, original)
                record.fidelity_source = f"{calib.count} samples of {source}"
                return {"calibration": calib}
            calib = random_calibration(
                original, dict(self.context.input_shapes), owner="requantize"
            )
        except UserInputError as exc:
            self.context.note(f"requantize: fidelity not measured: {exc}")
            return {}
        record.fidelity_source = f"{calib.count} generated inputs (no --calib file)"
        return {"generated": calib}


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and editing.is_op(node, op_type)


def _asymmetric(node: ir.Node) -> bool:
    """A Q/DQ whose zero point is a uint8 constant or a non-zero one."""
    if not editing.is_op(node, ("QuantizeLinear", "DequantizeLinear")) or len(node.inputs) < 3:
        return False
    zero_point = editing.constant_array(node.inputs[2])
    if zero_point is None:
        return False
    return zero_point.dtype == np.uint8 or bool(np.any(zero_point != 0))


def _weight(graph: ir.Graph, node: ir.Node, record: QuantRecord) -> None:
    """A constant weight's DequantizeLinear, or one reading a Gather of a constant table
    (an embedding: the table is re-rounded, per tensor)."""
    x, scale, zero_point = (editing.constant_array(v) for v in node.inputs[:3])
    gather = node.inputs[0].producer() if x is None else None
    if _is(gather, "Gather") and scale is not None and scale.size == 1:
        table = editing.constant_array(gather.inputs[0])
        if table is not None and zero_point is not None:
            _requantize(graph, node, table, scale, zero_point, record, gather)
        return
    if x is None or scale is None or zero_point is None or editing.attribute(node, "block_size"):
        return
    _requantize(graph, node, x, scale, zero_point, record, None)


def _requantize(
    graph: ir.Graph,
    node: ir.Node,
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    record: QuantRecord,
    gather: ir.Node | None,
) -> None:
    axis = int(editing.attribute(node, "axis", 1)) % max(x.ndim, 1)
    shape = [1] * x.ndim
    if scale.ndim == 1 and x.ndim:
        shape[axis] = -1
    real = (x.astype(np.float32) - zero_point.astype(np.float32).reshape(shape)) * scale.reshape(
        shape
    )
    if scale.ndim == 1 and x.ndim:
        others = tuple(i for i in range(x.ndim) if i != axis)
        peak = np.max(np.abs(real), axis=others) if others else np.abs(real)
    else:
        peak = np.max(np.abs(real))
    new_scale = np.maximum(peak / _LEVELS, np.finfo(np.float32).tiny).astype(scale.dtype)
    q = np.clip(np.round(real / new_scale.reshape(shape)), -_LEVELS, _LEVELS).astype(np.int8)
    stored = node.inputs[0] if gather is None else gather.inputs[0]
    name = stored.name or node.name or "weight"
    old = [*node.inputs[1:3], stored]
    values = [
        editing.add_initializer(graph, f"{name}_s8", q),
        editing.add_initializer(graph, f"{name}_s8_scale", new_scale),
        editing.add_initializer(graph, f"{name}_s8_zero", np.zeros(zero_point.shape, np.int8)),
    ]
    if gather is None:
        for index, value in enumerate(values):
            node.replace_input_with(index, value)
    else:
        # TensorRT takes a quantized constant only straight into a DequantizeLinear: the
        # table is dequantized first and gathered in float (per-tensor scale: same values).
        table = ir.node("DequantizeLinear", values, name=_node_name(graph, f"{name}_s8_dq"))
        table.outputs[0].name = editing.unique_name(graph, f"{name}_s8_dq")
        table.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(new_scale.dtype))
        editing.insert_before(gather, [table])
        gather.replace_input_with(0, table.outputs[0])
        gather.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(new_scale.dtype))
        editing.replace_value(node.outputs[0], gather.outputs[0])
        editing.remove_if_dead(node)
    _drop_unused(graph, old)
    record.type_changes.append(TypeChange(name, zero_point.dtype.name, "int8 symmetric"))
    record.layers.append(LayerPrecision(node.name or name, "weight", "int8", "symmetric"))


def _int32_bias(graph: ir.Graph, node: ir.Node, record: QuantRecord) -> bool:
    """ORT's int32 bias DequantizeLinear (TensorRT dequantizes 8-bit and smaller only): the
    bias in float, as the DequantizeLinear computed it (exact)."""
    x = editing.constant_array(node.inputs[0])
    scale = editing.constant_array(node.inputs[1])
    if x is None or scale is None or x.dtype != np.int32 or editing.attribute(node, "block_size"):
        return False
    name = _store_dequantized(graph, node, x, scale, "bias")
    record.notes.append(f"int32 bias {name}: stored in float (exact; TensorRT has no int32 DQ)")
    return True


def _store_dequantized(
    graph: ir.Graph, node: ir.Node, x: np.ndarray, scale: np.ndarray, fallback: str
) -> str:
    """Replace a constant DequantizeLinear by the float initializer it computes (exact: in
    float64, then the scale's type); returns the name it is stored under, less ``_float``."""
    zero = editing.constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    shape = [1] * x.ndim
    if scale.ndim == 1 and x.ndim:
        shape[int(editing.attribute(node, "axis", 1)) % x.ndim] = -1
    offset = 0 if zero is None else zero.astype(np.float64).reshape(shape)
    real = ((x.astype(np.float64) - offset) * scale.astype(np.float64).reshape(shape)).astype(
        scale.dtype
    )
    old = list(node.inputs)
    name = node.inputs[0].name or node.name or fallback
    editing.replace_value(node.outputs[0], editing.add_initializer(graph, f"{name}_float", real))
    editing.remove_if_dead(node)
    _drop_unused(graph, old)
    return name


# Inputs that hold a layer's weights (an embedding table too), re-rounded rather than stored
# in float: op -> input indices.
_WEIGHT_INPUTS = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "MatMul": (1,),
    "Gemm": (0, 1),
    "Gather": (0,),
}
# Ops a weight may pass through on its way to the op (layout only, values unchanged).
_LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def _feeds_weight_input(value: ir.Value) -> bool:
    """Whether ``value`` reaches the weight input of a Conv/ConvTranspose/MatMul/Gemm (through
    layout-only ops)."""
    for use in value.uses():
        reader, index = use.node, use.idx
        if editing.is_op(reader, _LAYOUT_OPS) and index == 0:
            if _feeds_weight_input(reader.outputs[0]):
                return True
        elif index in _WEIGHT_INPUTS.get(reader.op_type, ()) and reader.domain in ("", "ai.onnx"):
            return True
    return False


def _float_constant(graph: ir.Graph, node: ir.Node, floated: list[str]) -> bool:
    """A constant DequantizeLinear that is not a layer's weight: stored as the float constant
    it computes (exact), not re-rounded. ORT quantizes the scalar multipliers and addends of
    Mul/Add this way; TensorRT's builder takes a quantized constant only as a DequantizeLinear's
    input it keeps, and a rank-0 one never (the parser accepts it, the build fails: "Quantized
    constant ... is only allowed before DQ"), whatever its zero point."""
    x = editing.constant_array(node.inputs[0])
    scale = editing.constant_array(node.inputs[1])
    if x is None or scale is None or editing.attribute(node, "block_size"):
        return False
    if x.dtype not in (np.int8, np.uint8):
        return False
    if x.ndim and not (_asymmetric(node) and not _feeds_weight_input(node.outputs[0])):
        return False
    _store_dequantized(graph, node, x, scale, "constant")
    floated.append("scalar" if not x.ndim else "tensor")
    return True


def _drop_unused(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Initializers the rewrite stopped reading (the uint8 copies), so sizes are honest."""
    for value in values:
        if (
            value is not None
            and not value.uses()
            and value.name in graph.initializers
            and not value.is_graph_output()
            and not value.is_graph_input()
        ):
            graph.initializers.pop(value.name)


def _activation(node: ir.Node, record: QuantRecord, done: set[int]) -> None:
    scale = editing.constant_array(node.inputs[1])
    zero_point = editing.constant_array(node.inputs[2])
    readers = [use.node for use in node.outputs[0].uses()]
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return
    if not readers or not all(
        editing.is_op(r, "DequantizeLinear") and r.inputs[1] is not None for r in readers
    ):
        return
    info = np.iinfo(zero_point.dtype)
    low = (float(info.min) - float(zero_point.item())) * float(scale.item())
    high = (float(info.max) - float(zero_point.item())) * float(scale.item())
    new_scale = np.asarray(max(abs(low), abs(high)) / _LEVELS, dtype=scale.dtype).reshape(
        scale.shape
    )
    graph = editing.owning_graph(node)
    base = node.outputs[0].name or node.name or "activation"
    if abs(low + high) > 1e-6 * max(abs(low), abs(high)):
        # The asymmetric Q clamps to [low, high], and ORT's quantizers rely on it: a Relu
        # before a uint8 Q with zero point 0 is removed, the clamp at 0 doing its work. The
        # symmetric range is wider, so the clamp is kept as a Clip.
        bounds = [
            editing.add_initializer(graph, f"{base}_{end}", np.asarray(v, dtype=scale.dtype))
            for end, v in (("low", low), ("high", high))
        ]
        clip = ir.node(
            "Clip", [node.inputs[0], *bounds], name=_node_name(graph, f"{node.name}_clamp")
        )
        clip.outputs[0].name = editing.unique_name(graph, f"{base}_clamped")
        clip.outputs[0].type = node.inputs[0].type
        editing.insert_before(node, [clip])
        node.replace_input_with(0, clip.outputs[0])
    s = editing.add_initializer(graph, f"{base}_s8_scale", new_scale)
    z = editing.add_initializer(graph, f"{base}_s8_zero", np.zeros(zero_point.shape, np.int8))
    old = [v for user in (node, *readers) for v in user.inputs[1:3]]
    for user in (node, *readers):
        user.replace_input_with(1, s)
        user.replace_input_with(2, z)
        done.add(id(user))
    _drop_unused(graph, old)
    node.outputs[0].type = ir.TensorType(ir.DataType.INT8)
    record.type_changes.append(TypeChange(base, zero_point.dtype.name, "int8 symmetric"))
    record.layers.append(LayerPrecision(node.name or base, "activation", "int8", "symmetric"))


def _dynamic_matmul(graph: ir.Graph, node: ir.Node, record: QuantRecord) -> None:
    """DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq, xzp, Wzp) -> Cast -> Mul(., xs*Ws)
    becomes MatMul(x, DequantizeLinear(W int8 symmetric, scale, 0)); ConvInteger (its
    attributes are Conv's) becomes Conv the same way."""
    conv = editing.is_op(node, "ConvInteger")
    dynamic = node.inputs[0].producer() if node.inputs[0] is not None else None
    weight = editing.constant_array(node.inputs[1])
    w_zero = editing.constant_array(node.inputs[3]) if len(node.inputs) > 3 else None
    cast = editing.single_user(node.outputs[0])
    mul = editing.single_user(cast.outputs[0]) if cast is not None else None
    if (
        dynamic is None
        or not _is(dynamic, "DynamicQuantizeLinear")
        or weight is None
        or (weight.ndim < 3 if conv else weight.ndim != 2)
        or not _is(cast, "Cast")
        or not _is(mul, "Mul")
    ):
        return
    other = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
    scale_node = other.producer() if other is not None else None
    if not _is(scale_node, "Mul"):
        return
    w_scale = next(
        (editing.constant_array(v) for v in scale_node.inputs if editing.is_constant(v)), None
    )
    if w_scale is None:
        return
    # The weight's channel axis: MatMul's columns (1), Conv's output channels (0).
    axis = 0 if conv else 1
    channels = weight.shape[axis]
    if w_scale.size not in (1, channels) or (
        w_zero is not None and w_zero.size not in (1, channels)
    ):
        return
    shape = [1] * weight.ndim
    shape[axis] = -1
    zero = np.zeros(1, np.float32) if w_zero is None else w_zero.astype(np.float32)
    real = (weight.astype(np.float32) - zero.reshape(shape)) * w_scale.astype(np.float32).reshape(
        shape
    )
    per_channel = w_scale.size > 1 or (w_zero is not None and w_zero.size > 1)
    others = tuple(i for i in range(weight.ndim) if i != axis)
    peak = np.max(np.abs(real), axis=others) if per_channel else np.max(np.abs(real))
    new_scale = np.maximum(peak / _LEVELS, np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.round(real / new_scale.reshape(shape if per_channel else [])), -_LEVELS, _LEVELS)
    q = q.astype(np.int8)
    base = node.inputs[1].name or node.name or "weight"
    values = [
        dynamic.inputs[0],
        editing.add_initializer(graph, f"{base}_s8", q),
        editing.add_initializer(graph, f"{base}_s8_scale", new_scale),
        editing.add_initializer(graph, f"{base}_s8_zero", np.zeros(new_scale.shape, np.int8)),
    ]
    attributes = {"axis": axis} if per_channel else {}
    dequantize = ir.node(
        "DequantizeLinear", values[1:], attributes, name=_node_name(graph, f"{node.name}_dq")
    )
    op = "Conv" if conv else "MatMul"
    # ConvInteger's attributes (pads, strides, dilations, group, ...) are Conv's.
    kept = {k: v for k, v in node.attributes.items()} if conv else {}
    layer = ir.node(
        op,
        [values[0], dequantize.outputs[0]],
        attributes=kept,
        name=_node_name(graph, f"{node.name}_{op.lower()}"),
    )
    dequantize.outputs[0].name = editing.unique_name(graph, f"{base}_s8_dq")
    layer.outputs[0].name = editing.unique_name(graph, f"{node.name}_out")
    layer.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    editing.insert_before(mul, [dequantize, layer])
    editing.replace_value(mul.outputs[0], layer.outputs[0])
    old = [*node.inputs[1:], *scale_node.inputs]
    for dead in (mul, scale_node, cast, node):
        editing.remove_if_dead(dead)
    _drop_unused(graph, old)
    record.type_changes.append(TypeChange(base, "uint8 (activations dynamic uint8)", "int8"))
    record.layers.append(
        LayerPrecision(
            node.name or base,
            node.op_type,
            "int8 weight-only",
            "activations no longer quantized at run time",
        )
    )


def _node_name(graph: ir.Graph, base: str) -> str:
    """``base`` or ``base_1``, ... : free among node and value names (ONNX wants node names
    unique; editing.unique_name checks value names only)."""
    return editing.NameTable(graph).take(base)
