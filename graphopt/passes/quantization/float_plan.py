"""fp16/bf16 planning: which nodes run in the lower type, at which inputs and outputs, and
why the rest stays float32 (the policy and its measurements are in the docstring of
:mod:`graphopt.passes.quantization.float_types`); with the magnitudes fp16's range guard
reads (calibration ranges, constants' values)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.record import LayerPrecision
from graphopt.passes.quantization.settings import QuantSettings

FLOAT = ir.DataType.FLOAT
SCHEMA_NAMES = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}

# Kept float32 by default: see the docstring of float_types for why.
RISKY_OPS = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceProd",
        "Pow",
        "Exp",
        "Log",
        "CumSum",
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
        "Softmax",
        "LogSoftmax",
    }
)
# A reduction over fewer elements than this (known from static shapes) is converted: ResNet-50's
# global average pool (49 elements) measured the same with it float32 or fp16.
LONG_REDUCTION = 256
# Ops whose float input is only measured (its shape), never computed on: they read the value
# in whatever type it has, no Cast needed.
SHAPE_READERS = frozenset({"Shape", "Size"})
# fp16 keeps in float32 any tensor whose magnitude passes this: half of fp16's largest value
# (65504), the margin for what calibration did not see.
FP16_LIMIT = 65504.0 / 2
# A constant this small in magnitude (nonzero) is below fp16's normal range (2^-14): a
# LayerNorm epsilon of 1e-12 would become 0. Its readers stay float32.
FP16_TINY = 2.0**-14
# Only constants up to this many elements are epsilons; a big weight with a few tiny values
# loses nothing that matters.
EPSILON_ELEMENTS = 16


def observed_ranges(model: ir.Model, calib: CalibrationSet) -> dict[str, float]:
    """max |x| of every float32 tensor of the main graph over ``calib`` (inputs included)."""
    from graphopt.passes.calibration.activations import observe

    names = [
        out.name
        for node in model.graph
        for out in node.outputs
        if out.name
        and out.dtype == FLOAT
        and isinstance(out.type, ir.TensorType)  # not a sequence or optional of them
        and not is_constant_node(node)
    ]
    ranges: dict[str, float] = {}
    for value in model.graph.inputs:
        if value.dtype == FLOAT and value.name in calib.arrays:
            ranges[value.name] = peak_magnitude(calib.arrays[value.name])
    if not names:
        return ranges
    # Every activation of a batch is held at once: small batches bound the memory.
    small = dataclasses.replace(calib, batch=min(calib.batch, 2))
    for _, values in observe(model, names, small):
        for name, array in values.items():
            ranges[name] = max(ranges.get(name, 0.0), peak_magnitude(array))
    return ranges


def peak_magnitude(array: np.ndarray) -> float:
    if not array.size or array.dtype.kind != "f":
        return 0.0
    finite = np.abs(array[np.isfinite(array)])
    return float(finite.max()) if finite.size else 0.0


@dataclass
class Plan:
    """Which nodes run in the lower type, and at which input/output positions."""

    # id(node) -> (input indices, output indices) that take the lower type
    convert: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]
    layers: list[LayerPrecision]


def plan_conversion(
    model: ir.Model,
    settings: QuantSettings,
    low: ir.DataType,
    ranges: dict[str, float],
    shapes: dict[str, ir.Shape] | None = None,
) -> Plan:
    """Decide, node by node, what runs in ``low`` and why the rest stays float32."""
    opset = editing.opset_version(model)
    precision = settings.mode
    convert: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    kept: dict[int, str] = {}
    for node in model.graph:
        if is_constant_node(node) or editing.is_op(node, (*SHAPE_READERS, "Cast")):
            continue
        reason, positions = _node_decision(node, settings, low, opset, ranges, shapes or {})
        if positions is not None:
            convert[id(node)] = positions
        elif reason:
            kept[id(node)] = reason
        # neither: no float32 computation; integer and shape work stays as it is
    for node in _islands(model.graph, convert):  # taken out of ``convert`` already
        fed = [v.name for v in node.inputs if v is not None and _overridable(v)]
        why = (
            f"its weight {fed[0]} is an initializer the caller may override (a graph input, "
            "fed in float32)"
            if fed
            else f"no weight in its {low.name.lower()} neighbourhood"
        )
        kept[id(node)] = f"{why}: converting would only add Casts"
    layers: list[LayerPrecision] = []
    for node in model.graph:
        name = node.name or ""
        if editing.is_op(node, "Cast") and _attr_int(node, "to") == FLOAT:
            # Retargeted where everything it feeds runs in the lower type.
            out = node.outputs[0]
            if all_uses_low(out, convert) and not _overflows(out, low, ranges):
                convert[id(node)] = ((), (0,))
                layers.append(LayerPrecision(name, "Cast", precision, f"retargeted to {low.name}"))
            else:
                layers.append(LayerPrecision(name, "Cast", "float", "feeds float32 consumers"))
        elif id(node) in convert:
            layers.append(LayerPrecision(name, node.op_type, precision))
        elif id(node) in kept:
            layers.append(LayerPrecision(name, node.op_type, "float", kept[id(node)]))
    return Plan(convert, layers)


def _islands(graph: ir.Graph, convert: dict) -> list[ir.Node]:
    """Planned nodes, grouped where one feeds another in the lower type, whose group has no
    weight to shrink (Add+Relu between float32 Convs): converting them buys Casts and
    nothing else. They are taken out of ``convert`` and returned, in graph order."""
    planned = [node for node in graph if id(node) in convert]
    group = {id(node): id(node) for node in planned}

    def root(key: int) -> int:
        while group[key] != key:
            group[key] = group[group[key]]
            key = group[key]
        return key

    weighted: set[int] = set()
    for node in planned:
        inputs = convert[id(node)][0]
        for index in inputs:
            value = node.inputs[index]
            producer = value.producer()
            if (
                producer is not None
                and id(producer) in convert
                and value.index() in convert[id(producer)][1]
            ):
                group[root(id(node))] = root(id(producer))
            elif _is_weight(value):
                weighted.add(id(node))
    weighted = {root(key) for key in weighted}
    found = [node for node in planned if root(id(node)) not in weighted]
    for node in found:
        del convert[id(node)]
    return found


def _overridable(value: ir.Value | None) -> bool:
    """An initializer that is also a graph input: the caller's type, not stored in 16 bits."""
    return value is not None and value.is_graph_input() and value.const_value is not None


