"""Shape tensors built at run time, followed entry by entry.

Exporters often compute Reshape/Expand targets instead of stating them: TorchScript writes
``x.view(*x.size()[:-1], n_head, -1)`` as Shape → Gather → Unsqueeze → Concat with constant
pieces, LLaMA's ``repeat_kv`` as ``Shape(k)[1] * n_rep``, Paddle casts Shape to int32 and
back. The channel rules need two answers about such tensors:

- :func:`shape_source`: where entry p of a target comes from — a constant (removal rewrites
  it: :func:`constant_piece`), ``scale × Shape(v)[k]`` (a :class:`DimRef`: it follows ``v``'s
  dim by itself once that dim loses matching channels), or None (anything else).
- :func:`entry_sinks`: where entry p of a Shape output ends up — the target entries it sets
  (with the factor it was multiplied by), or why it cannot be followed (arithmetic, Range,
  ConstantOfShape…: something that would change meaning when the channel count changes).

Only plumbing that moves an entry unchanged is followed (Cast, Identity, Gather/Slice with
constant indices, Squeeze/Unsqueeze/Reshape of one-element or 1-D vectors, Concat), plus
multiplication by a positive constant and the exporters' ``Where(Equal(t, -1), 1, t)`` guard,
which never fires for a dim (dims are never negative).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphopt.analysis.channel_shapes import Context
from graphopt.editing import attribute, const_ints, constant_array

# Longest chain of shape plumbing followed for one entry.
MAX_SHAPE_HOPS = 32


@dataclass(frozen=True)
class DimRef:
    """A shape entry read at run time from a tensor's dim: ``scale × Shape(value)[axis]``."""

    value: ir.Value
    axis: int
    scale: int = 1


Entry = int | bool | DimRef | None  # bool: a decided comparison (Equal), internal only


def vector_length(ctx: Context, value: ir.Value | None, hops: int = MAX_SHAPE_HOPS) -> int | None:
    """Length of a 1-D shape vector: inferred, or else from the plumbing that built it.

    Inference gives up on some exporters' shape arithmetic (Paddle casts Shape to int32 and
    back) although the length follows from the ops: a Shape's rank, a Slice's bounds, …
    """
    shape = ctx.shape(value)
    if shape is not None:
        if len(shape) != 1:
            return None
        if isinstance(shape[0], int):
            return shape[0]
    node = value.producer() if value is not None else None
    if node is None or hops <= 0 or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Shape":
        axes = shape_range(ctx, node)
        return None if axes is None else len(axes)
    if op in ("Cast", "Identity"):
        return vector_length(ctx, node.inputs[0], hops - 1)
    if op == "Concat":
        lengths = [vector_length(ctx, piece, hops - 1) for piece in node.inputs]
        return None if None in lengths else sum(lengths)
    if op in ("Gather", "Slice"):
        positions = _positions(ctx, node)
        indices = constant_array(node.inputs[1]) if op == "Gather" else None
        if positions is None or (indices is not None and indices.ndim != 1):
            return None
        return len(positions)
    return None


def shape_range(ctx: Context, node: ir.Node) -> range | None:
    """The input axes a Shape node reports (its ``start``/``end`` attributes)."""
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        return None
    rank = len(shape)
    start, end = attribute(node, "start", 0), attribute(node, "end", rank)
    start, end = (a + rank if a < 0 else a for a in (start, end))
    return range(max(0, min(start, rank)), max(0, min(end, rank)))


def _positions(ctx: Context, node: ir.Node) -> list[int] | None:
    """Input positions each output entry of a Gather or Slice over a 1-D vector comes from."""
    length = vector_length(ctx, node.inputs[0])
    if length is None:
        return None
    if node.op_type == "Gather":
        indices = constant_array(node.inputs[1], max_bytes=1 << 16)
        if indices is None or indices.ndim > 1 or indices.dtype.kind not in "iu":
            return None
        if attribute(node, "axis", 0) not in (0, -1):
            return None
        flat = [int(i) for i in indices.reshape(-1)]
        if any(not -length <= i < length for i in flat):
            return None
        return [i + length if i < 0 else i for i in flat]
    inputs = [*node.inputs, None, None][:5]
    starts, ends = const_ints(inputs[1]), const_ints(inputs[2])
    axes = const_ints(inputs[3]) if inputs[3] is not None else [0]
    steps = const_ints(inputs[4]) if inputs[4] is not None else [1]
    if None in (starts, ends, axes, steps):
        return None
    if len(starts) != 1 or axes not in ([0], [-1]) or len(steps) != 1 or steps[0] == 0:
        return None
    return list(range(length)[slice(starts[0], ends[0], steps[0])])


