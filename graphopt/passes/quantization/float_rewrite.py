"""fp16/bf16 rewriting: apply a :class:`~graphopt.passes.quantization.float_plan.Plan` to the
graph. Values take the lower type, constants read only in it are stored in it, and Casts go
wherever a value's type is not what its reader expects; lowered graph outputs are cast back
to float32 under their own names."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from graphopt import editing
from graphopt.passes.quantization.float_plan import (
    FLOAT,
    SHAPE_READERS,
    Plan,
    all_uses_low,
    is_constant_node,
)
from graphopt.passes.quantization.record import TypeChange, dtype_name


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
        if all_uses_low(value, plan.convert):
            _store_low(value, low)
            lowered.append(value)
        elif value.is_graph_output() and all_uses_low(value, plan.convert, output_ok=True):
            # A weight that is also an output stays float32 for the output; its readers get
            # a stored copy in the lower type. A Cast at run time computed the same values,
            # but ORT's fp16 MatMul takes another path for a computed B than for a constant
            # one, so folding that Cast later moved outputs and was rolled back.
            lowered.append(_low_copy(graph, value, low, names))
    for node in graph:
        if (
            is_constant_node(node)
            and node.outputs[0].dtype == FLOAT
            and all_uses_low(node.outputs[0], plan.convert)
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
