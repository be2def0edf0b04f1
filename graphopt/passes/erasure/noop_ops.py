"""Ops that provably return their input unchanged (same values, shape and dtype)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.analysis.shapes import reconcile_shapes
from graphopt.passes.erasure.derived_dims import DerivedDims
from graphopt.registry import GraphPass, Stage, register

# Slice ends at or beyond this are "to the end" whatever the dim (exporters use INT64_MAX).
_HUGE = 1 << 31

Check = Callable[[ir.Node, int], bool]


def _dims(value: ir.Value | None) -> tuple[int | ir.SymbolicDim, ...] | None:
    if value is None or value.shape is None:
        return None
    return tuple(value.shape.dims)


def _ints_input_or_attr(node: ir.Node, index: int, attr: str) -> list[int] | None:
    """An int list given as input ``index`` (newer opsets) or attribute ``attr`` (older)."""
    if attr in node.attributes:
        return [int(x) for x in editing.attribute(node, attr)]
    if len(node.inputs) > index and node.inputs[index] is not None:
        return editing.const_ints(node.inputs[index])
    return None


def _same_dtype(node: ir.Node) -> bool:
    source, result = node.inputs[0], node.outputs[0]
    return source is not None and source.dtype is not None and source.dtype == result.dtype


def _cast(node: ir.Node, opset: int) -> bool:
    source = node.inputs[0]
    return (
        source is not None
        and source.dtype is not None
        and (int(source.dtype) == editing.attribute(node, "to"))
    )


Dim = int | ir.SymbolicDim


@dataclass(frozen=True)
class _Read:
    """A symbolic dim read by Shape: dim ``axis`` of ``value``."""

    value: ir.Value
    axis: int


Entry = int | _Read


def _shape_value(value: ir.Value | None, depth: int = 0) -> list[Entry] | None:
    """A 1-D shape tensor's entries: constants, and dims read by Shape (through Concat)."""
    ints = editing.const_ints(value)
    if ints is not None:
        return list(ints)
    producer = value.producer() if value is not None else None
    if producer is None or depth > 4:
        return None
    if editing.is_op(producer, "Shape"):
        source = producer.inputs[0]
        dims = _dims(source)
        if source is None or dims is None:
            return None
        rank = len(dims)
        start = editing.attribute(producer, "start", 0)
        end = editing.attribute(producer, "end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return [
            dims[axis] if isinstance(dims[axis], int) else _Read(source, axis)
            for axis in range(start, end)
        ]
    if editing.is_op(producer, "Concat"):
        parts = [_shape_value(v, depth + 1) for v in producer.inputs]
        if any(part is None for part in parts):
            return None
        return [entry for part in parts for entry in part]  # type: ignore[union-attr]
    return None


def _same_dim(
    value: ir.Value, axis: int, other: ir.Value, other_axis: int, derived: DerivedDims
) -> bool:
    """Whether dim ``axis`` of ``value`` is dim ``other_axis`` of ``other``: the same dim of
    one tensor, equal ints, or one input symbol where inference derives it on both.

    Like onnxscript's folder (and shape inference), this trusts that dims with the same
    symbolic name are equal at run time, as the model's declared input shapes promise; but
    only names inference derives from the inputs (:class:`DerivedDims`), not a value_info's
    word: one that calls a dim S where it is T passes the two-shape check (S = T there).
    """
    if value is other and axis == other_axis:
        return True
    dim, want = _dims(value)[axis], _dims(other)[other_axis]  # type: ignore[index]
    if isinstance(dim, int) or isinstance(want, int):
        return isinstance(dim, int) and isinstance(want, int) and dim == want
    return derived.same(value, axis, other, other_axis)


def _reshape(node: ir.Node, derived: DerivedDims) -> bool:
    source = node.inputs[0]
    dims = _dims(source)
    target = _shape_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if source is None or dims is None or target is None or len(target) != len(dims):
        return False
    allowzero = editing.attribute(node, "allowzero", 0)
    minus_one = 0
    for axis, (dim, want) in enumerate(zip(dims, target, strict=True)):
        if want == -1:
            minus_one += 1  # the single -1 takes the only dim left: dims match elsewhere
        elif want == 0 and not allowzero:
            continue  # copies the input dim
        elif isinstance(want, _Read):
            if not _same_dim(source, axis, want.value, want.axis, derived):
                return False
        elif not (isinstance(dim, int) and dim == want):
            return False
    return minus_one <= 1