def _count(ctx: Context, value: ir.Value | None) -> int | None:
    """Elements of a scalar or 1-D vector (None for anything else)."""
    shape = ctx.shape(value)
    if shape is not None and len(shape) == 0:
        return 1
    return vector_length(ctx, value)


def _moves_unchanged(ctx: Context, node: ir.Node) -> bool:
    """Cast/Identity, or Squeeze/Unsqueeze/Reshape that keeps a scalar or vector's entries in
    order (one element to one element, or 1-D to 1-D of the same length)."""
    if node.op_type in ("Cast", "Identity"):
        return True  # shape entries are small integers: every numeric type holds them
    if node.op_type not in ("Squeeze", "Unsqueeze", "Reshape"):
        return False
    shapes = [ctx.shape(v) for v in (node.inputs[0], node.outputs[0])]
    if any(shape is None or len(shape) > 1 for shape in shapes):
        return False
    counts = [_count(ctx, v) for v in (node.inputs[0], node.outputs[0])]
    return counts[0] is not None and counts[0] == counts[1]


def _at(ctx: Context, operand: ir.Value, position: int) -> int:
    """Position in a broadcast operand of a binary op on vectors (one element: position 0)."""
    return 0 if _count(ctx, operand) == 1 else position


def _entry(ctx: Context, value: ir.Value | None, position: int, hops: int) -> Entry:
    if value is None or position < 0 or hops <= 0:
        return None
    whole = const_ints(value)
    if whole is not None:
        return whole[position] if position < len(whole) else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op, inputs = node.op_type, node.inputs
    if op == "Shape":
        axes = shape_range(ctx, node)
        return DimRef(inputs[0], axes[position]) if axes and position < len(axes) else None
    if op == "Concat":
        piece = concat_piece(ctx, value, position)
        return None if piece is None else _entry(ctx, piece[0], piece[1], hops - 1)
    if _moves_unchanged(ctx, node):
        return _entry(ctx, inputs[0], position, hops - 1)
    if op in ("Gather", "Slice"):
        positions = _positions(ctx, node)
        if positions is None or position >= len(positions):
            return None
        return _entry(ctx, inputs[0], positions[position], hops - 1)
    if op == "ConstantOfShape":
        fill = attribute(node, "value")
        array = fill.numpy() if fill is not None else None
        return int(array.reshape(-1)[0]) if array is not None and array.dtype.kind in "iu" else None
    if op in ("Mul", "Equal") and len(inputs) == 2:
        a, b = (_entry(ctx, v, _at(ctx, v, position), hops - 1) for v in inputs)
        return _mul(a, b) if op == "Mul" else _equal(a, b)
    if op == "Where":
        cond = _entry(ctx, inputs[0], _at(ctx, inputs[0], position), hops - 1)
        if not isinstance(cond, bool):
            return None
        chosen = inputs[1] if cond else inputs[2]
        return _entry(ctx, chosen, _at(ctx, chosen, position), hops - 1)
    return None


def _mul(a: Entry, b: Entry) -> Entry:
    if isinstance(a, DimRef):
        a, b = b, a
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int):
        return None
    if isinstance(b, DimRef):
        return DimRef(b.value, b.axis, b.scale * a) if a > 0 else None
    return a * b if isinstance(b, int) else None


def _equal(a: Entry, b: Entry) -> bool | None:
    if isinstance(a, DimRef):
        a, b = b, a
    if isinstance(a, int) and not isinstance(a, bool):
        if isinstance(b, DimRef) and a < 0:
            return False  # a dim is never negative (the exporters' -1 guard)
        if isinstance(b, int) and not isinstance(b, bool):
            return a == b
    return None


def shape_source(ctx: Context, value: ir.Value | None, position: int) -> int | DimRef | None:
    """Where entry ``position`` of a shape tensor comes from: a constant int, a (scaled) dim
    read by ``Shape``, or None when it is computed some other way (arithmetic, Range, …)."""
    entry = _entry(ctx, value, position, MAX_SHAPE_HOPS)
    return None if isinstance(entry, bool) else entry


def decided_entries(ctx: Context, value: ir.Value | None) -> list[int | bool] | None:
    """Every entry of a scalar or short 1-D integer/bool vector, when each one is decided
    without running the model: constants, static dims, and comparisons that hold whatever
    the symbolic dims are (the exporters' ``Equal(Shape(x)[i], -1)`` guard is False, since
    a dim is never negative). None when any entry is only known at run time."""
    count = _count(ctx, value)
    if count is None or count > 64:
        return None
    entries = [_entry(ctx, value, p, MAX_SHAPE_HOPS) for p in range(count)]
    if any(e is None or isinstance(e, DimRef) for e in entries):
        return None
    return entries  # type: ignore[return-value]  (ints and bools only)


