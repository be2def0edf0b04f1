"""Emitting a placement: QuantizeLinear/DequantizeLinear pairs (QDQ), weights in int8.

QDQ is the portable form (TensorRT reads it; ONNX Runtime fuses each DQ→op→Q into its
integer kernel): every quantized activation gets one Q→DQ pair right after its producer
and all its consumers read the DQ; weights are stored as int8 initializers followed by a
per-channel DequantizeLinear (``axis``); biases stay float (the runtime requantizes them to
int32 with ``x_scale · w_scale`` when it fuses). The QOperator form (QLinearConv, ...) is
derived from this in :mod:`graphopt.passes.quantization.qoperator`.

Two ONNX Runtime forms (``--target ort``; why: :mod:`graphopt.passes.quantization.placement`):
the placement's SiLU pairs are emitted as one ``com.microsoft`` QuickGelu reading the DQ,
and its spatial ReduceMeans as GlobalAveragePool (the same mean, a form ORT fuses in int8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.editing import NameTable, constant_array, register_array, take_over
from graphopt.passes.quantization.placement import Placement
from graphopt.passes.quantization.ranges import QuantParams
from graphopt.passes.quantization.record import TypeChange


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in int8: values, per-channel (or scalar) scales, the channel axis."""

    values: np.ndarray  # int8
    scale: np.ndarray  # float32, [C] or []
    axis: int | None

    def dequantized(self) -> np.ndarray:
        if self.axis is None:
            return self.values.astype(np.float32) * self.scale
        shape = [1] * self.values.ndim
        shape[self.axis] = -1
        return self.values.astype(np.float32) * self.scale.reshape(shape)


def quantize_weight(array: np.ndarray, axis: int | None) -> QuantizedWeight:
    """Symmetric int8 in [-127, 127], zero point 0; per channel along ``axis`` (None: one
    scale for the tensor)."""
    array = np.asarray(array, dtype=np.float32)
    if axis is None:
        peak = np.array(np.abs(array).max() if array.size else 0.0, dtype=np.float32)
    else:
        others = tuple(i for i in range(array.ndim) if i != axis)
        peak = np.abs(array).max(axis=others).astype(np.float32)
    # An all-zero channel quantizes to zeros with any scale; 1 keeps DequantizeLinear finite.
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    shaped = (
        scale
        if axis is None
        else scale.reshape([-1 if i == axis else 1 for i in range(array.ndim)])
    )
    values = np.clip(np.rint(array / shaped), -127, 127).astype(np.int8)
    return QuantizedWeight(values, scale, axis)


@dataclass
class Emitted:
    """What the emission changed (for the record)."""

    type_changes: list[TypeChange] = field(default_factory=list)
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # by node
    corrected: set[str] = field(default_factory=set)  # nodes whose bias was corrected
    bias_fitted: set[str] = field(default_factory=set)  # weight scales raised for the bias


def emit_qdq(
    model: ir.Model,
    placement: Placement,
    params: dict[str, QuantParams],
    per_channel: bool = True,
    input_means: dict[str, np.ndarray] | None = None,
    rounded: dict[tuple[str, int | None], QuantizedWeight] | None = None,
) -> Emitted:
    """Insert the placement's Q/DQ into ``model`` in place. ``params`` holds one entry per
    group root. With ``input_means`` (node -> per-channel mean of its input on calibration
    data), each node's bias absorbs the mean output shift its weight rounding causes.
    ``rounded``: weights already in int8 by ``(weight name, axis)`` (data-aware rounding);
    the others round to nearest."""
    graph = model.graph
    names = NameTable(graph)
    emitted = Emitted()
    nodes = {node.name: node for node in graph}
    order = {node.name: i for i, node in enumerate(graph)}
    cache: dict[tuple[str, int | None], tuple[ir.Value, QuantizedWeight]] = {}
    for node_name in sorted(placement.weights, key=order.__getitem__):
        node = nodes[node_name]
        index, axis = placement.weights[node_name]
        weight = node.inputs[index]
        axis = axis if per_channel else None
        base = (weight.name, axis)
        quantized = (rounded or {}).get(base) or quantize_weight(constant_array(weight), axis)
        fitted = _fit_bias(node, weight, quantized, _input_scale(node, placement, params))
        key: tuple = base
        if fitted is not None:
            quantized, key = fitted, (*base, fitted.scale.tobytes())
            emitted.bias_fitted.add(node_name)
        if key not in cache:
            # Listed once per tensor: a weight read at two axes (MatMul, transB Gemm) is
            # stored twice in int8, but it is one tensor whose type changed.
            if not any(k[0] == weight.name for k in cache):
                emitted.type_changes.append(TypeChange(weight.name, "float", "int8"))
            cache[key] = (_weight_dq(graph, names, node, weight, quantized), quantized)
        dq_value, quantized = cache[key]
        node.replace_input_with(index, dq_value)
        emitted.weights[node_name] = quantized
        if input_means and node_name in input_means:
            original = constant_array(weight) if weight.const_value is not None else None
            shift = _rounding_shift(node, original, quantized, input_means[node_name])
            if shift is not None and _shift_bias(graph, names, node, shift):
                emitted.corrected.add(node_name)
    scales: dict[str, tuple[ir.Value, ir.Value]] = {}
    values = _values_by_name(graph)
    for tensor in sorted(placement.tensors, key=lambda t: _position(values[t], order)):
        root = placement.tensors[tensor]
        p = params[root]
        if root not in scales:
            scales[root] = (
                register_array(
                    graph, names.take(f"{root}_scale"), np.array(p.scale, dtype=np.float32)
                ),
                register_array(
                    graph, names.take(f"{root}_zero_point"), np.array(p.zero_point, p.numpy_dtype)
                ),
            )
        _insert_pair(graph, names, values[tensor], *scales[root], p, placement.outputs_quantized)
    for name in sorted(placement.global_means):
        mean = nodes[name]
        _replace_node(graph, names, [mean], "", "GlobalAveragePool", [mean.inputs[0]], [])
    for mul_name in sorted(placement.silu):
        mul, sigmoid = nodes[mul_name], nodes[placement.silu[mul_name]]
        alpha = [ir.AttrFloat32("alpha", 1.0)]  # QuickGelu(x) = x·σ(alpha·x)
        _replace_node(
            graph, names, [mul, sigmoid], "com.microsoft", "QuickGelu", [sigmoid.inputs[0]], alpha
        )
    if placement.silu:
        model.opset_imports.setdefault("com.microsoft", 1)
    return emitted


