"""The small set of graph-editing helpers every rewrite goes through.

Keeping edits here means the invariants live in one place: graph outputs keep their names,
values stay consistent with their uses, and constants are read without materializing more
than the caller asked for.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx_ir as ir

from graphopt.fingerprint import Fingerprint, fingerprint

DEFAULT_DOMAINS = ("", "ai.onnx")


def is_op(node: ir.Node, op_type: str | tuple[str, ...]) -> bool:
    """True for a node of the default ONNX domain with this op type (or one of them)."""
    types = (op_type,) if isinstance(op_type, str) else op_type
    return node.domain in DEFAULT_DOMAINS and node.op_type in types


def owning_graph(node: ir.Node) -> ir.Graph | ir.Function:
    graph = node.graph
    if graph is None:
        raise ValueError(f"node {node.name!r} is not in a graph")
    return graph


def is_graph_output(value: ir.Value) -> bool:
    return value.is_graph_output()


def is_graph_input(value: ir.Value) -> bool:
    return value.is_graph_input()


def constant_array(value: ir.Value | None, max_bytes: int | None = None) -> np.ndarray | None:
    """The value's constant data (initializer or Constant node), or None.

    Initializers that are also graph inputs are not constant (the caller may feed them).
    ``max_bytes`` refuses to materialize large tensors when the caller only needs small ones.
    """
    if value is None:
        return None
    if value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    if max_bytes is not None and tensor.nbytes > max_bytes:
        return None
    try:
        return tensor.numpy()
    except Exception:  # unsupported dtypes (strings in some forms, float8 without ml_dtypes)
        return None


def is_constant(value: ir.Value | None) -> bool:
    if value is None or value.is_graph_input():
        return False
    return ir.convenience.get_const_tensor(value) is not None


def replace_value(old: ir.Value, new: ir.Value) -> bool:
    """Make every user of ``old`` use ``new``; keep the graph-output name if ``old`` is one.

    Returns False (and changes nothing) when ``old`` is a graph output that cannot take over
    ``new``'s place without renaming a graph input/output or an initializer: the caller keeps
    the node then.
    """
    if old is new:
        return True
    # The nodes making ``new`` from ``old`` (an Add inserted after a layer) keep reading
    # ``old``: rewired to ``new`` they would read their own output, a cycle ORT refuses.
    producer = new.producer()
    makers = _nodes_between(old, producer)
    kept = [(use.node, use.idx) for use in old.uses() if id(use.node) in makers]
    if old.is_graph_output():
        if new.is_graph_input() or new.is_graph_output() or new.is_initializer():
            return False
        if producer is None:
            return False
        # new must live in the same graph as the output it becomes
        old_graph = old.graph
        if old_graph is None or producer.graph is not old_graph:
            return False
        name = old.name
        old.name = None
        _replace_in_outputs(old_graph, old, new)
        ir.convenience.replace_all_uses_with(old, new)
        new.name = name
        if old.type is not None and new.type is None:
            new.type = old.type
        if old.shape is not None and new.shape is None:
            new.shape = old.shape
        _restore_uses(old, kept)
        if kept and name and isinstance(old_graph, ir.Graph):
            old.name = unique_name(old_graph, f"{name}_before")  # still read: it needs one
        return True
    ir.convenience.replace_all_uses_with(old, new)
    _restore_uses(old, kept)
    return True


# How far back from ``new`` replace_value looks for nodes built on ``old``: rewrites insert
# short chains (an Add, a Mul and a Cast); a bound keeps each call O(1) on big graphs.
_MAX_CHAIN = 16


def _nodes_between(old: ir.Value, producer: ir.Node | None) -> set[int]:
    """id() of the nodes within :data:`_MAX_CHAIN` steps upstream of ``producer`` (itself
    included) that read ``old``: the chain a rewrite built on ``old``."""
    found: set[int] = set()
    if producer is None:
        return found
    stack, seen = [producer], {id(producer)}
    while stack and len(seen) <= _MAX_CHAIN:
        node = stack.pop()
        for value in node.inputs:
            if value is None:
                continue
            if value is old:
                found.add(id(node))
                continue
            upstream = value.producer()
            if upstream is not None and id(upstream) not in seen:
                seen.add(id(upstream))
                stack.append(upstream)
    return found


def _restore_uses(value: ir.Value, uses: list[tuple[ir.Node, int]]) -> None:
    for node, index in uses:
        node.replace_input_with(index, value)


def take_over(old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` stand where ``old`` stood: every use, and ``old``'s name (records,
    calibration ranges and Q/DQ placements refer to values by name). ``new`` must have a
    producer in ``old``'s graph."""
    name = old.name
    if not replace_value(old, new):
        raise ValueError(f"{new.name!r} cannot take over graph output {name!r}")
    if new.name != name:
        old.name = None
        new.name = name
        producer = old.producer()
        graph = producer.graph if producer is not None else old.graph
        if old.uses() and name and isinstance(graph, ir.Graph):
            # Still read by new's producer (replace_value keeps that use): it needs a name.
            old.name = unique_name(graph, f"{name}_before")


def _replace_in_outputs(graph: ir.Graph | ir.Function, old: ir.Value, new: ir.Value) -> None:
    outputs = graph.outputs
    for i, value in enumerate(outputs):
        if value is old:
            outputs[i] = new


def bypass(node: ir.Node, input_index: int = 0, output_index: int = 0) -> bool:
    """Remove ``node`` by wiring one of its inputs straight to its (single used) output."""
    source = node.inputs[input_index]
    if source is None:
        return False
    if not replace_value(node.outputs[output_index], source):
        return False
    remove_node(node)
    return True


