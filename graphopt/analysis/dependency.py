"""The channel dependency graph: which (tensor, axis) dims must lose the same channels.

Nodes are channel dims ``(value name, axis)``; an edge couples channel ``i`` of one dim with
channel ``j`` of another (identity, Concat/Split/Slice offsets, heads blocks, GQA repeats,
grouped-conv groups — whatever the op's rule in :mod:`dependency_rules` says). The search
starts at the channel axes of every weight-bearing node and follows rules through producers
and consumers until closed, so every node touching a tracked dim has been asked about it.

Channels connected through edges form one *unit* (removed together); dims connected at all
form one *group* (see :mod:`graphopt.analysis.zig`). A dim is *blocked* when any node touching
it refuses (no rule, reduction over it, graph input/output, …); the reason is kept.

A rule that needs a size onnx inference left unknown waits: the search retries it once other
couplings have taught sizes, and blocks only when nothing more can be learned. A weight used
by several nodes is one weight: one dim, so all its uses lose the same channels and it stays
shared (a copy per use would grow the model). A constant fill used by several nodes (zeros
or ones an exporter merged) gets one dim per use instead, so unrelated layers are not
coupled through it; removal gives each use its own slice of the fill.

The model is never edited: shapes come from :func:`graphopt.analysis.shapes.infer_shapes`
(a clone sharing tensors) and only small constants (shapes, axes) are read.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.analysis.channel_shapes import Context
from graphopt.analysis.dependency_rules import Blocked, Unknown, couple, seeds
from graphopt.analysis.shapes import infer_shapes
from graphopt.editing import constant_array

DimKey = tuple[str, int]


@dataclass
class Dim:
    """One channel dim: ``value``'s ``axis`` with ``size`` channels."""

    key: DimKey  # (value name, axis); a shared fill's per-use dim: ("name::node index", axis)
    size: int
    offset: int  # first element in the global channel index space
    is_param: bool
    value: ir.Value | None = None
    use_node: ir.Node | None = None  # set for a per-use dim of a shared fill
    blocked: list[str] = field(default_factory=list)


@dataclass
class DependencyGraph:
    """Channel dims, their element-level couplings, and the nodes that touch each dim."""

    model: ir.Model  # the shape-inferred clone the analysis ran on
    dims: dict[DimKey, Dim] = field(default_factory=dict)
    # Edge arrays over the global element index space.
    edge_a: list[np.ndarray] = field(default_factory=list)
    edge_b: list[np.ndarray] = field(default_factory=list)
    # Dim-level adjacency (for groups) and the nodes each dim meets. The neighbours are an
    # insertion-ordered set (dict keys), not a set: a set of (name, axis) keys iterates in
    # string-hash order, which PYTHONHASHSEED changes per process, and that order decides the
    # order of a group's dims, hence of the pruned model's new initializers and of
    # `analyze --json` (same input, different bytes from run to run).
    neighbours: dict[DimKey, dict[DimKey, None]] = field(default_factory=dict)
    nodes: dict[DimKey, list[ir.Node]] = field(default_factory=dict)
    seconds: float = 0.0
    context: Context | None = None

    @property
    def total_elements(self) -> int:
        return sum(d.size for d in self.dims.values())

    def element_components(self) -> np.ndarray:
        """Unit label of every element of the global index space (its smallest element)."""
        parent = np.arange(self.total_elements)
        if not self.edge_a:
            return parent
        a = np.concatenate(self.edge_a)
        b = np.concatenate(self.edge_b)
        # Vectorized union-find: hook the larger root under the smaller, then jump pointers
        # until every element points at its root; repeat until no edge joins two roots.
        while True:
            ra, rb = parent[a], parent[b]
            differ = ra != rb
            if not differ.any():
                return parent
            np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
            while True:
                jumped = parent[parent]
                if np.array_equal(jumped, parent):
                    break
                parent = jumped

    def dim_components(self) -> list[list[DimKey]]:
        """Dims connected through any coupling, in discovery order."""
        seen: set[DimKey] = set()
        comps: list[list[DimKey]] = []
        for key in self.dims:
            if key in seen:
                continue
            comp, stack = [], [key]
            seen.add(key)
            while stack:
                cur = stack.pop()
                comp.append(cur)
                for nxt in self.neighbours.get(cur, ()):
                    if nxt not in seen:
                        seen.add(nxt)
                        stack.append(nxt)
            comps.append(comp)
        return comps