def _transpose(node: ir.Node, opset: int) -> bool:
    perm = editing.attribute(node, "perm")
    if perm is None:
        dims = _dims(node.inputs[0])
        return dims is not None and len(dims) <= 1  # default perm reverses the axes
    return list(perm) == list(range(len(perm)))


def _expand(node: ir.Node, opset: int) -> bool:
    dims = _dims(node.inputs[0])
    target = editing.const_ints(node.inputs[1])
    if dims is None or target is None or len(target) > len(dims):
        return False
    # Broadcasting leaves the input shape alone when each target dim is 1 or equals it.
    for dim, want in zip(dims[len(dims) - len(target) :], target, strict=True):
        if want != 1 and not (isinstance(dim, int) and dim == want):
            return False
    return True


def _pad(node: ir.Node, opset: int) -> bool:
    pads = _ints_input_or_attr(node, 1, "pads")
    return pads is not None and all(p == 0 for p in pads)


def _slice(node: ir.Node, opset: int) -> bool:
    dims = _dims(node.inputs[0])
    if dims is None:
        return False
    if opset < 10:
        starts = editing.attribute(node, "starts")
        ends = editing.attribute(node, "ends")
        axes = editing.attribute(node, "axes")
        steps = None
    else:
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        starts, ends = editing.const_ints(inputs[1]), editing.const_ints(inputs[2])
        axes = editing.const_ints(inputs[3]) if inputs[3] is not None else None
        steps = editing.const_ints(inputs[4]) if inputs[4] is not None else None
        if (inputs[3] is not None and axes is None) or (inputs[4] is not None and steps is None):
            return False
    if starts is None or ends is None:
        return False
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = dims[axis]
        if step != 1:
            return False
        known = isinstance(dim, int)
        if not (start == 0 or (known and start <= -dim)):
            return False
        if not (end >= _HUGE or (known and end >= dim)):
            return False
    return True


