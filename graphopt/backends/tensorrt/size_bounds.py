"""The largest size of a symbolic dim that a model can take, where its graph states it.

A transformer computes its position ids from the sequence length (``Range(0, seq)``, or a
``Slice`` of a constant ``position_ids`` buffer up to ``seq``) and looks them up in a table of
``max_positions`` rows: one token more and ONNX Runtime fails, and an engine built for it
reads past the table. Names (``sequence``, ``max_position_embeddings``) are no safe guide,
so this reads the graph itself:

- a ``Gather`` on a constant table whose indices are computed from input *shapes* only (never
  from input values: token ids index a vocabulary, not a position);
- a ``Slice`` of a constant whose starts/ends are computed from input shapes (a sequence
  longer than the buffer would be cut short, and mismatch the tokens further on).

Each such computation is cut out of the graph (constants, ``Shape`` of graph inputs, the ops
between) and run in ONNX Runtime for candidate sizes, on zeros of those shapes (``Shape``
reads only the shape). A size is
too large when the indices leave the table, the slice is cut short, or the computation
itself fails (a buffer sliced short and expanded to the sequence). The largest size that
passes is found by bisection; a computation that fails even at the smallest size says
nothing and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

# Cut-out computations larger than this are not evaluated (position ids take a handful of
# nodes; anything larger is not a position lookup, and evaluating it costs time).
MAX_NODES = 64
# Constants a computation may hold (position_ids buffers hold max_positions values).
MAX_CONSTANT_ELEMENTS = 1 << 20
# The largest size tried: beyond any profile graphopt derives, and small enough that what a
# lookup computes (a [seq] range, at worst a [seq, seq] mask) stays cheap.
CEILING = 8192
# Largest input fed to a cut-out computation (zeros; only its shape is read).
MAX_FEED_ELEMENTS = 1 << 24
# Lookups examined per model (an LLM repeats its rotary Slices per layer; the first ones say
# what the rest do).
MAX_LOOKUPS = 64
_SHAPE_OPS = ("Shape", "Size")
_DEFAULT_DOMAINS = ("", "ai.onnx")
_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


@dataclass(frozen=True)
class Lookup:
    """A constant read at positions computed from input shapes."""

    node: str  # the Gather or Slice, for the report
    op: str
    rows: tuple[int, ...]  # extent of the constant along each checked axis
    model: onnx.ModelProto  # the cut-out computation
    inputs: tuple[str, ...]  # graph inputs whose shapes it reads
    # The Gather's indices, or the Slice's starts, ends, axes, steps ("": not given); the
    # cut-out model's outputs are those given, in this order.
    operands: tuple[str, ...]

    def describe(self) -> str:
        if self.op == "Gather":
            return f"Gather {self.node!r} reads a table of {self.rows[0]} rows"
        shape = "x".join(map(str, self.rows))
        return f"Slice {self.node!r} cuts the dim's length out of a constant of {shape}"


@dataclass(frozen=True)
class SizeLimit:
    """The largest size a dim takes, and what in the model says so."""

    size: int
    why: str


class SizeBounds:
    """Reads a model's shape-derived lookups once; answers, per dim, the largest size."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        input_dims: Mapping[str, Sequence[int | str]],
    ) -> None:
        """``input_dims``: each graph input's dims, a fixed size or the dim's key."""
        self._dims = {name: tuple(dims) for name, dims in input_dims.items()}
        self._types = {
            v.name: v.type.tensor_type.elem_type
            for v in proto.graph.input
            if v.type.HasField("tensor_type")
        }
        self.lookups = find_lookups(proto, set(self._dims))
        self._sessions: dict[int, object] = {}

    def read_keys(self) -> set[str]:
        """The dims some lookup reads."""
        return {
            d
            for lookup in self.lookups
            for name in lookup.inputs
            for d in self._dims[name]
            if isinstance(d, str)
        }

    def largest(self, key: str, sizes: Mapping[str, int]) -> SizeLimit | None:
        """The largest size of ``key`` that every lookup reading it takes, the other dims at
        ``sizes``; None when no lookup bounds it below :data:`CEILING`."""
        limit: SizeLimit | None = None
        for lookup in self.lookups:
            if not any(key in self._dims[name] for name in lookup.inputs):
                continue

            def fits(size: int, lookup: Lookup = lookup) -> bool:
                return self._fits(lookup, {**sizes, key: size})

            # A lookup that fails at size 1 (another dim's size, an op ORT lacks) says
            # nothing about this dim.
            if not fits(1):
                continue
            # A lookup that takes every size tried does not bound this dim either.
            if fits(CEILING):
                continue
            low, high = 1, CEILING  # fits(low), not fits(high)
            while high - low > 1:
                middle = (low + high) // 2
                if fits(middle):
                    low = middle
                else:
                    high = middle
            if limit is None or low < limit.size:
                limit = SizeLimit(low, lookup.describe())
        return limit

    def _fits(self, lookup: Lookup, sizes: Mapping[str, int]) -> bool:
        feeds = {}
        for name in lookup.inputs:
            shape = tuple(d if isinstance(d, int) else sizes.get(d, 1) for d in self._dims[name])
            if int(np.prod(shape)) > MAX_FEED_ELEMENTS:
                return True  # not tried: nothing is claimed past what was
            dtype = helper.tensor_dtype_to_np_dtype(self._types.get(name, onnx.TensorProto.FLOAT))
            # Zeros: the computation reads only the shape (find_lookups made sure).
            feeds[name] = np.zeros(shape, dtype)
        session = self._sessions.get(id(lookup))
        try:
            if session is None:
                session = self._sessions[id(lookup)] = _session(lookup.model)
            values = session.run(None, feeds)
        except Exception:  # fails at this size (a buffer sliced short, then expanded)
            return False
        given = iter(values)
        operands = [np.asarray(next(given)) if name else None for name in lookup.operands]
        if lookup.op == "Gather":
            indices, rows = operands[0], lookup.rows[0]
            return bool(indices.size == 0 or (indices.min() >= -rows and indices.max() < rows))
        return _slice_fits(lookup.rows, *operands)