def _is_weight(value: ir.Value) -> bool:
    """A constant input bigger than an epsilon: stored in half the bytes once converted."""
    if not editing.is_constant(value):
        return False
    array = editing.constant_array(value, max_bytes=EPSILON_ELEMENTS * 8)
    return array is None or array.size > EPSILON_ELEMENTS


def _node_decision(
    node: ir.Node,
    settings: QuantSettings,
    low: ir.DataType,
    opset: int,
    ranges: dict[str, float],
    shapes: dict[str, ir.Shape],
) -> tuple[str, tuple[tuple[int, ...], tuple[int, ...]] | None]:
    """(reason kept float32, None) or ("", positions to lower); ("", None): not float work."""
    touches_float = any(v is not None and v.dtype == FLOAT for v in (*node.inputs, *node.outputs))
    if not touches_float:
        return "", None
    if any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attr in node.attributes.values()
    ):
        return "has a subgraph: body left float32, casts at its boundary", None
    if node.domain not in editing.DEFAULT_DOMAINS:
        return f"custom-domain op ({node.domain}): no schema to convert it by", None
    if settings.excluded(node):
        return "--exclude", None
    signature = float_positions(node, opset, low)
    if isinstance(signature, str):
        return signature, None
    inputs, outputs = signature
    if not inputs and not outputs:
        return "", None
    fed = [node.inputs[i].name for i in inputs if _overridable(node.inputs[i])]
    if fed:
        # README: such an initializer is never rounded or stored in 16 bits. Converting the
        # layer would Cast the caller's value to 16 bits at run time (inf past 65504), as
        # int8 and int8-dynamic do not: the layer stays float, with the same reason.
        from graphopt.passes.quantization.placement import overridable_reason

        return overridable_reason(fed[0]), None
    if node.op_type in RISKY_OPS:
        count = reduced_elements(node, shapes) if node.op_type.startswith("Reduce") else None
        if count is None or count >= LONG_REDUCTION:
            return "numerically risky at 16 bits (default keep list)", None
    lowered = [node.inputs[i] for i in inputs] + [node.outputs[i] for i in outputs]
    for value in lowered:
        if _overflows(value, low, ranges):
            peak = _magnitude(value, ranges)
            return f"{value.name}: max |x| {peak:.3g} exceeds the fp16 limit {FP16_LIMIT:g}", None
        if low == ir.DataType.FLOAT16 and _is_epsilon(value):
            return f"{value.name}: a constant below fp16's normal range (an epsilon)", None
    return "", signature