def build_dependency_graph(
    model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> DependencyGraph:
    """Infer shapes on a clone and build the channel dependency graph of its main graph."""
    start = time.perf_counter()
    inferred, _ = infer_shapes(model, input_shapes)
    graph = build_on_inferred(inferred)
    graph.seconds = time.perf_counter() - start
    return graph


def build_on_inferred(model: ir.Model) -> DependencyGraph:
    """The dependency graph of a model whose shapes are already inferred."""
    ctx = Context(model.opset_imports, past_inference=True)
    dg = DependencyGraph(model, context=ctx)
    main = model.graph
    index = {id(node): i for i, node in enumerate(main)}
    queue: deque[Dim] = deque()
    pending: list[tuple[ir.Node, Dim]] = []
    fills: dict[int, bool] = {}

    def add(value: ir.Value, axis: int, via: ir.Node | None) -> Dim | None:
        shape = ctx.shape(value)
        if shape is None or axis >= len(shape) or not isinstance(shape[axis], int):
            return None
        if shape[axis] <= 1:
            return None
        param = _is_param(value)
        use_node = None
        if param and via is not None and _shared_fill(value, fills):
            # A constant fill (zeros, ones) read by several nodes is most often identical
            # constants the exporter merged: one dim per use, so unrelated layers are not
            # coupled through it; any slice of it is the same fill. A real weight read by
            # several nodes is one weight (tied): one dim, so every use loses the same
            # channels and the pruned tensor stays shared.
            use_node = via
        key = (f"{value.name}{USE_SEP}{index[id(via)]}" if use_node else value.name, axis)
        if key in dg.dims:
            return dg.dims[key]
        dim = Dim(key, shape[axis], dg.total_elements, param, value=value, use_node=use_node)
        dg.dims[key] = dim
        queue.append(dim)
        return dim

    def visit(node: ir.Node, dim: Dim, final: bool) -> bool:
        """Apply node's rule to the dim; False when it waits for an unknown size."""
        result = couple(ctx, node, dim.value, dim.key[1])
        if isinstance(result, Unknown) and not final:
            pending.append((node, dim))
            return False
        if isinstance(result, Blocked):
            dim.blocked.append(result.reason)
            return True
        for c in result:
            shape = ctx.shape(c.dst)
            if c.dst_size and shape is not None and not isinstance(shape[c.dst_axis], int):
                ctx.sizes[(id(c.dst), c.dst_axis)] = c.dst_size
            other = add(c.dst, c.dst_axis, node)
            if other is None:
                size = (shape or (None,) * (c.dst_axis + 1))[c.dst_axis]
                if ctx.shape(c.dst) and ctx.shape(c.dst)[c.dst_axis] in (0, 1):
                    continue  # size-1 (broadcast) dims carry no channels
                dim.blocked.append(f"{node.op_type}: size of {c.dst.name} unknown ({size})")
                continue
            dg.edge_a.append(dim.offset + c.src_idx)
            dg.edge_b.append(other.offset + c.dst_idx)
            dg.neighbours.setdefault(dim.key, {})[other.key] = None
            dg.neighbours.setdefault(other.key, {})[dim.key] = None
        return True

    for node in main:
        for value, axis in seeds(ctx, node):
            add(value, axis, node)

    final = False
    while True:
        while queue:
            dim = queue.popleft()
            for node in _touching(dg, main, dim):
                visit(node, dim, final)
        if not pending:
            break
        retry, pending[:] = list(pending), []
        progressed = False
        for node, dim in retry:
            progressed |= visit(node, dim, final)
        if not progressed and not queue:
            final = True  # nothing learned: the remaining ones block for good
    return dg


USE_SEP = "::"


def split_key(name: str) -> tuple[str, int | None]:
    """(value name, index of the using node in the main graph or None) of a dim key name."""
    base, sep, use = name.rpartition(USE_SEP)
    return (base, int(use)) if sep and use.isdigit() else (name, None)


def _shared_fill(value: ir.Value, seen: dict[int, bool]) -> bool:
    """Whether ``value`` (a constant) is read by several nodes and holds one repeated value."""
    if id(value) not in seen:
        array = constant_array(value) if len({id(u.node) for u in value.uses()}) > 1 else None
        seen[id(value)] = (
            array is not None and array.size > 0 and bool((array == array.flat[0]).all())
        )
    return seen[id(value)]


def _is_param(value: ir.Value) -> bool:
    if value.is_graph_input():
        return False
    producer = value.producer()
    return value.const_value is not None or (
        producer is not None and producer.op_type == "Constant"
    )


def _touching(dg: DependencyGraph, main: ir.Graph, dim: Dim) -> list[ir.Node]:
    """Nodes to ask about ``dim`` (its producer and consumers); records blocks on the way."""
    value = dim.value
    if value.is_graph_input():
        dim.blocked.append("graph input")
    if value.is_graph_output():
        dim.blocked.append("graph output")
    if dim.use_node is not None:
        nodes = [dim.use_node]
    else:
        nodes = [u.node for u in value.uses()]
        producer = value.producer()
        if producer is not None and producer.op_type != "Constant":
            nodes.insert(0, producer)
    unique: list[ir.Node] = []
    seen: set[int] = set()
    for node in nodes:
        if id(node) in seen:
            continue
        seen.add(id(node))
        dg.nodes.setdefault(dim.key, []).append(node)
        if node.graph is not main:
            dim.blocked.append(f"used inside a subgraph ({node.op_type})")
            continue
        unique.append(node)
    return unique
