"""Raising a model's default-domain opset with the onnx version converter (only when asked).

Some fusions produce ops that need a newer opset than the model has (LayerNormalization 17,
Gelu 20, RMSNormalization and Attention 23). graphopt does not raise the opset for a fusion
on its own: ``--opset N`` converts first. The one exception is a quantization mode whose
ops need a newer opset than the model has (per-channel DequantizeLinear 13,
DynamicQuantizeLinear 11): the user asked for the mode, so :func:`raise_in_place` converts
and says so.

Every conversion is checked on its own right after it (:func:`check_conversion`): some of
the converter's adapters change what an op computes, and a later check would report that as
the rewrites' (or quantization's) error. The known ones are converted exactly here instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper, version_converter

from graphopt import io
from graphopt.errors import UserInputError

# Resize 11 added coordinate_transformation_mode (default half_pixel) and nearest_mode
# (default round_prefer_floor); Resize 10 and Upsample compute x_in = x_out / scale
# ("asymmetric"), and ONNX Runtime rounds their nearest index down when upsampling and up
# when downsampling. onnx's converter keeps neither: a linear Resize 10 moved by ~0.5.
RESIZE_10_OPSET = 10
# Softmax, LogSoftmax and Hardmax before 13 work on the input flattened to 2-D at ``axis``;
# 13 works on ``axis`` alone. The converter rewrites Softmax/LogSoftmax with Flatten/Reshape,
# but keeps Hardmax's axis (every output off by 1.0 where it is not the last axis).
SOFTMAX_AXIS_OPSET = 13
# GroupNormalization 21 reads scale and bias per channel, 18 per group; the converter keeps
# the per-group tensors, which ONNX Runtime cannot broadcast. graphopt repeats them per
# channel where they are initializers and the channel count is known, and refuses otherwise.
GROUP_NORM_OPSET = 21
_DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: ir.Model) -> int:
    imports = model.opset_imports
    return imports.get("", imports.get("ai.onnx", 0))


def convert_opset(
    model: ir.Model, version: int, *, check: bool = True, asked_by: str = ""
) -> tuple[ir.Model, str]:
    """The model at default-domain opset ``version`` (and a note), or unchanged when it is.

    onnx's version converter changes what some ops compute (its adapters keep an attribute
    whose meaning changed): the ones known are converted exactly here (Resize/Upsample from
    opset 10 or older, Hardmax before 13, GroupNormalization 18 -> 21 with constant scale
    and bias) or refused by name (the rest of those), and with ``check`` every conversion is
    run in ONNX Runtime before and after on generated inputs (:func:`check_conversion`) and
    refused when the outputs differ. ``asked_by`` starts those refusals (``--opset N``)."""
    label = asked_by or f"--opset {version}"
    current = default_opset(model)
    latest = onnx.defs.onnx_opset_version()
    if version > latest:
        raise UserInputError(f"--opset {version}: the installed onnx supports up to {latest}")
    if version < current:
        raise UserInputError(
            f"--opset {version} is below the model's opset {current}; graphopt only raises it"
        )
    if version == current:
        return model, ""
    if current == 0:
        # The converter asserts in C++ on this; say what is missing instead.
        raise UserInputError(
            f"cannot convert to opset {version}: the model imports no default-domain (ai.onnx) "
            "opset (only other domains)"
        )
    with _large_weights_as_references(model) as weights, io.external_attributes_in_memory(model):
        proto = ir.serde.serialize_model(model)
    per_channel = {}
    if current < GROUP_NORM_OPSET <= version:
        per_channel = _group_norm_per_channel(proto, current, version, label)
    if current < SOFTMAX_AXIS_OPSET <= version:
        _flatten_hardmax(proto)
    try:
        converted = version_converter.convert_version(proto, version)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"cannot convert from opset {current} to {version}: {first[:200]}"
        ) from None
    if current <= RESIZE_10_OPSET < version:
        _keep_resize_10_semantics(converted, current, version, label)
    if per_channel:
        _set_group_norm_per_channel(converted, per_channel)
    result = _with_weights(converted, weights)
    changed = _interface_change(model, result)
    if changed:
        # The converter adapts some ops by changing what the graph takes (Scan 8 -> 9 drops
        # its batch axis from the graph's inputs): not a conversion users can deploy as is.
        raise UserInputError(
            f"converting from opset {current} to {version} changes the model's interface "
            f"({changed}); export the model at opset {version} or later instead"
        )
    _keep_declared_shapes(model, result)
    note = f"converted default-domain opset {current} -> {version}"
    if check:
        skipped = check_conversion(model, result, current, version, label)
        if skipped:
            note += f" (not checked on its own: {skipped})"
    return result, note


# Initializers larger than this go through the converter as references (its adapters read
# only small ones: scales, axes, shapes): a 1 GB model converted as bytes peaked at 3.5 GB
# (the proto, the converter's copy, the tensors read back). 64 KiB keeps every tensor an
# adapter or graphopt's own fixes (GroupNormalization's scale and bias) read inline.
INLINE_BYTES = 64 * 1024
# Where a reference points while the converter holds it: no file; the tensor is put back.
_PLACEHOLDER = "graphopt-conversion-placeholder"


@contextlib.contextmanager
def _large_weights_as_references(model: ir.Model) -> Iterator[dict[str, ir.TensorProtocol]]:
    """Swap each initializer over :data:`INLINE_BYTES` (in every graph) for an external
    reference to a file that does not exist, so that serializing reads and copies none of
    them; yields name -> the tensor taken out, and puts them back after."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes <= INLINE_BYTES or value.name is None:
                    continue
                swapped.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    f"{_PLACEHOLDER}/{len(swapped)}",
                    0,
                    tensor.nbytes,
                    tensor.dtype,
                    shape=tensor.shape,
                    name=value.name,
                )
        yield {value.name: tensor for value, tensor in swapped if value.name is not None}
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _with_weights(converted: onnx.ModelProto, weights: dict[str, ir.TensorProtocol]) -> ir.Model:
    """The converted model with the tensors :func:`_large_weights_as_references` took out
    put back by name (the converter renames no initializer)."""
    result = ir.serde.deserialize_model(converted)
    for graph in result.graphs():
        for value in graph.initializers.values():
            tensor = weights.get(value.name or "")
            if tensor is not None:
                value.const_value = tensor
    left = [
        value.name
        for graph in result.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
        and value.const_value.location.startswith(_PLACEHOLDER)
    ]
    if left:  # an adapter renamed or copied a large initializer: never write a placeholder
        raise UserInputError(
            f"cannot convert the opset: the converter changed initializer {left[0]!r}"
        )
    return result