def reduced_elements(node: ir.Node, shapes: dict[str, ir.Shape]) -> int | None:
    """How many elements a Reduce* node folds into each output value, when the reduced dims
    and the axes are static; None when unknown."""
    shape = node.inputs[0].shape or shapes.get(node.inputs[0].name)
    if shape is None:
        return None
    axes = editing.attribute(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = editing.const_ints(node.inputs[1])
        if axes is None:
            return None
    if not axes:
        if editing.attribute(node, "noop_with_empty_axes", 0):
            return 1
        axes = range(len(shape))
    dims = [shape[axis] for axis in axes]
    if not all(isinstance(dim, int) for dim in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def float_positions(
    node: ir.Node, opset: int, low: ir.DataType
) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """Input and output indices bound to a float32 type constraint of the node's schema that
    also allows ``low``; a reason string when such a constraint does not allow it."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:
        return f"no ONNX schema for {node.op_type} at opset {opset}"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for side, formals, values in (
        (0, schema.inputs, node.inputs),
        (1, schema.outputs, node.outputs),
    ):
        for index, value in enumerate(values):
            formal = _formal(formals, index)
            if value is None or formal is None or formal.type_str not in allowed:
                continue
            groups.setdefault(formal.type_str, ([], []))[side].append(index)
    inputs: list[int] = []
    outputs: list[int] = []
    for constraint, (ins, outs) in sorted(groups.items()):
        bound = [node.inputs[i] for i in ins] + [node.outputs[i] for i in outs]
        if not any(v.dtype == FLOAT for v in bound):
            continue
        if not any(t.startswith("tensor(") for t in allowed[constraint]):
            # A sequence or optional of tensors (SequenceConstruct's output, SequenceAt's
            # input): only tensors are lowered, so the op stays as it is.
            return "it reads or writes a sequence or optional of tensors"
        if outs and not ins:
            # No input carries this type: an attribute (ConstantOfShape's value, RandomNormal's
            # dtype, Cast's to, EyeLike's dtype, a window's output_datatype) or a sequence
            # input sets it. Retyping the output alone would leave the node computing float32
            # under a float16 label, a model ONNX and ORT reject.
            return f"its output type is set by {_type_source(schema)}, not by a float input"
        if SCHEMA_NAMES[low] not in allowed[constraint]:
            return f"{node.op_type}-{schema.since_version} allows no {low.name.lower()}"
        inputs += ins
        outputs += outs
    return tuple(sorted(inputs)), tuple(sorted(outputs))


# Attributes that set an output's element type (the schemas' own names).
TYPE_ATTRIBUTES = (
    "dtype",
    "to",
    "value",
    "output_datatype",
    "output_dtype",
    "stash_type",
)


def _type_source(schema: onnx.defs.OpSchema) -> str:
    """What sets the element type of an output no input is bound to, for the record."""
    named = [a for a in TYPE_ATTRIBUTES if a in schema.attributes]
    if named:
        return f"an attribute ({', '.join(named)})"
    return "a sequence or optional input"


def _formal(formals, index: int):
    if index < len(formals):
        return formals[index]
    if formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return formals[-1]
    return None


def _overflows(value: ir.Value, low: ir.DataType, ranges: dict[str, float]) -> bool:
    return low == ir.DataType.FLOAT16 and _magnitude(value, ranges) > FP16_LIMIT


def _magnitude(value: ir.Value, ranges: dict[str, float]) -> float:
    if value.name in ranges:
        return ranges[value.name]
    array = editing.constant_array(value)
    if array is None or array.dtype.kind != "f":
        return 0.0
    return peak_magnitude(array)


def _is_epsilon(value: ir.Value) -> bool:
    array = editing.constant_array(value, max_bytes=EPSILON_ELEMENTS * 8)
    if array is None or array.dtype.kind != "f" or array.size > EPSILON_ELEMENTS:
        return False
    magnitude = np.abs(array)
    return bool(np.any((magnitude > 0) & (magnitude < FP16_TINY)))


def all_uses_low(value: ir.Value, convert: dict, output_ok: bool = False) -> bool:
    """Every use of ``value`` reads it in the lower type (and, unless ``output_ok``, it is
    not a graph output)."""
    if (value.is_graph_output() and not output_ok) or not value.uses():
        return False
    return all(
        id(use.node) in convert and use.idx in convert[id(use.node)][0] for use in value.uses()
    )


def is_constant_node(node: ir.Node) -> bool:
    return editing.is_op(node, "Constant")


def _attr_int(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return None if attr is None else int(attr.value)