def concat_piece(
    ctx: Context, value: ir.Value | None, position: int
) -> tuple[ir.Value, int, int] | None:
    """(input, offset in it, input slot) of a 1-D Concat holding entry ``position``."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return None
    start = 0
    for slot, piece in enumerate(node.inputs):
        length = vector_length(ctx, piece)
        if length is None:
            return None  # a piece of unknown length: later entries cannot be located
        if start <= position < start + length:
            return piece, position - start, slot
        start += length
    return None


def constant_piece(
    ctx: Context, value: ir.Value | None, position: int
) -> tuple[ir.Value, list[int], int, int | None] | None:
    """The part of shape tensor ``value`` that holds entry ``position`` and is constant
    throughout (perhaps behind Cast/Unsqueeze): (part, its entries, offset of the entry in
    it, Concat slot or None for the whole tensor). Removal replaces that part by a fresh
    constant; None when the entry cannot be rewritten that way."""
    candidates = [(value, position, None)]
    piece = concat_piece(ctx, value, position)
    if piece is not None:
        candidates.append(piece)
    for part, offset, slot in candidates:
        length = vector_length(ctx, part)
        if length is None or length > 64:
            continue
        entries = [shape_source(ctx, part, i) for i in range(length)]
        if all(isinstance(e, int) for e in entries):
            return part, entries, offset, slot
    return None


Sink = tuple[ir.Node, int, int]  # (Reshape or Expand node, entry of its shape input, factor)
_SINK = "sink"


def entry_sinks(ctx: Context, value: ir.Value, position: int) -> list[Sink] | str:
    """Every target entry that entry ``position`` of the integer vector ``value`` (a Shape
    output) sets, with the positive factor it was multiplied by on the way; a reason string
    when it also feeds anything else (arithmetic, a graph output, a subgraph, …)."""
    sinks: list[Sink] = []
    home = value.producer().graph if value.producer() is not None else None
    stack, seen = [(value, position, 1)], set()
    while stack:
        current, pos, scale = stack.pop()
        if (id(current), pos, scale) in seen:
            continue
        seen.add((id(current), pos, scale))
        if len(seen) > MAX_SHAPE_HOPS * 8:
            return "the channel count feeds too many shape computations"
        if current.is_graph_output():
            return "the channel count is a graph output"
        for use in current.uses():
            node, slot = use.node, use.idx
            if node.domain not in ("", "ai.onnx") or node.graph is not home:
                return f"the channel count is used by {node.op_type} (not followed)"
            step = _forward(ctx, node, slot, current, pos)
            if step == _SINK:
                sinks.append((node, pos, scale))
            elif isinstance(step, str):
                return step
            else:
                stack.extend((node.outputs[0], q, scale * factor) for q, factor in step)
    return sinks


def _forward(
    ctx: Context, node: ir.Node, slot: int, value: ir.Value, pos: int
) -> list[tuple[int, int]] | str:
    """Where entry ``pos`` of ``node``'s input ``slot`` goes: [(output position, factor)],
    ``_SINK`` for a target entry, [] when it has no effect, or a reason string."""
    op, out = node.op_type, node.outputs[0] if node.outputs else None
    if op in ("Reshape", "Expand") and slot == 1:
        return _SINK
    if slot == 0 and _moves_unchanged(ctx, node):
        return [(pos, 1)]
    if op == "Shape":
        return []  # the length of a shape vector does not depend on its entries
    if op in ("Gather", "Slice") and slot == 0:
        positions = _positions(ctx, node)
        if positions is None:
            return f"the channel count is read by a {op} with run-time indices"
        return [(q, 1) for q, p in enumerate(positions) if p == pos]
    if op == "Concat" and vector_length(ctx, out) is not None:
        offset = 0
        for piece in node.inputs[:slot]:
            length = vector_length(ctx, piece)
            if length is None:
                return "the channel count goes into a Concat of unknown layout"
            offset += length
        return [(offset + pos, 1)]
    others = [v for i, v in enumerate(node.inputs) if i != slot]
    if op in ("Mul", "Equal") and len(others) == 1 and _count(ctx, out) == _count(ctx, value):
        other = _entry(ctx, others[0], _at(ctx, others[0], pos), MAX_SHAPE_HOPS)
        if op == "Mul" and isinstance(other, int) and not isinstance(other, bool) and other > 0:
            return [(pos, other)]
        if op == "Equal" and isinstance(other, int) and not isinstance(other, bool) and other < 0:
            return []  # compared with a negative constant: always false, whatever the count
    if op == "Where" and slot in (1, 2) and _count(ctx, out) == _count(ctx, value):
        cond = _entry(ctx, node.inputs[0], _at(ctx, node.inputs[0], pos), MAX_SHAPE_HOPS)
        if isinstance(cond, bool):
            return [(pos, 1)] if (slot == 1) == cond else []
    return f"the channel count is used by {op}"