def _flatten(node: ir.Node, opset: int) -> bool:
    dims = _dims(node.inputs[0])
    if dims is None:
        return False
    axis = editing.attribute(node, "axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    if len(dims) == 2 and axis == 1:
        return True
    if not all(isinstance(d, int) for d in dims):
        return False
    flat = (int(np.prod(dims[:axis])), int(np.prod(dims[axis:])))
    return tuple(dims) == flat


def _one_output(node: ir.Node, opset: int) -> bool:
    return len(node.outputs) == 1


def _concat(node: ir.Node, opset: int) -> bool:
    return len(node.inputs) == 1


_CHECKS: dict[str, Check] = {
    "Cast": _cast,
    "Transpose": _transpose,
    "Expand": _expand,
    "Pad": _pad,
    "Slice": _slice,
    "Split": _one_output,
    "Concat": _concat,
    "Flatten": _flatten,
}

# op → (neutral element, may the constant be the first operand)
_NEUTRAL = {
    "Add": (0, True),
    "Sub": (0, False),
    "Mul": (1, True),
    "Div": (1, False),
    "And": (True, True),
    "Or": (False, True),
}


def _neutral_operand(node: ir.Node) -> int | None:
    """Index of the input passed through when the other is a neutral constant, or None."""
    if len(node.inputs) != 2:
        return None  # malformed (e.g. an operand dropped by an empty name): leave it to ORT
    neutral, commutes = _NEUTRAL[node.op_type]
    candidates = [(1, 0)] + ([(0, 1)] if commutes else [])
    for const_index, kept_index in candidates:
        array = editing.constant_array(node.inputs[const_index], max_bytes=1 << 16)
        kept = node.inputs[kept_index]
        if array is None or kept is None or not np.all(array == neutral):
            continue
        dims = _dims(kept)
        if dims is None or kept.dtype != node.outputs[0].dtype or array.ndim > len(dims):
            continue
        if not _keeps_signed_zero(node.op_type, array, kept):
            continue
        # The constant must not broadcast the kept input to a larger shape.
        tail = dims[len(dims) - array.ndim :]
        pairs = zip(array.shape, tail, strict=True)
        if all(c == 1 or (isinstance(d, int) and d == c) for c, d in pairs):
            return kept_index
    return None


def _keeps_signed_zero(op: str, zero: np.ndarray, kept: ir.Value) -> bool:
    """Whether adding (subtracting) the zeros ``zero`` gives back ``x = kept`` bit for bit.

    IEEE: -0.0 + +0.0 = +0.0, so ``x + 0.0`` turns a -0.0 into +0.0 (``1 / x`` then flips
    from -inf to +inf); ``x + -0.0`` and ``x - +0.0`` give x for every x. So Add needs all
    zeros negative and Sub all positive, unless x is never -0.0. Mul and Div by 1 are exact.
    """
    if op not in ("Add", "Sub") or zero.dtype.kind in "iub":
        return True
    negative = np.signbit(zero.astype(np.float64))
    exact = bool(np.all(negative)) if op == "Add" else not bool(np.any(negative))
    return exact or _never_negative_zero(kept)


# Ops whose float output is never -0.0 whatever their input: |x| clears the sign bit, and
# ONNX Runtime's MatMul/Gemm/Conv (MLAS) accumulate from +0.0, so even a sum of -0.0
# products comes out +0.0 (measured: all -0.0 inputs or weights, K 1 to 64, batched,
# grouped, 1x1). ONNX leaves where the sum starts open; an exporter's zero bias after these
# is the common case (freshly initialised transformers), and keeping it costs a node each.
_NO_NEGATIVE_ZERO = frozenset(("Abs", "MatMul", "Gemm", "Conv"))


def _never_negative_zero(value: ir.Value) -> bool:
    """Whether ``value`` provably holds no -0.0: not a float, |x|, a MatMul/Gemm/Conv sum (as
    ONNX Runtime computes it), or a float Cast of integers or booleans (which have no signed
    zero). Anything else may hold one."""
    if value.dtype is not None and not value.dtype.is_floating_point():
        return True
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return False
    if producer.op_type in _NO_NEGATIVE_ZERO:
        return True
    source = producer.inputs[0] if producer.inputs else None
    return (
        producer.op_type == "Cast"
        and source is not None
        and source.dtype is not None
        and not source.dtype.is_floating_point()
    )


def _where_branch(node: ir.Node, derived: DerivedDims) -> int | None:
    """Index of the branch a Where with a constant, uniform condition passes through (1 when
    all true, 2 when all false), or None; only when neither the condition nor the other
    branch broadcasts it to a larger shape (the TorchScript ``expand`` guard
    ``Where(False, 1, shape)`` once its Equal is folded)."""
    if len(node.inputs) != 3 or any(v is None for v in node.inputs):
        return None
    cond = editing.constant_array(node.inputs[0], max_bytes=1 << 16)
    if cond is None or cond.dtype != np.bool_ or cond.size == 0:
        return None
    if not cond.all() and cond.any():
        return None
    kept = 1 if cond.all() else 2
    chosen = node.inputs[kept]
    dims = _dims(chosen)
    if dims is None or chosen.dtype != node.outputs[0].dtype:
        return None
    for other in (node.inputs[0], node.inputs[3 - kept]):
        shape = _dims(other)
        if shape is None or len(shape) > len(dims):
            return None
        offset = len(dims) - len(shape)
        for axis, dim in enumerate(shape):
            if dim != 1 and not _same_dim(other, axis, chosen, offset + axis, derived):
                return None
    return kept


@register
class NoopOpsPass(GraphPass):
    """Remove ops provably returning their input (Cast/Reshape/Transpose…, x+0, x*1); else keep.

    Covered: same-dtype Cast; Reshape/Expand/Flatten to the input's own shape; identity-perm
    Transpose; all-zero Pad; whole-range Slice; one-way Split and Concat; Add of -0.0 (of
    +0.0 only to what cannot be -0.0), Sub of +0.0, Mul/Div by 1 and And with true / Or with
    false whose constant does not broadcast the other operand; Where with an all-true
    (all-false) constant condition that does not broadcast the chosen branch.
    """

    name = "noop-ops"
    ops = frozenset((*_CHECKS, "Reshape", *_NEUTRAL, "Where"))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        opset = editing.opset_version(model)
        # A no-op judged by a stale declared shape is a no-op at the stale size only.
        reconcile_shapes(model)
        derived = DerivedDims(model)
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, tuple(self.ops)) or not node.inputs:
                continue
            if node.op_type == "Where":
                branch = _where_branch(node, derived)
                if branch is not None and editing.bypass(node, branch):
                    hits += 1
                continue
            if node.op_type in _NEUTRAL:
                kept = _neutral_operand(node)
                if kept is not None and editing.bypass(node, kept):
                    hits += 1
                continue
            if node.inputs[0] is None or len(node.outputs) != 1:
                continue
            typed = node.op_type != "Cast" and node.outputs[0].dtype is not None
            if typed and not _same_dtype(node):
                continue
            if node.op_type == "Reshape":
                removable = _reshape(node, derived)
            else:
                removable = _CHECKS[node.op_type](node, opset)
            if removable and editing.bypass(node):
                hits += 1
        return hits
