"""Physical channel removal: slice weights along coupled axes and fix the size constants.

Given the dependency graph of a model and, per channel dim, the indices to remove (all of
them taken from whole units of zero-invariant groups, e.g. via
:meth:`ZeroInvariantGroup.unit_indices`), build a new model where:

- every parameter dim loses those indices (``np.delete`` along the axis); a shared weight
  has one dim and stays shared; a shared fill's per-use dims get a sliced copy per distinct
  cut;
- ops whose attributes or constant inputs state channel counts are rewritten: grouped Conv /
  ConvTranspose ``group``, GroupNormalization ``num_groups``, Reshape and Expand target
  entries (a constant, or a constant piece of a Concat: a fresh copy per node, since
  exporters share these; entries read by ``Shape`` at run time follow by themselves),
  Split sizes, Slice bounds;
- intermediate shapes: see :func:`remove_channels`'s ``keep_shapes``.

The input model is not modified. The rules in :mod:`dependency_rules` only accept the
cases handled here (e.g. a Reshape entry computed at run time blocks the group).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from graphopt.analysis.dependency import DependencyGraph, DimKey, split_key
from graphopt.analysis.shape_entries import constant_piece, shape_source, vector_length
from graphopt.editing import add_initializer, attribute, const_ints, constant_array, unique_name


def remove_channels(
    model: ir.Model,
    graph: DependencyGraph,
    removed: dict[DimKey, np.ndarray],
    *,
    keep_shapes: bool = False,
) -> ir.Model:
    """A copy of ``model`` with ``removed[dim]`` channels taken out of every dim.

    ``graph`` must come from ``model`` (same node order); ``removed`` must cover whole units.

    Intermediate shapes: with ``keep_shapes``, as declared, each removed dim at its new size
    (:func:`_resize_shapes`); for a caller whose result is final (pruning). Without, only
    their symbolic dims (:func:`keep_symbolic_dims`): for a caller that edits sizes further
    (the decomposition's head ranks), whose ints would then be stale.
    """
    removed = {k: np.asarray(v, dtype=np.int64) for k, v in removed.items() if len(v)}
    clone = model.clone()
    nodes = list(clone.graph)
    index = {id(n): i for i, n in enumerate(graph.model.graph)}
    values = _values_by_name(clone.graph)
    _slice_parameters(clone.graph, nodes, values, graph, removed)
    fixed: set[tuple[int, str]] = set()
    for key in removed:
        dim = graph.dims[key]
        if dim.is_param:
            continue
        for node in graph.nodes.get(key, ()):
            i = index[id(node)]
            if (i, key[0]) in fixed and node.op_type != "Split":
                continue
            fixed.add((i, key[0]))
            _fix_node(clone.graph, nodes[i], node, graph, key, removed)
    if keep_shapes:
        _resize_shapes(values, graph, removed)
    else:
        keep_symbolic_dims(clone.graph)
    return clone


def _resize_shapes(
    values: dict[str, ir.Value], graph: DependencyGraph, removed: dict[DimKey, np.ndarray]
) -> None:
    """Give every removed dim of an intermediate value its new size; every other dim stays.

    The analysis couples every dim whose size a removal changes (it blocks a group whose
    removal it cannot follow), so these are all the changes. Re-inferring instead loses what
    onnx inference cannot derive: the symbolic ``batch``/``sequence`` past a Reshape whose
    target is read from ``Shape``, the head count of a Reshape to (0, 0, -1, 64). ORT's
    attention fusions check both, and a pruned BERT or MiniLM fused no attention at all.
    """
    for key in removed:
        if graph.dims[key].is_param:
            continue  # a weight: its shape is its (sliced) data's
        value = values.get(key[0])
        shape = value.shape if value is not None else None
        if shape is None or not 0 <= key[1] < len(shape):
            continue
        dims = list(shape)
        dims[key[1]] = new_size(graph, key, removed)
        value.shape = ir.Shape(dims)


def keep_symbolic_dims(g: ir.Graph) -> None:
    """Forget every int dim of ``g``'s intermediate values; keep their symbolic dims.

    For a graph whose sizes changed in ways not recorded (inference recomputes the ints): the
    names (``batch``, ``sequence``) are never a removed channel, which always has a size,
    and onnx inference may not find them again.
    """
    for node in g:
        for out in node.outputs:
            if out.is_graph_output() or out.shape is None:
                continue
            if all(isinstance(d, int) for d in out.shape):
                out.shape = None
                continue
            out.shape = ir.Shape([None if isinstance(d, int) else d for d in out.shape])


def new_size(graph: DependencyGraph, key: DimKey, removed: dict[DimKey, np.ndarray]) -> int:
    return graph.dims[key].size - len(removed.get(key, ()))


def _values_by_name(g: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in g.inputs}
    values.update(g.initializers)
    for node in g:
        for out in node.outputs:
            values[out.name] = out
    return values


def _slice_parameters(g, nodes, values, graph: DependencyGraph, removed) -> None:
    edit_parameters(g, nodes, values, graph, removed, lambda a, axis, idx: np.delete(a, idx, axis))


def edit_parameters(g, nodes, values, graph: DependencyGraph, removed, edit) -> None:
    """Apply ``edit(array, axis, indices) -> array`` to every parameter dim in ``removed``.

    ``nodes``/``values`` index the graph ``g`` being edited (a clone of the analysed model).
    """
    cuts: dict[tuple[str, int | None], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for key, idx in removed.items():
        if graph.dims[key].is_param:
            cuts[split_key(key[0])].append((key[1], idx))
    # Uses of a shared fill that lose the same entries share one edited copy.
    made: dict[tuple, ir.Value] = {}
    for (name, use), axes in cuts.items():
        value = values[name]
        signature = (name, *sorted((axis, idx.tobytes()) for axis, idx in axes))
        fresh = made.get(signature) if use is not None else None
        if fresh is None:
            array = constant_array(value)
            if array is None:
                raise ValueError(f"cannot read parameter {name}")
            for axis, idx in axes:
                array = edit(array, axis, idx)
            if use is None and value.producer() is None:
                value.const_value = ir.Tensor(array, name=name)
                value.shape = ir.Shape(array.shape)
                continue
            fresh = made[signature] = add_initializer(g, f"{name}_pruned", array)
        targets = [nodes[use]] if use is not None else [u.node for u in value.uses()]
        for node in targets:
            for i, inp in enumerate(node.inputs):
                if inp is value:
                    node.replace_input_with(i, fresh)


def _fix_node(g, node: ir.Node, analysed: ir.Node, graph, key: DimKey, removed) -> None:
    """Rewrite the size-stating parts of ``node`` (clone) for removal on dim ``key``."""
    op = node.op_type
    name, axis = key
    shape = graph.context.shape
    if op in ("Conv", "ConvTranspose") and attribute(node, "group", 1) > 1:
        if analysed.inputs[0].name == name and axis == 1:
            groups = attribute(node, "group", 1)
            per_group = graph.dims[key].size // groups
            node.attributes["group"] = ir.AttrInt64(
                "group", new_size(graph, key, removed) // per_group
            )
    elif op == "GroupNormalization" and analysed.inputs[0].name == name and axis == 1:
        per_group = graph.dims[key].size // attribute(node, "num_groups")
        new = new_size(graph, key, removed) // per_group
        node.attributes["num_groups"] = ir.AttrInt64("num_groups", new)
    elif op == "Reshape" and analysed.outputs[0].name == name:
        # Only constant entries are rewritten: -1 and 0 adapt by themselves, and an entry
        # read by Shape follows a dim the analysis coupled to this one.
        entry = shape_source(graph.context, analysed.inputs[1], axis)
        if isinstance(entry, int) and entry not in (-1, 0):
            set_shape_entry(g, node, analysed, graph, 1, axis, new_size(graph, key, removed))
    elif op == "Expand" and analysed.outputs[0].name == name:
        length = vector_length(graph.context, analysed.inputs[1])
        position = axis - (len(shape(analysed.outputs[0])) - length)
        entry = shape_source(graph.context, analysed.inputs[1], position) if position >= 0 else 1
        if isinstance(entry, int) and entry != 1:
            set_shape_entry(g, node, analysed, graph, 1, position, new_size(graph, key, removed))
    elif op == "Split" and analysed.inputs[0].name == name:
        rank = len(shape(analysed.inputs[0]))
        along = attribute(node, "axis", 0)
        along = along + rank if along < 0 else along
        if axis != along:
            return
        sizes = []
        for out in analysed.outputs:
            out_key = (out.name, axis)
            old = shape(out)[axis]
            sizes.append(new_size(graph, out_key, removed) if out_key in graph.dims else old)
        array = np.array(sizes, dtype=np.int64)
        if "split" in node.attributes:
            node.attributes["split"] = ir.AttrInt64s("split", sizes)
        else:
            fresh = add_initializer(g, f"{node.name or 'split'}_sizes", array)
            if len(node.inputs) > 1:
                node.replace_input_with(1, fresh)
            else:
                node.resize_inputs(2)
                node.replace_input_with(1, fresh)
            node.attributes.pop("num_outputs", None)
    elif op == "Slice" and analysed.inputs[0].name == name:
        _fix_slice(g, node, analysed, graph, key, removed)


def _fix_slice(g, node, analysed, graph, key, removed) -> None:
    axis = key[1]
    rank = len(graph.context.shape(analysed.inputs[0]))
    starts = const_ints(analysed.inputs[1])
    axes = (
        const_ints(analysed.inputs[3]) if len(analysed.inputs) > 3 and analysed.inputs[3] else None
    )
    if axes is None:  # no axes input: the leading ones (bounds may be run-time elsewhere)
        axes = range(vector_length(graph.context, analysed.inputs[1]) or rank)
    axes = [a + rank if a < 0 else a for a in axes]
    if axis not in axes:
        return
    i = axes.index(axis)
    n = graph.dims[key].size
    ends = const_ints(analysed.inputs[2])
    start = slice(starts[i], ends[i]).indices(n)[0]
    gone = removed.get(key, np.zeros(0, dtype=np.int64))
    new_start = start - int(np.count_nonzero(gone < start))
    out_key = (analysed.outputs[0].name, axis)
    out_size = graph.context.shape(analysed.outputs[0])[axis]
    new_end = new_start + (new_size(graph, out_key, removed) if out_key in graph.dims else out_size)
    for input_index, new in ((1, new_start), (2, new_end)):
        entries = const_ints(analysed.inputs[input_index])
        entries[i] = new
        dtype = constant_array(analysed.inputs[input_index]).dtype
        fresh = add_initializer(g, f"{node.name or 'slice'}_bound", np.array(entries, dtype=dtype))
        node.replace_input_with(input_index, fresh)


def set_shape_entry(g, node, analysed, graph, input_index: int, position: int, new: int) -> None:
    """Give ``node`` its own copy of shape input ``input_index`` with ``position`` = ``new``.

    The constant part holding the entry (the whole input, or one Concat piece, perhaps behind
    Cast/Unsqueeze) is replaced by a fresh constant; a Concat is copied, since exporters
    share these between nodes.
    """
    source = analysed.inputs[input_index]
    found = constant_piece(graph.context, source, position)
    if found is None:
        raise ValueError(f"{node.name}: shape entry {position} is not a constant")
    part, entries, offset, slot = found
    entries[offset] = new
    dtype = part.dtype.numpy() if part.dtype is not None else np.int64
    fresh = add_initializer(g, f"{part.name}_pruned", np.array(entries, dtype=dtype))
    if slot is None:
        node.replace_input_with(input_index, fresh)
        return
    concat = node.inputs[input_index].producer()
    inputs = list(concat.inputs)
    inputs[slot] = fresh
    copy = ir.node("Concat", inputs, attributes={"axis": 0})
    copy.outputs[0].name = unique_name(g, f"{source.name}_pruned")
    copy.outputs[0].type = node.inputs[input_index].type
    g.insert_before(node, copy)
    node.replace_input_with(input_index, copy.outputs[0])