def _keep_declared_shapes(before: ir.Model, after: ir.Model) -> None:
    """Give the converted graph's inputs and outputs the shapes the model declared: the
    converter runs shape inference, which names the dims the model left unnamed
    (``unk__1``) and may fix ones it left symbolic; the interface is the user's."""
    for old, new in zip(
        (*before.graph.inputs, *before.graph.outputs),
        (*after.graph.inputs, *after.graph.outputs),
        strict=True,
    ):
        if old.shape is None:
            new.shape = None
            continue
        denotations = [old.shape.get_denotation(i) for i in range(len(old.shape))]
        new.shape = ir.Shape(list(old.shape), denotations=denotations)


def _interface_change(before: ir.Model, after: ir.Model) -> str:
    """The first graph input or output whose name, type or rank/fixed dims differ, or ""."""
    pairs = [
        *zip(before.graph.inputs, after.graph.inputs, strict=False),
        *zip(before.graph.outputs, after.graph.outputs, strict=False),
    ]
    if len(before.graph.inputs) != len(after.graph.inputs) or len(before.graph.outputs) != len(
        after.graph.outputs
    ):
        return "the number of inputs or outputs"
    for old, new in pairs:
        if old.name != new.name or old.dtype != new.dtype:
            return f"{old.name!r} -> {new.name!r} {new.dtype}"
        if old.shape is not None and new.shape is not None:
            fixed = [
                (a, b)
                for a, b in zip(old.shape, new.shape, strict=False)
                if isinstance(a, int) and isinstance(b, int)
            ]
            if len(old.shape) != len(new.shape) or any(a != b for a, b in fixed):
                return f"{old.name!r} {list(old.shape)} -> {list(new.shape)}"
    return ""