def _replace_node(
    graph: ir.Graph,
    names: NameTable,
    old_nodes: list[ir.Node],
    domain: str,
    op_type: str,
    inputs: list[ir.Value | None],
    attributes: list[ir.Attr],
) -> None:
    """Replace ``old_nodes`` (the first one's output is the result) with one node that keeps
    the first one's name and output value name (the record and the Q/DQ refer to them)."""
    first = old_nodes[0]
    old = first.outputs[0]
    new = ir.Value(name=names.take(f"{old.name}_{op_type}"), shape=old.shape, type=old.type)
    node = ir.Node(domain, op_type, inputs, attributes=attributes, outputs=[new])
    graph.insert_before(first, node)
    node_name = first.name
    take_over(old, new)
    graph.remove(old_nodes, safe=True)
    node.name = node_name


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    found = {v.name: v for v in graph.inputs}
    for node in graph:
        for out in node.outputs:
            found[out.name] = out
    return found


def _position(value: ir.Value, order: dict[str, int]) -> int:
    producer = value.producer()
    return -1 if producer is None else order.get(producer.name, -1)


# Integer kernels add the bias to the int32 accumulator as round(b / (x_scale · w_scale)):
# ONNX Runtime requantizes a QDQ model's float bias that way when it fuses (and the QOperator
# form stores it so). A bias that large next to its input's scale (an input that is ~0 on
# the calibration data) would wrap around int32: ORT's fused model then reads garbage while
# the unfused one is right. Half the int32 range keeps room for the accumulation itself.
BIAS_LIMIT = float(2**30)


def _input_scale(node: ir.Node, placement: Placement, params: dict[str, QuantParams]) -> float:
    """The scale of ``node``'s quantized data input (0.0: float, nothing fuses)."""
    data = node.inputs[0] if node.inputs else None
    root = placement.tensors.get(data.name) if data is not None else None
    return float(params[root].scale) if root is not None and root in params else 0.0


def _fit_bias(
    node: ir.Node, weight: ir.Value, q: QuantizedWeight, x_scale: float
) -> QuantizedWeight | None:
    """``q`` with the scales raised (and those channels rounded to nearest again) where
    round(bias / (x_scale · w_scale)) would pass ``BIAS_LIMIT``, as ORT's own quantizer
    does; None when every channel fits. The raised channel's weights round coarser, but their
    product with an input that small is negligible next to the bias they share."""
    if x_scale <= 0.0 or node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3:
        return None
    bias_value = node.inputs[2]
    bias = constant_array(bias_value) if bias_value is not None else None
    array = constant_array(weight)
    if bias is None or array is None:
        return None
    needed = np.abs(bias.astype(np.float64)).reshape(-1) / (x_scale * BIAS_LIMIT)
    scale = q.scale.astype(np.float64)
    if q.axis is None:
        needed = np.array(needed.max(initial=0.0))
    elif needed.shape != scale.shape:
        return None
    raise_ = needed > scale
    if not raise_.any():
        return None
    new_scale = np.where(raise_, needed * 1.001, scale).astype(np.float32)
    shape = [1] * array.ndim
    if q.axis is not None:
        shape[q.axis] = -1
    again = np.clip(np.rint(array / new_scale.reshape(shape)), -127, 127).astype(np.int8)
    keep = ~raise_.reshape(shape) if q.axis is not None else np.False_
    values = np.where(keep, q.values, again).astype(np.int8)
    return QuantizedWeight(values, new_scale, q.axis)