def remove_node(node: ir.Node) -> None:
    """Remove a node whose outputs are no longer used."""
    owning_graph(node).remove(node, safe=True)


def remove_if_dead(node: ir.Node) -> bool:
    """Remove a node none of whose outputs is used or is a graph output."""
    for output in node.outputs:
        if output.uses() or output.is_graph_output():
            return False
    remove_node(node)
    return True


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not yet used in ``graph`` (initializers and node outputs)."""
    taken = set(graph.initializers)
    taken.update(v.name for v in graph.inputs)
    for node in graph:
        taken.update(o.name for o in node.outputs if o.name)
    if base not in taken:
        return base
    index = 1
    while f"{base}_{index}" in taken:
        index += 1
    return f"{base}_{index}"


class NameTable:
    """Fresh names for a pass that adds many values, nodes or initializers.

    One scan of the model (initializers, inputs, node names and outputs, subgraphs included:
    value and node names share one namespace here, which is stricter than ONNX needs), then a
    set: :func:`unique_name` scans the whole graph on every call, which is quadratic for a pass
    that adds several names per layer.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.taken: set[str] = set(graph.initializers)
        self.taken.update(v.name for v in graph.inputs if v.name)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                self.taken.add(node.name)
            self.taken.update(o.name for o in node.outputs if o.name)

    def take(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... : the first name not taken; now taken."""
        name, index = base, 1
        while name in self.taken:
            name = f"{base}_{index}"
            index += 1
        self.taken.add(name)
        return name

    def add_initializer(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        """A new initializer of ``graph`` holding ``array`` under a fresh name."""
        return register_array(graph, self.take(base), array)


def add_initializer(graph: ir.Graph, base_name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array`` under a fresh name."""
    return register_array(graph, unique_name(graph, base_name), array)


def register_array(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array`` under ``name``, which the caller knows is free.

    For passes that add many tensors and keep their own table of taken names (quantization
    adds several per layer): :func:`unique_name` scans the whole graph on every call."""
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.Tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def insert_before(anchor: ir.Node, nodes: list[ir.Node]) -> None:
    owning_graph(anchor).insert_before(anchor, nodes)


def insert_after(anchor: ir.Node, nodes: list[ir.Node]) -> None:
    owning_graph(anchor).insert_after(anchor, nodes)


def single_user(value: ir.Value) -> ir.Node | None:
    """The only consumer of ``value`` when it has exactly one use and is not an output."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def attribute(node: ir.Node, name: str, default=None):
    """An attribute's Python value, or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dim is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = value.shape.dims
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def const_ints(value: ir.Value | None, max_elements: int = 1 << 16) -> list[int] | None:
    """A small integer constant (shape, axes, perm…) as a flat list, or None."""
    array = constant_array(value, max_bytes=max_elements * 8)
    if array is None or array.dtype.kind not in "iu":
        return None
    return [int(x) for x in array.reshape(-1)]


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node of the model, subgraphs included (a list, so rewrites may edit the graph)."""
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


def opset_version(model: ir.Model, domain: str = "") -> int:
    return model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 1))


def add_constant(anchor: ir.Node, base_name: str, array: np.ndarray) -> ir.Value:
    """A Constant node holding ``array``, inserted before ``anchor`` in its graph.

    Unlike an initializer, its output may take a graph output's name (see replace_value).
    """
    graph = owning_graph(anchor)
    name = unique_name(graph, base_name) if isinstance(graph, ir.Graph) else base_name
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)})
    node.outputs[0].name = name
    node.outputs[0].shape = ir.Shape(array.shape)
    node.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    node.outputs[0].const_value = node.attributes["value"].value
    graph.insert_before(anchor, node)
    return node.outputs[0]


# IR version 4 is the first where an initializer need not also be a graph input.
INITIALIZERS_NOT_INPUTS_IR = 4


def initializers_as_constants(model: ir.Model) -> int:
    """Drop initializers from the graph inputs of an IR < 4 model and raise its ir_version to
    4; returns how many inputs went (0 for IR ≥ 4, where such an input is an overridable
    default the caller may feed, so not a constant)."""
    if model.ir_version >= INITIALIZERS_NOT_INPUTS_IR:
        return 0
    import onnx_ir.passes.common

    before = sum(len(graph.inputs) for graph in model.graphs())
    onnx_ir.passes.common.RemoveInitializersFromInputsPass()(model)
    model.ir_version = INITIALIZERS_NOT_INPUTS_IR
    return before - sum(len(graph.inputs) for graph in model.graphs())


def name_nodes(graph: ir.Graph) -> None:
    """Give every node of ``graph`` a unique name (``OpType_index`` where it had none or a
    taken one): records and placements refer to nodes by name."""
    taken: set[str] = set()
    for index, node in enumerate(graph):
        if not node.name or node.name in taken:
            base = f"{node.op_type}_{index}"
            name, k = base, 1
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        taken.add(node.name)


# The model state on which shape inference last changed nothing (one model at a time). The
# model is held weakly: a clone inferred once and dropped (fp16's type fill) is not pinned.
_inferred: tuple[weakref.ref[ir.Model], Fingerprint] | None = None


def fill_missing_shapes(model: ir.Model) -> None:
    """Fill in missing intermediate shapes (best effort, never fails on odd graphs).

    Inference serializes the whole model, and several fusion passes in a row ask for it:
    on a state where it already changed nothing it would change nothing again, so that
    state is remembered (by fingerprint) and the call skipped.
    """
    global _inferred
    import onnx_ir.passes.common

    before = fingerprint(model)
    if _inferred is not None and _inferred[0]() is model and _inferred[1] == before:
        return
    _inferred = None
    onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False)(model)
    after = fingerprint(model)
    if after == before:
        _inferred = (weakref.ref(model), after)
