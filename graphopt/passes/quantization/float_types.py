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

fp8 (E4M3 Q/DQ for TensorRT) lives in :mod:`graphopt.passes.quantization.fp8`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import editing
from graphopt.errors import UserInputError
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.record import (
    LayerPrecision,
    QuantRecord,
    TypeChange,
    dtype_name,
    own_max_rel,
    weight_bytes,
)
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.registry import PassContext

FLOAT = ir.DataType.FLOAT
LOW_TYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
SCHEMA_NAMES = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}

# Kept float32 by default: see the module docstring for why.
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
        and not _is_constant_node(node)
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
        if _is_constant_node(node) or editing.is_op(node, (*SHAPE_READERS, "Cast")):
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
            if _all_uses_low(out, convert) and not _overflows(out, low, ranges):
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


def _overridable(value: ir.Value) -> bool:
    """An initializer that is also a graph input: the caller's type, not stored in 16 bits."""
    return value.is_graph_input() and value.const_value is not None


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


def _all_uses_low(value: ir.Value, convert: dict, output_ok: bool = False) -> bool:
    """Every use of ``value`` reads it in the lower type (and, unless ``output_ok``, it is
    not a graph output)."""
    if (value.is_graph_output() and not output_ok) or not value.uses():
        return False
    return all(
        id(use.node) in convert and use.idx in convert[id(use.node)][0] for use in value.uses()
    )


def _is_constant_node(node: ir.Node) -> bool:
    return editing.is_op(node, "Constant")


def _attr_int(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return None if attr is None else int(attr.value)


def apply_plan(model: ir.Model, plan: Plan, low: ir.DataType) -> list[TypeChange]:
    """Rewrite the graph as planned: lower types, convert constants, insert Casts. Returns
    every tensor whose element type changed, in graph order."""
    graph = model.graph
    changes: list[TypeChange] = []
    lowered: list[ir.Value] = []
    names = editing.NameTable(graph)
    # 1. Constants read only in the lower type are stored in it.
    for value in list(graph.initializers.values()):
        # An initializer that is also a graph input (IR < 4) is the caller's to feed: its
        # type is part of the model's interface, so it is cast like any input instead.
        if value.dtype != FLOAT or value.is_graph_input():
            continue
        if _all_uses_low(value, plan.convert):
            _store_low(value, low)
            lowered.append(value)
        elif value.is_graph_output() and _all_uses_low(value, plan.convert, output_ok=True):
            # A weight that is also an output stays float32 for the output; its readers get
            # a stored copy in the lower type. A Cast at run time computed the same values,
            # but ORT's fp16 MatMul takes another path for a computed B than for a constant
            # one, so folding that Cast later moved outputs and was rolled back.
            lowered.append(_low_copy(graph, value, low, names))
    for node in graph:
        if (
            _is_constant_node(node)
            and node.outputs[0].dtype == FLOAT
            and _all_uses_low(node.outputs[0], plan.convert)
            and _lower_constant(node, low)
        ):
            lowered.append(node.outputs[0])
    # 2. Converted nodes: outputs at lowered positions take the lower type.
    for node in graph:
        positions = plan.convert.get(id(node))
        if positions is None:
            continue
        if editing.is_op(node, "Cast"):
            node.attributes["to"] = ir.AttrInt64("to", low.value)
        for index in positions[1]:
            out = node.outputs[index]
            if out.dtype in (FLOAT, None):
                out.type = ir.TensorType(low)
                lowered.append(out)
    for value in lowered:
        changes.append(TypeChange(value.name or "", dtype_name(FLOAT), dtype_name(low)))
    # 3. Casts wherever a value's type is not what its reader expects.
    lowered_ids = {id(v) for v in lowered}
    for value in _float_values(graph):
        if id(value) in lowered_ids or value.dtype in (FLOAT, None):
            _fix_uses(graph, value, plan, low, names, id(value) in lowered_ids)
    # 4. Lowered graph outputs: cast back to float32 under their own name.
    for index, value in enumerate(list(graph.outputs)):
        if id(value) in lowered_ids:
            name = value.name
            value.name = names.take(f"{name}_{low.name.lower()}")
            cast = cast_node(value, FLOAT, name, names)
            _insert_after_source(graph, value, cast)
            graph.outputs[index] = cast.outputs[0]
            for change in changes:
                if change.tensor == name:
                    change.tensor = value.name
    return changes


def _float_values(graph: ir.Graph) -> Iterable[ir.Value]:
    """Graph inputs, initializers and node outputs, in graph order (deterministic)."""
    yield from graph.inputs
    yield from (v for v in graph.initializers.values() if not v.is_graph_input())
    for node in list(graph):
        yield from node.outputs


def _fix_uses(
    graph: ir.Graph,
    value: ir.Value,
    plan: Plan,
    low: ir.DataType,
    names: editing.NameTable,
    is_low: bool,
) -> None:
    """Insert one Cast per needed type and point the readers that need it at it."""
    have = low if is_low else FLOAT
    casts: dict[ir.DataType, ir.Value] = {}
    for use in list(value.uses()):
        node, index = use.node, use.idx
        if editing.is_op(node, SHAPE_READERS) and node.graph is graph:
            continue
        if editing.is_op(node, "Cast") and node.graph is graph:
            continue  # a Cast reads any type: its own output type is what it says
        positions = plan.convert.get(id(node)) if node.graph is graph else None
        want = low if positions is not None and index in positions[0] else FLOAT
        if want == have:
            continue
        if want not in casts:
            base = f"{value.name}_{want.name.lower()}"
            cast = cast_node(value, want, names.take(base), names)
            _insert_after_source(graph, value, cast)
            casts[want] = cast.outputs[0]
        node.replace_input_with(index, casts[want])


def _insert_after_source(graph: ir.Graph, value: ir.Value, node: ir.Node) -> None:
    """Insert ``node`` right after ``value``'s producer; for graph inputs and initializers,
    first in the graph (every reader comes after either)."""
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    elif len(graph):
        graph.insert_before(graph.node(0), node)
    else:
        graph.append(node)


def cast_node(value: ir.Value, to: ir.DataType, name: str, names: editing.NameTable) -> ir.Node:
    out = ir.Value(name=name, type=ir.TensorType(to), shape=value.shape)
    return ir.Node(
        "",
        "Cast",
        [value],
        attributes=[ir.AttrInt64("to", to.value)],
        outputs=[out],
        name=names.take(f"{name}_cast"),
    )


def _low_copy(
    graph: ir.Graph, value: ir.Value, low: ir.DataType, names: editing.NameTable
) -> ir.Value:
    """A new initializer holding ``value`` in ``low``, read by every node that read it."""
    array = value.const_value.numpy().astype(low.numpy())
    copy = names.add_initializer(graph, f"{value.name}_{low.name.lower()}", array)
    for use in list(value.uses()):
        use.node.replace_input_with(use.idx, copy)
    return copy


def _store_low(value: ir.Value, low: ir.DataType) -> None:
    array = value.const_value.numpy().astype(low.numpy())
    value.const_value = ir.Tensor(array, name=value.name)
    value.type = ir.TensorType(low)


def _lower_constant(node: ir.Node, low: ir.DataType) -> bool:
    """A float32 Constant node's value in ``low`` (False: a form left alone)."""
    array = editing.constant_array(node.outputs[0])
    if array is None:
        return False
    tensor = ir.Tensor(array.astype(low.numpy()), name=node.outputs[0].name)
    node.attributes.clear()
    node.attributes["value"] = ir.AttrTensor("value", tensor)
    node.outputs[0].type = ir.TensorType(low)
    node.outputs[0].const_value = tensor
    return True