def _weight_dq(
    graph: ir.Graph, names: NameTable, node: ir.Node, weight: ir.Value, q: QuantizedWeight
) -> ir.Value:
    base = weight.name
    inputs = [
        register_array(graph, names.take(f"{base}_quantized"), q.values),
        register_array(graph, names.take(f"{base}_scale"), q.scale),
        register_array(graph, names.take(f"{base}_zero_point"), np.zeros(q.scale.shape, np.int8)),
    ]
    attributes = [] if q.axis is None else [ir.AttrInt64("axis", q.axis)]
    out = ir.Value(
        name=names.take(f"{base}_dequantized"),
        shape=ir.Shape(q.values.shape),
        type=ir.TensorType(ir.DataType.FLOAT),
    )
    dq = ir.Node(
        "",
        "DequantizeLinear",
        inputs,
        attributes=attributes,
        outputs=[out],
        name=names.take(f"{base}_DequantizeLinear"),
    )
    graph.insert_before(node, dq)
    return out


def _rounding_shift(
    node: ir.Node, weight: np.ndarray | None, q: QuantizedWeight, mean: np.ndarray
) -> np.ndarray | None:
    """E[(Wq - W) x] per output channel, from the input's per-channel mean: the mean output
    shift weight rounding adds (what bias correction removes)."""
    if weight is None:
        return None
    delta = q.dequantized().astype(np.float64) - weight.astype(np.float64)
    mean = mean.astype(np.float64)
    if node.op_type == "Conv":
        groups = int(next((a.value for a in node.attributes.values() if a.name == "group"), 1))
        out_channels, per_group = delta.shape[0], delta.shape[1]
        if mean.shape[0] != per_group * groups:
            return None
        sums = delta.reshape(out_channels, per_group, -1).sum(axis=2)
        group_of = np.arange(out_channels) // (out_channels // groups)
        means = mean.reshape(groups, per_group)[group_of]
        return (sums * means).sum(axis=1)
    if node.op_type == "Gemm":
        trans = next((a.value for a in node.attributes.values() if a.name == "transB"), 0)
        matrix = delta if trans else delta.T  # [N, K]
        return matrix @ mean if matrix.shape[1] == mean.shape[0] else None
    return None  # MatMul has no bias input to fold into


def _shift_bias(graph: ir.Graph, names: NameTable, node: ir.Node, shift: np.ndarray) -> bool:
    """Subtract ``shift`` from the node's bias (a new initializer; one is made if absent)."""
    index = 2
    old = node.inputs[index] if len(node.inputs) > index else None
    bias = constant_array(old) if old is not None else np.zeros(shift.shape, np.float32)
    if bias is None or bias.shape != shift.shape:
        return False
    new = (bias.astype(np.float64) - shift).astype(np.float32)
    base = old.name if old is not None else f"{node.name}_bias"
    value = register_array(graph, names.take(f"{base}_corrected"), new)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    return True


def _insert_pair(
    graph: ir.Graph,
    names: NameTable,
    value: ir.Value,
    scale: ir.Value,
    zero: ir.Value,
    p: QuantParams,
    output_too: bool = True,
) -> None:
    """value → Q → DQ, and every consumer of ``value`` reads the DQ instead; a graph output
    too when ``output_too`` and a node computes it. A graph input that is also a graph
    output stays one value (the caller feeds and reads the same name: renaming it left the
    model asking for an input nobody passes), passed through exactly."""
    qtype = ir.DataType.UINT8 if p.dtype == "u8" else ir.DataType.INT8
    quantized = ir.Value(
        name=names.take(f"{value.name}_quantized"), shape=value.shape, type=ir.TensorType(qtype)
    )
    restored = ir.Value(
        name=names.take(f"{value.name}_dequantized"),
        shape=value.shape,
        type=ir.TensorType(ir.DataType.FLOAT),
    )
    q = ir.Node(
        "",
        "QuantizeLinear",
        [value, scale, zero],
        outputs=[quantized],
        name=names.take(f"{value.name}_QuantizeLinear"),
    )
    dq = ir.Node(
        "",
        "DequantizeLinear",
        [quantized, scale, zero],
        outputs=[restored],
        name=names.take(f"{value.name}_DequantizeLinear"),
    )
    uses = [(use.node, use.idx) for use in value.uses()]
    producer = value.producer()
    if producer is None:
        first = next(iter(graph), None)
        if first is None:
            graph.append(q)
            graph.append(dq)
        else:
            graph.insert_before(first, [q, dq])
    else:
        graph.insert_after(producer, [q, dq])
    for user, index in uses:
        if user is not q:
            user.replace_input_with(index, restored)
    if value.is_graph_output() and output_too and producer is not None:
        # The output keeps its name and now comes out of the DQ (as ORT's quantizer does).
        name = value.name
        value.name = names.take(f"{name}_float")
        outputs = graph.outputs
        outputs[next(i for i, v in enumerate(outputs) if v is value)] = restored
        restored.name = name
