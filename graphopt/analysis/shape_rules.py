"""Channel rules of the ops whose sizes come from shape tensors: Reshape (and Flatten,
Squeeze, Unsqueeze), Expand and Shape.

A channel axis that a Reshape/Expand target states must be restated after removal: a
constant entry is rewritten (:mod:`channel_removal`); an entry read from a dim at run time
(:class:`~graphopt.analysis.shape_entries.DimRef`) follows that dim, which is coupled here so
that it loses matching channels. Shape may read a channel count only to feed such entries.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphopt.analysis.channel_shapes import Context, reshape_groups
from graphopt.analysis.coupling import Blocked, Coupling, Result, Unknown, identity
from graphopt.analysis.shape_entries import (
    DimRef,
    constant_piece,
    entry_sinks,
    shape_range,
    shape_source,
    vector_length,
)
from graphopt.editing import attribute

# Largest index grid a reshape rule enumerates (elements of the merged axis group).
MAX_RESHAPE_GRID = 1 << 24


def reshape_rule(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    x, y = node.inputs[0], node.outputs[0]
    if value is not x and value is not y:
        return Blocked(f"{node.op_type}: channel axis on the shape input")
    xs, ys = ctx.shape(x), ctx.shape(y)
    if node.op_type == "Reshape":
        # onnx inference often loses dims the shape constant states outright.
        ys = tuple(
            d if isinstance(d, int) else (_entry_size(ctx, node, p) or d) for p, d in enumerate(ys)
        )
        ys = tuple(d if not isinstance(d, int) or d > 0 else "?" for d in ys)
    matched = reshape_groups(xs, ys)
    if matched is None:
        return Blocked(f"{node.op_type}: cannot match input and output axes")
    groups, xs, ys = matched
    for v, shape in ((x, xs), (y, ys)):
        if all(isinstance(d, int) for d in shape):
            ctx.known[id(v)] = tuple(shape)
    forward = value is x
    src_shape, dst_shape = (xs, ys) if forward else (ys, xs)
    for gx, gy in groups:
        src_axes, dst_axes = (gx, gy) if forward else (gy, gx)
        if axis in src_axes:
            break
    # The merged/split group is enumerated once; the destination channel axis is the
    # outermost non-trivial one (hidden → heads × head_dim tracks heads; head_dim never shrinks).
    src_dims = [src_shape[a] for a in src_axes]
    dst_dims = [dst_shape[a] for a in dst_axes]
    if not all(isinstance(d, int) for d in (*src_dims, *dst_dims)):
        return Blocked(f"{node.op_type}: sizes unknown around the channel axis")
    dst_axis = next(a for a in dst_axes if dst_shape[a] > 1)
    total = math.prod(src_dims)  # ints: reshape_groups checked the non-leading dims
    if total > MAX_RESHAPE_GRID:
        return Blocked(f"{node.op_type}: merged axis group too large ({total})")
    flat = np.arange(total, dtype=np.int64)
    src_idx = np.unravel_index(flat, src_dims)[src_axes.index(axis)]
    dst_idx = np.unravel_index(flat, dst_dims)[dst_axes.index(dst_axis)]
    pairs = np.unique(np.stack([src_idx, dst_idx]), axis=1)
    target = y if forward else x
    out = [Coupling(target, dst_axis, pairs[0], pairs[1])]
    if node.op_type != "Reshape":
        return out
    out_axis = dst_axis if forward else axis
    source = _target_source(ctx, node, out_axis)
    if isinstance(source, Blocked):
        return source
    if isinstance(source, DimRef):
        # The entry is read from source's dim at run time, so it follows that dim by itself
        # as long as the dim loses matching channels (scale per channel): couple the two.
        ref = _ref_coupling(ctx, source, ys[out_axis], *(pairs if forward else (None, None)))
        if isinstance(ref, Blocked):
            return ref
        if (source.value, source.axis, source.scale) != (value, axis, 1):
            out.append(ref)
    return out


def _ref_coupling(
    ctx: Context, ref: DimRef, size: int, src: np.ndarray | None, dst: np.ndarray | None
) -> Coupling | Blocked:
    """Coupling of a target axis of ``size`` whose entry reads ``ref`` with ``ref``'s dim:
    entry h goes with channel h // scale. ``src``/``dst``: the arriving dim's channels and
    the target-axis indices they map to (None: the arriving dim is the target axis)."""
    n = ctx.shape(ref.value)[ref.axis]
    if not isinstance(n, int):
        return Unknown(f"size of {ref.value.name} unknown")
    if n <= 1:  # a size-1 dim carries no channels: the entry is a fixed number in disguise
        return Blocked("target entry of the channel axis is read from a size-1 dim")
    if n * ref.scale != size:
        return Blocked(f"target entry reads a dim of size {n}×{ref.scale}, not {size}")
    if src is None:
        src = dst = np.arange(size, dtype=np.int64)
    return Coupling(ref.value, ref.axis, src, dst // ref.scale)


def _entry_size(ctx: Context, node: ir.Node, position: int) -> int | None:
    """Size Reshape's target states for output axis ``position``, when it is known."""
    source = shape_source(ctx, node.inputs[1], position)
    if isinstance(source, DimRef):
        shape = ctx.shape(source.value)
        size = shape[source.axis] if shape is not None and source.axis < len(shape) else None
        return size if isinstance(size, int) else None
    return source