def raise_in_place(model: ir.Model, version: int, why: str) -> str:
    """Raise ``model`` itself to opset ``version`` where it is older (a quantization mode
    whose ops need it: the user asked for the mode). The conversion is checked on its own
    (:func:`convert_opset`), so that quantization error never hides a conversion that changed
    the model. Returns the note that says so, with ``why``; "" if unchanged."""
    if default_opset(model) >= version:
        return ""
    converted, note = convert_opset(model, version, asked_by=f"{why}, so graphopt raises it")
    model.graph = converted.graph
    return f"{note} ({why})"


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies) in it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _ops(proto: onnx.ModelProto, op_type: str) -> Iterator[tuple[onnx.GraphProto, onnx.NodeProto]]:
    for graph in _graphs(proto.graph):
        for node in graph.node:
            if node.op_type == op_type and node.domain in _DEFAULT_DOMAINS:
                yield graph, node


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


def _group_norm_per_channel(
    proto: onnx.ModelProto, current: int, version: int, label: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each GroupNormalization (by output name), its scale and bias repeated per channel,
    what opset 21 reads for the per-group ones of 18 (the converter keeps them as they are).
    Refused, naming the op, where they are not initializers or the channel count is unknown.
    """
    nodes = list(_ops(proto, "GroupNormalization"))
    if not nodes:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shape inference is only a hint here: the channel count
        inferred = proto
    values = {
        v.name: v
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    }
    initializers = {t.name: t for t in proto.graph.initializer}
    per_channel = {}
    main = {node.output[0] for node in proto.graph.node if node.output}
    for _graph, node in nodes:
        why = _group_norm_repeat(node, node.output[0] in main, values, initializers, per_channel)
        if not why:
            continue
        raise UserInputError(
            f"{label}: cannot convert GroupNormalization from opset {current} to {version}: "
            f"opset {GROUP_NORM_OPSET} reads its scale and bias per channel, not per group, "
            f"and {why} to repeat them; give the model at opset {version} from its exporter"
        )
    return per_channel


def _group_norm_repeat(
    node: onnx.NodeProto,
    in_main_graph: bool,
    values: dict[str, onnx.ValueInfoProto],
    initializers: dict[str, onnx.TensorProto],
    per_channel: dict[str, tuple[np.ndarray, np.ndarray]],
) -> str:
    """Add ``node``'s per-channel scale and bias to ``per_channel``; or why they cannot be."""
    tensors = [initializers.get(name) for name in node.input[1:3]] if in_main_graph else []
    if len(tensors) != 2 or not all(tensors):
        return "its scale and bias are not initializers of the main graph"
    groups = int(_attr(node, "num_groups", 0))
    scale, bias = (numpy_helper.to_array(t).reshape(-1) for t in tensors)
    if not groups or scale.size != groups or bias.size != groups:
        return f"its scale and bias do not hold {groups} per-group values"
    dims = values[node.input[0]].type.tensor_type.shape.dim if node.input[0] in values else []
    channels = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else 0
    if not channels or channels % groups:
        return "its channel count is not known"
    repeat = channels // groups
    per_channel[node.output[0]] = (np.repeat(scale, repeat), np.repeat(bias, repeat))
    return ""


def _set_group_norm_per_channel(
    converted: onnx.ModelProto, per_channel: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Point each converted GroupNormalization at its per-channel scale and bias (new
    initializers: the per-group ones may be read elsewhere)."""
    graph = converted.graph
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    taken |= {o for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "GroupNormalization" or node.output[0] not in per_channel:
            continue
        for index, array in zip((1, 2), per_channel[node.output[0]], strict=True):
            name, suffix = f"{node.input[index]}_per_channel", 0
            while name in taken:
                suffix += 1
                name = f"{node.input[index]}_per_channel_{suffix}"
            taken.add(name)
            graph.initializer.append(numpy_helper.from_array(array, name))
            node.input[index] = name


def _flatten_hardmax(proto: onnx.ModelProto) -> None:
    """Rewrite each Hardmax (opset < 13) whose axis may not be the last as Flatten(axis) ->
    Hardmax(axis=1) -> Reshape(Shape(x)): the same computation in the old opset, which the
    converter then carries over exactly (on a 2-D input axis 1 is the last)."""
    for graph in _graphs(proto.graph):
        ranks = {
            v.name: len(v.type.tensor_type.shape.dim)
            for v in [*graph.input, *graph.value_info, *graph.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
        }
        nodes = []
        for node in graph.node:
            axis = _attr(node, "axis", 1)
            rank = ranks.get(node.input[0]) if node.input else None
            last = axis == -1 or (rank is not None and axis in (rank - 1, -1))
            if node.op_type != "Hardmax" or node.domain not in _DEFAULT_DOMAINS or last:
                nodes.append(node)
                continue
            base = f"{node.name or node.output[0]}_hardmax13"
            shape, flat, hard = f"{base}_shape", f"{base}_flat", f"{base}_2d"
            nodes += [
                helper.make_node("Shape", [node.input[0]], [shape], name=f"{base}_Shape"),
                helper.make_node(
                    "Flatten", [node.input[0]], [flat], axis=axis, name=f"{base}_Flatten"
                ),
                helper.make_node("Hardmax", [flat], [hard], axis=1, name=node.name),
                helper.make_node(
                    "Reshape", [hard, shape], list(node.output), name=f"{base}_Reshape"
                ),
            ]
        del graph.node[:]
        graph.node.extend(nodes)


def _constant_floats(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and list(node.output) == [name]:
            value = _attr(node, "value")
            return numpy_helper.to_array(value) if value is not None else None
    return None


def _keep_resize_10_semantics(
    converted: onnx.ModelProto, current: int, version: int, label: str
) -> None:
    """Give each Resize the converter made from a Resize 10 or Upsample the attributes that
    compute what the old op did: asymmetric coordinates, and for nearest the rounding ONNX
    Runtime used (down when upsampling, up when downsampling; refused when mixed or unknown).
    Every default-domain Resize in the converted model comes from one: the source has none
    newer."""
    for graph, node in _ops(converted, "Resize"):
        if _attr(node, "coordinate_transformation_mode") is not None:
            continue
        _set_attr(node, "coordinate_transformation_mode", "asymmetric")
        mode = _attr(node, "mode", b"nearest")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "nearest":
            continue
        scales = _constant_floats(graph, node.input[2]) if len(node.input) > 2 else None
        scales = None if scales is None else scales.ravel()
        if scales is not None and bool(np.all(scales >= 1)):
            _set_attr(node, "nearest_mode", "floor")
        elif scales is not None and bool(np.all(scales <= 1)):
            _set_attr(node, "nearest_mode", "ceil")
        else:
            why = "not constant" if scales is None else f"{scales.tolist()}, up and down at once"
            raise UserInputError(
                f"{label}: cannot convert a nearest Resize/Upsample from opset "
                f"{current} to {version}: it rounds down when upsampling and up when "
                f"downsampling, which no opset-11 nearest_mode does for its scales ({why}); "
                f"give the model at opset {version} from its exporter"
            )


def check_conversion(
    before: ir.Model, after: ir.Model, current: int, version: int, label: str = ""
) -> str:
    """Refuse (UserInputError) a conversion whose outputs in ONNX Runtime differ from the
    model's on one set of generated inputs beyond float tolerance. Returns why it was not
    checked ("" when it was): the original model cannot run (verification says so too)."""
    from graphopt.inputs import make_inputs
    from graphopt.output_errors import compare
    from graphopt.tolerances import default_tolerance
    from graphopt.verify import run_model

    label = label or f"--opset {version}"
    try:
        feeds = make_inputs(before)
        reference = run_model(before, dict(feeds))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the model does not run in ONNX Runtime on generated inputs: {first[:120]}"
    pitfall = (
        f"{label}: converting opset {current} -> {version} changes what the model "
        "computes ({what}); onnx's version converter adapts some ops inexactly: give the "
        f"model at opset {version} from its exporter"
    )
    try:
        got = run_model(after, dict(feeds))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            pitfall.format(what=f"ONNX Runtime cannot run the converted model: {first[:120]}")
        ) from None
    tolerance = default_tolerance(before)
    names = [v.name for v in before.graph.outputs]
    again = None
    for index, (ref, new) in enumerate(zip(reference, got, strict=False)):
        error = compare(names[index] if index < len(names) else str(index), ref, new)
        if error.max_rel <= tolerance:
            continue
        if again is None:  # random ops: an output that differs between two runs proves nothing
            again = run_model(before, dict(feeds))
        if compare(error.name, ref, again[index]).max_rel > tolerance:
            continue
        raise UserInputError(
            pitfall.format(what=f"output {error.name!r} off by {error.max_rel:.3g}")
        )
    return ""