def _session(model: onnx.ModelProto):
    """An ONNX Runtime session of a cut-out computation (ONNX's reference evaluator was tried
    first: its GatherElements fails on shapes ONNX allows, which read as "too large")."""
    import onnx_ir as ir

    from graphopt.backends.ort import SessionConfig, create_session

    return create_session(ir.serde.deserialize_model(model), SessionConfig(opt_level="disable"))


def _slice_fits(
    rows: tuple[int, ...],
    starts: np.ndarray | None,
    ends: np.ndarray | None,
    axes: np.ndarray | None = None,
    steps: np.ndarray | None = None,
) -> bool:
    """Whether a Slice of a constant of ``rows`` gets all it asks for (not cut short)."""
    if starts is None or ends is None:
        return True
    starts, ends = starts.ravel(), ends.ravel()
    axes_list = range(len(starts)) if axes is None else axes.ravel()
    step_list = np.ones(len(starts), np.int64) if steps is None else steps.ravel()
    for start, end, axis, step in zip(starts, ends, axes_list, step_list, strict=False):
        extent = rows[int(axis) % len(rows)]
        start = int(start) + extent if start < 0 else int(start)
        end = int(end) + extent if end < 0 else int(end)
        if step > 0 and (start > extent or end > extent):
            return False
    return True


def find_lookups(proto: onnx.ModelProto, inputs: set[str]) -> list[Lookup]:
    """The main graph's Gathers and Slices on constants that read positions computed from
    the shapes of ``inputs`` only."""
    graph = proto.graph
    constants = {t.name: tuple(t.dims) for t in graph.initializer}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for output in node.output:
            producers[output] = node
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = tuple(value.dims)
    found: list[Lookup] = []
    for node in graph.node:
        if len(found) >= MAX_LOOKUPS:
            break
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in ("Gather", "Slice"):
            continue
        if len(node.input) < 2 or node.input[0] not in constants:
            continue
        data = constants[node.input[0]]
        if not data:
            continue
        if node.op_type == "Gather":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(data)
            wanted, rows = [node.input[1]], (data[axis],)
        else:
            if len(node.input) < 3:
                continue
            wanted, rows = list(node.input[1:5]), data
            if all(name in constants for name in wanted if name):
                continue  # a constant slice: fixed, whatever the input shapes
        cut = _cut_out(proto, producers, [name for name in wanted if name], inputs)
        if cut is not None and cut[1]:
            model, read = cut
            name = node.name or node.output[0]
            found.append(Lookup(name, node.op_type, rows, model, read, tuple(wanted)))
    return found


def _cut_out(
    proto: onnx.ModelProto,
    producers: Mapping[str, onnx.NodeProto],
    wanted: list[str],
    inputs: set[str],
) -> tuple[onnx.ModelProto, tuple[str, ...]] | None:
    """The computation of ``wanted`` as a model of its own, and the graph inputs whose shapes
    it reads; None when it reads an input's values, or is too large or not plain ONNX."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes: dict[int, onnx.NodeProto] = {}
    used_initializers: dict[str, onnx.TensorProto] = {}
    read: dict[str, None] = {}
    stack = list(wanted)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in initializers:
            used_initializers[name] = initializers[name]
            continue
        if name in inputs:
            return None  # its values, not its shape: token ids, a mask
        node = producers.get(name)
        if node is None or node.domain not in _DEFAULT_DOMAINS:
            return None
        if any(a.type in _GRAPH_ATTRIBUTES for a in node.attribute):
            return None  # If/Loop/Scan: not cut out
        nodes[id(node)] = node
        if len(nodes) > MAX_NODES:
            return None
        if node.op_type in _SHAPE_OPS:
            source = node.input[0]
            if source not in inputs:
                return None  # the shape of a computed tensor: not cut out cheaply
            read[source] = None
            continue
        stack.extend(i for i in node.input if i)
    if sum(int(np.prod(t.dims)) for t in used_initializers.values()) > MAX_CONSTANT_ELEMENTS:
        return None
    ordered = [n for n in graph.node if id(n) in nodes]  # the graph's order is topological
    feeds = [v for v in graph.input if v.name in read]
    sub = helper.make_graph(
        ordered,
        "lookup",
        feeds,
        [onnx.ValueInfoProto(name=name) for name in wanted],
        list(used_initializers.values()),
    )
    model = helper.make_model(sub, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    return model, tuple(read)