def _target_source(ctx: Context, node: ir.Node, out_axis: int) -> int | DimRef | Blocked:
    """Where Reshape's target entry for ``out_axis`` comes from, or why it cannot be followed.

    A constant is rewritten on removal; a dim read by Shape (an exporter's
    ``x.view(*x.size()[:-1], -1)``) or a 0 entry copying the input's dim follows that dim.
    """
    source = shape_source(ctx, node.inputs[1], out_axis)
    if source is None:
        return Blocked("Reshape target size of the channel axis is computed at run time")
    if source == 0 and not attribute(node, "allowzero", 0):
        return DimRef(node.inputs[0], out_axis)  # 0 copies the input's dim at this position
    if (
        isinstance(source, int)
        and source != -1
        and not constant_piece(ctx, node.inputs[1], out_axis)
    ):
        return Blocked("Reshape target size of the channel axis is mixed into a run-time part")
    return source


def expand_rule(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    x, y = node.inputs[0], node.outputs[0]
    if value is not x and value is not y:
        return Blocked("Expand: channel axis on the shape input")
    xs, ys = ctx.shape(x), ctx.shape(y)
    o = axis + len(ys) - len(xs) if value is x else axis
    i = o - (len(ys) - len(xs))
    if i < 0 or xs[i] != ys[o]:
        return Blocked("Expand broadcasts the channel axis")
    length = vector_length(ctx, node.inputs[1])
    if length is None:
        return Blocked("Expand: length of the target shape unknown")
    position = o - (len(ys) - length)  # < 0: the target does not reach the channel axis
    out = [identity(y, o, ys[o])] if value is x else [identity(x, i, xs[i])]
    if position >= 0:
        entry = shape_source(ctx, node.inputs[1], position)
        if entry is None or (
            isinstance(entry, int)
            and entry != 1
            and constant_piece(ctx, node.inputs[1], position) is None
        ):
            return Blocked("Expand target size of the channel axis is computed at run time")
        if isinstance(entry, DimRef) and (ctx.shape(entry.value)[entry.axis], entry.scale) != (
            1,
            1,
        ):
            # Read from a dim at run time (x's and y's channel axes are one to one here).
            ref = _ref_coupling(ctx, entry, ys[o], None, None)
            if isinstance(ref, Blocked):
                return ref
            if (entry.value, entry.axis, entry.scale) != (value, axis, 1):
                out.append(ref)
    return out


def shape_rule(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    """Shape may read the channel count only to restate it as a Reshape/Expand target entry.

    Reading other dims (batch, sequence) is harmless. The count may flow through shape
    plumbing (Gather, Slice, Squeeze, Unsqueeze, Concat, Cast, a positive factor) into target
    entries: the dim such an entry sets holds factor × count channels and is coupled with
    these (entry h with channel h // factor), so it loses matching ones. Anything else
    (other arithmetic, Range, ConstantOfShape…) blocks.
    """
    axes = shape_range(ctx, node)
    if axes is None or axis not in axes:
        return []
    sinks = entry_sinks(ctx, node.outputs[0], axes.index(axis))
    if isinstance(sinks, str):
        return Blocked(f"Shape reads the channel count ({sinks})")
    n = ctx.shape(value)[axis]
    out: list[Coupling] = []
    for sink, position, factor in sinks:
        target, target_shape = sink.outputs[0], ctx.shape(sink.outputs[0])
        length = vector_length(ctx, sink.inputs[1])
        if target_shape is None or length is None:
            return Unknown(f"Shape: the shape of {target.name} is unknown")
        # Expand aligns its shape input with the output's trailing axes.
        out_axis = position + (len(target_shape) - length if sink.op_type == "Expand" else 0)
        if not 0 <= out_axis < len(target_shape):
            return Blocked("Shape: the channel count goes to a target entry out of range")
        size = target_shape[out_axis]
        if size != n * factor:
            if not isinstance(size, int):
                return Unknown(f"Shape: size of {target.name} unknown")
            return Blocked(f"Shape: the channel count sets a dim of size {size}")
        entries = np.arange(size, dtype=np.int64)
        out.append(Coupling(target, out_axis, entries // factor, entries, size))
    return out
