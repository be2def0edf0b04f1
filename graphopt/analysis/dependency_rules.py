"""Per-op channel coupling rules: one table, one small function per op family.

A rule answers one question: *node* touches the channel dimension ``(value, axis)``; which
other ``(value, axis)`` dimensions of the same node must lose the same channels, and how do
their indices correspond? It returns a list of :class:`Coupling` (index pairs) or a
:class:`Blocked` with the reason pruning that dimension is not safe at this node.

Ops without a rule block (:func:`couple`): an unknown op is never treated as element-wise
pass-through, which is how other pruners silently build wrong groups. The ops that pass
channels through one to one are listed here (:data:`CHANNELWISE`), not borrowed from the
FLOPs table: an op counted "per element" there is not thereby safe to prune through.

Rules read the node's opset (:meth:`Context.opset`) where an attribute's default or meaning
changed: Softmax/LogSoftmax/Hardmax before 13 normalize over every axis from ``axis``
(default 1) on; Concat's axis defaults to 1 before 4; Split states its sizes as an attribute
before 13 (and splits equally without one); Slice's bounds and Reshape's target are
attributes before 10 and 5; elementwise ops broadcast at an ``axis`` before 7.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.analysis.channel_shapes import Context
from graphopt.analysis.coupling import (  # re-exported: the rules' vocabulary
    Blocked,
    Coupling,
    Result,
    Unknown,
    identity,
)
from graphopt.analysis.coupling import norm_axis as _norm
from graphopt.analysis.shape_entries import vector_length
from graphopt.analysis.shape_rules import expand_rule, reshape_rule, shape_rule
from graphopt.editing import attribute


def _operands(node: ir.Node) -> list[ir.Value]:
    return [v for v in (*node.inputs, *node.outputs) if v is not None]


def _couple_classes(
    ctx: Context, value: ir.Value, axis: int, classes: list[list[tuple[ir.Value | None, int]]]
) -> Result:
    """Identity coupling inside the axis class holding (value, axis); blocked if none does."""
    n = ctx.shape(value)[axis]
    for cls in classes:
        members = [(v, _norm(a, len(ctx.shape(v)))) for v, a in cls if v is not None]
        if (value, axis) not in members:
            continue
        out: list[Coupling] = []
        for v, a in members:
            if (v, a) == (value, axis):
                continue
            size = ctx.shape(v)[a]
            producer = v.producer()
            if not isinstance(size, int) and producer is not None and value in producer.inputs:
                size = n  # an output axis broadcast from an input that has n channels
            if size != n:
                if size == 1:
                    continue  # broadcast: nothing to remove there
                if not isinstance(size, int):
                    return Unknown(f"{v.name}: size of the coupled axis is unknown")
                return Blocked(f"size mismatch {n} vs {size} on coupled axis")
            out.append(identity(v, a, n))
        return out
    return Blocked("axis is not a channel axis of this op")


def _elementwise(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    out = node.outputs[0]
    data = [v for v in node.inputs if v is not None]
    if ctx.opset(node) < 7 and any(ctx.shape(v) != ctx.shape(out) for v in data):
        # Before opset 7, `broadcast=1` aligns the second operand with the first starting
        # at `axis` (a [C] bias meets axis 1), not at the trailing axes as below.
        return Blocked(f"{node.op_type} with legacy broadcasting (opset < 7)")
    if len(data) == 1 or node.op_type in ("Clip", "Dropout", "CastLike"):  # unary-shaped
        if value is not node.inputs[0] and value not in node.outputs:
            return Blocked(f"{node.op_type}: channel axis on a bound input")
        if node.op_type in NOT_FINITE_AT_ZERO:
            return Blocked(f"{node.op_type} is not finite at 0 (a zeroed channel turns inf/NaN)")
        n = ctx.shape(value)[axis]
        return [identity(v, axis, n) for v in (node.inputs[0], *node.outputs) if v is not value]
    rank = len(ctx.shape(out))
    o = axis + rank - len(ctx.shape(value))
    cls: list[tuple[ir.Value | None, int]] = []
    for v in _operands(node):
        a = o - (rank - len(ctx.shape(v)))
        if a >= 0:
            cls.append((v, a))
    if node.op_type in ("Div", "Pow", "Mod") and len(node.inputs) > 1:
        second = node.inputs[1]
        a = o - (rank - len(ctx.shape(second)))
        per_channel = a >= 0 and ctx.shape(second)[a] != 1
        if per_channel and (second.const_value is not None or second.producer() is None):
            return Blocked(f"{node.op_type} by a per-channel parameter (zeroing is not invariant)")
        if per_channel and node.op_type != "Pow" and not _never_zero(second):
            # x / c at a zeroed channel is x / 0: inf (NaN for 0 / 0), and inf times the
            # zeroed weight after it is NaN, where the removed channel is simply gone.
            return Blocked(f"{node.op_type} by the channel (a zeroed channel divides by 0)")
    if node.op_type == "Pow" and _may_be_negative(node.inputs[1]):
        base = node.inputs[0]
        a = o - (rank - len(ctx.shape(base)))
        if a >= 0 and ctx.shape(base)[a] != 1 and not _never_zero(base):
            return Blocked("Pow of the channel to a power that may be negative (0 ** -k = inf)")
    return _couple_classes(ctx, value, axis, [cls])


# Unary ops whose value at 0 is not finite: 1/0, log 0, acosh 0 (a zeroed channel would
# carry inf or NaN to the zeroed weights after it, where 0 · inf is NaN).
NOT_FINITE_AT_ZERO = frozenset(("Reciprocal", "Log", "Acosh"))


def _never_zero(value: ir.Value | None) -> bool:
    """Whether a divisor is non-zero at a zeroed channel: ``exp(·)``, or the ``· + eps`` (eps
    a positive constant) of a decomposed normalization, under Sqrt/Abs. Anything else may
    be 0 there."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return False
    if producer.op_type == "Exp":
        return True
    if producer.op_type in ("Sqrt", "Abs"):
        return _never_zero(producer.inputs[0])
    if producer.op_type == "Add":
        for operand in producer.inputs:
            const = ir.convenience.get_const_tensor(operand) if operand is not None else None
            if const is not None and const.dtype.is_floating_point():
                array = const.numpy()
                if array.size and bool(np.all(array > 0)):
                    return True
    return False


def _may_be_negative(exponent: ir.Value | None) -> bool:
    """Whether a Pow exponent may be negative (only a constant one is known not to be)."""
    const = ir.convenience.get_const_tensor(exponent) if exponent is not None else None
    return const is None or bool(np.any(const.numpy() < 0))


def _batchnorm(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    if len([o for o in node.outputs if o is not None and o.uses()]) > 1:
        return Blocked("BatchNormalization in training mode")
    cls = [(node.inputs[0], 1), (node.outputs[0], 1)] + [(v, 0) for v in node.inputs[1:]]
    if node.op_type == "BatchNormalization" or node.op_type == "InstanceNormalization":
        return _couple_classes(ctx, value, axis, [cls])
    raise AssertionError(node.op_type)


def _layernorm(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    rank = len(ctx.shape(node.inputs[0]))
    first = _norm(attribute(node, "axis", -1), rank)
    if value in node.inputs[1:] or axis >= first:
        return Blocked(f"{node.op_type} normalizes over this axis (channels are not independent)")
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        return Blocked(f"{node.op_type} mean/inv-std outputs are used")
    return _couple_classes(ctx, value, axis, [[(node.inputs[0], axis), (node.outputs[0], axis)]])


def _groupnorm(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    """Whole normalization groups only: channels of a group share their statistics."""
    x, y = node.inputs[0], node.outputs[0]
    c, groups = ctx.shape(x)[1], attribute(node, "num_groups")
    if not isinstance(c, int) or not groups or c % groups:
        return Blocked("GroupNormalization: channel count unknown")
    per = c // groups
    params = [p for p in node.inputs[1:] if p is not None]
    per_channel = [(x, 1), (y, 1)] + [(p, 0) for p in params if ctx.shape(p)[0] == c]
    per_group = [(p, 0) for p in params if ctx.shape(p)[0] == groups != c]
    channels = np.arange(c, dtype=np.int64)
    if (value, axis) in per_group:
        return [Coupling(x, 1, channels // per, channels)]
    if (value, axis) not in per_channel:
        return Blocked("GroupNormalization normalizes over this axis")
    out = [identity(v, a, c) for v, a in per_channel if (v, a) != (value, axis)]
    out.append(Coupling(value, axis, channels, (channels // per) * per))  # one group, one unit
    out += [Coupling(p, 0, channels, channels // per) for p, _ in per_group]
    return out


def _conv(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    groups = attribute(node, "group", 1)
    transpose = node.op_type == "ConvTranspose"
    if transpose and attribute(node, "output_shape") is not None:
        return Blocked("ConvTranspose with output_shape")
    if not _is_param(w):
        return Blocked(f"{node.op_type} weight is not a constant")
    w_in, w_out = (0, 1) if transpose else (1, 0)
    if groups == 1:
        classes = [[(x, 1), (w, w_in)], [(y, 1), (w, w_out), (b, 0)]]
        return _couple_classes(ctx, value, axis, classes)
    # Grouped (depthwise included): only whole groups can go, so that every group keeps the
    # same number of channels; input channels of group g couple with its output channels.
    c_in, c_out = ctx.shape(x)[1], ctx.shape(y)[1]
    if not isinstance(c_in, int) or not isinstance(c_out, int):
        return Blocked(f"grouped {node.op_type}: channel counts unknown")
    in_per, out_per = c_in // groups, c_out // groups
    in_dims = [(x, 1)] + ([(w, 0)] if transpose else [])
    out_dims = [(y, 1)] + ([] if transpose else [(w, 0)]) + ([(b, 0)] if b is not None else [])
    if (value, axis) in in_dims:
        out = _couple_classes(ctx, value, axis, [in_dims])
        if isinstance(out, Blocked):
            return out
        src = np.repeat(np.arange(c_in, dtype=np.int64), out_per)
        dst = (src // in_per) * out_per + np.tile(np.arange(out_per), c_in)
        out.append(Coupling(y, 1, src, dst))
        return out
    if (value, axis) in out_dims:
        out = _couple_classes(ctx, value, axis, [out_dims])
        if isinstance(out, Blocked):
            return out
        dst = np.arange(c_out, dtype=np.int64)
        src_in = (dst // out_per)[:, None] * in_per + np.arange(in_per)[None, :]
        out.append(Coupling(x, 1, np.repeat(dst, in_per), src_in.reshape(-1)))
        return out
    return Blocked(f"grouped {node.op_type}: axis {axis} of {value.name} is not a channel axis")


def _gemm(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    ta, tb = attribute(node, "transA", 0), attribute(node, "transB", 0)
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    classes = [[(a, a_k), (b, b_k)], [(a, a_m), (y, 0)], [(b, b_n), (y, 1)]]
    if c is not None:
        c_rank = len(ctx.shape(c))
        classes[2].append((c, c_rank - 1))
        if c_rank == 2:
            classes[1].append((c, 0))
    return _couple_classes(ctx, value, axis, classes)


def _matmul(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    ra, rb, ry = len(ctx.shape(a)), len(ctx.shape(b)), len(ctx.shape(y))
    if ra < 2 or rb < 2:
        return Blocked("MatMul with a 1-D operand")
    classes = [[(a, ra - 1), (b, rb - 2)], [(a, ra - 2), (y, ry - 2)], [(b, rb - 1), (y, ry - 1)]]
    for i in range(ry - 2):
        cls = [(y, i)]
        for v, r in ((a, ra), (b, rb)):
            if i - (ry - r) >= 0:
                cls.append((v, i - (ry - r)))
        classes.append(cls)
    return _couple_classes(ctx, value, axis, classes)


def _same_axis(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    """Data input 0 and output 0 share the axis (other inputs are attributes-like)."""
    if value is not node.inputs[0] and value is not node.outputs[0]:
        return Blocked(f"{node.op_type}: channel axis on a non-data input")
    n = ctx.shape(value)[axis]
    other = node.outputs[0] if value is node.inputs[0] else node.inputs[0]
    return [identity(other, axis, n)]


def _pool(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    if axis != 1:
        return Blocked(f"{node.op_type} over this axis")
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        return Blocked("MaxPool indices output is used")
    return _same_axis(ctx, node, value, axis)


def _same_size_axis(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    """Pad / Resize / Tile / Upsample: pass-through when the op leaves this axis alone."""
    if value is not node.inputs[0] and value is not node.outputs[0]:
        return Blocked(f"{node.op_type}: channel axis on a non-data input")
    if ctx.shape(node.inputs[0])[axis] != ctx.shape(node.outputs[0])[axis]:
        return Blocked(f"{node.op_type} changes the size of this axis")
    if node.op_type == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None:
        return Blocked("Resize states its output sizes (channel count included)")
    if node.op_type == "Pad":
        pads = ctx.ints(node.inputs[1]) if len(node.inputs) > 1 else attribute(node, "pads")
        axes_in = node.inputs[3] if len(node.inputs) > 3 else None
        if pads is None or axes_in is not None:
            return Blocked("Pad with run-time pads or axes")
        rank = len(ctx.shape(node.inputs[0]))
        if pads[axis] or pads[axis + rank]:
            return Blocked("Pad pads the channel axis")
    return _same_axis(ctx, node, value, axis)


def _reduce(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    x, y = node.inputs[0], node.outputs[0]
    if value is not x and value is not y:
        return Blocked(f"{node.op_type}: channel axis on the axes input")
    rank = len(ctx.shape(x))
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [attribute(node, "axis", 0)]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = ctx.ints(node.inputs[1])
        if axes is None:
            return Blocked(f"{node.op_type} with run-time axes")
    else:
        axes = attribute(node, "axes")
    if not axes:
        if attribute(node, "noop_with_empty_axes", 0):
            return _same_axis(ctx, node, value, axis)
        axes = list(range(rank))
    axes = sorted(_norm(a, rank) for a in axes)
    keep = attribute(node, "keepdims", 1)
    kept = list(range(rank)) if keep else [a for a in range(rank) if a not in axes]
    if value is x:
        if axis in axes:
            return Blocked(f"{node.op_type} reduces over the channel axis")
        return [identity(y, kept.index(axis), ctx.shape(x)[axis])]
    return [identity(x, kept[axis], ctx.shape(y)[axis])]


def _softmax(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    rank = len(ctx.shape(node.inputs[0]))
    if ctx.opset(node) < 13:
        # Before opset 13 the input is coerced to 2-D at `axis` (default 1): one
        # normalization over all axes from `axis` to the end, not over `axis` alone.
        first = _norm(attribute(node, "axis", 1), rank)
        if axis >= first:
            return Blocked(
                f"{node.op_type} (opset < 13) normalizes over axes {first}.. "
                "(the channel axis among them)"
            )
        return _same_axis(ctx, node, value, axis)
    along = _norm(attribute(node, "axis", -1), rank)
    if axis == along:
        return Blocked(f"{node.op_type} normalizes over the channel axis")
    return _same_axis(ctx, node, value, axis)


def _transpose(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    rank = len(ctx.shape(node.inputs[0]))
    perm = attribute(node, "perm") or list(reversed(range(rank)))
    n = ctx.shape(value)[axis]
    if value is node.inputs[0]:
        return [identity(node.outputs[0], list(perm).index(axis), n)]
    return [identity(node.inputs[0], perm[axis], n)]


def _concat_like(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    """Concat (inputs → one output) and Split (one input → outputs): offsets on the axis."""
    is_concat = node.op_type == "Concat"
    whole = node.outputs[0] if is_concat else node.inputs[0]
    parts = list(node.inputs) if is_concat else list(node.outputs)
    rank = len(ctx.shape(whole))
    # Concat-1 (opsets 1-3) has an optional axis, default 1; later ones require it.
    default = 1 if is_concat and ctx.opset(node) < 4 else 0
    along = _norm(attribute(node, "axis", default), rank)
    if axis != along:
        members = [(whole, axis)] + [(p, axis) for p in parts if p is not None]
        return _couple_classes(ctx, value, axis, [members])
    if not is_concat and value is not whole and value not in parts:
        return Blocked("Split: channel axis on the split-sizes input")
    if not is_concat and ctx.opset(node) < 13 and "split" not in node.attributes:
        # Unequal parts after removal must be stated; before opset 13 only the `split`
        # attribute can state them, and channel removal writes the sizes input of Split-13.
        return Blocked("Split (opset < 13) into equal parts: no split attribute to rewrite")
    out: list[Coupling] = []
    offset = 0
    for part in parts:
        size = ctx.shape(part)[along]
        if not isinstance(size, int):
            return Blocked(f"{node.op_type}: size of a part is unknown")
        idx = np.arange(size, dtype=np.int64)
        if value is whole:
            out.append(Coupling(part, along, idx + offset, idx))
        elif value is part:
            # A repeated input appears once per position: couple every copy.
            out.append(Coupling(whole, along, idx, idx + offset))
        offset += size
    return out


def _slice(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    if ctx.opset(node) < 10:
        # Slice-1 states starts/ends/axes as attributes; channel removal rewrites (and
        # reads, on any axis) the bound inputs of Slice-10 only.
        return Blocked("Slice (opset < 10) with attribute bounds")
    x, y = node.inputs[0], node.outputs[0]
    if value is not x and value is not y:
        return Blocked("Slice: channel axis on a starts/ends input")
    rank = len(ctx.shape(x))
    starts, ends = ctx.ints(node.inputs[1]), ctx.ints(node.inputs[2])
    axes = ctx.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    steps = ctx.ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    if axes is None and not (len(node.inputs) > 3 and node.inputs[3]):
        axes = list(range(vector_length(ctx, node.inputs[1]) or rank))  # no axes: leading ones
    if axes is not None and axis not in [_norm(a, rank) for a in axes]:
        return _same_axis(ctx, node, value, axis)  # bounds (even run-time ones) elsewhere
    if starts is None or ends is None or axes is None:
        return Blocked("Slice with run-time bounds")
    axes = [_norm(a, rank) for a in axes]
    i = axes.index(axis)
    if steps is not None and steps[i] != 1:
        return Blocked("strided Slice on the channel axis")
    n, size = ctx.shape(x)[axis], ctx.shape(y)[axis]
    if not isinstance(n, int) or not isinstance(size, int):
        return Blocked("Slice: sizes unknown on the channel axis")
    start = slice(starts[i], ends[i]).indices(n)[0]
    idx = np.arange(size, dtype=np.int64)
    if value is x:
        return [Coupling(y, axis, idx + start, idx)]
    return [Coupling(x, axis, idx, idx + start)]


def _gather(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rank = len(ctx.shape(data))
    along = _norm(attribute(node, "axis", 0), rank)
    r_idx = len(ctx.shape(indices))
    if value is indices:
        return Blocked("Gather: channel axis on the indices")
    if value is data:
        if axis == along:
            return Blocked("Gather selects along the channel axis")
        out_axis = axis if axis < along else axis + r_idx - 1
        return [identity(y, out_axis, ctx.shape(data)[axis])]
    if along <= axis < along + r_idx:
        return Blocked("Gather: channel axis comes from the indices")
    in_axis = axis if axis < along else axis - r_idx + 1
    return [identity(data, in_axis, ctx.shape(y)[axis])]


def _reshape(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    if node.op_type == "Reshape" and ctx.opset(node) < 5:
        # Reshape-1 states its target as an attribute; the target rules read input 1.
        return Blocked("Reshape (opset < 5) with a shape attribute")
    return reshape_rule(ctx, node, value, axis)


def _recurrent(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    return Blocked(f"{node.op_type}: recurrent gates are not mapped (not supported)")


Rule = Callable[[Context, ir.Node, ir.Value, int], Result]


def _op_set(names: str) -> frozenset[str]:
    return frozenset(names.split())


# Ops that map channel i of their (broadcast) operands to channel i of the output and mix
# no channels: pruning passes through them (:func:`_elementwise`). This is pruning's own
# list: the FLOPs table's "one FLOP per element" set answers a different question, and an op
# added there for counting must not become a pass-through here by accident.
CHANNELWISE = _op_set(
    """Abs Acos Acosh Add And Asin Asinh Atan Atanh BitShift BitwiseAnd BitwiseNot BitwiseOr
    BitwiseXor Cast CastLike Ceil Celu Clip Cos Cosh Div Dropout Elu Equal Erf Exp Floor Gelu
    Greater GreaterOrEqual HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Less
    LessOrEqual Log Max Mean Min Mish Mod Mul Neg Not Or Pow PRelu Reciprocal Relu Round Selu
    Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Sub Sum Tan Tanh ThresholdedRelu Where
    Xor"""
)


def _each(names: str, rule: Rule) -> dict[str, Rule]:
    return dict.fromkeys(names.split(), rule)


RULES: dict[str, Rule] = {
    **_each(" ".join(sorted(CHANNELWISE)), _elementwise),
    **_each("BatchNormalization InstanceNormalization", _batchnorm),
    **_each("LayerNormalization RMSNormalization SimplifiedLayerNormalization", _layernorm),
    "GroupNormalization": _groupnorm,
    **_each("Conv ConvTranspose", _conv),
    "Gemm": _gemm,
    "MatMul": _matmul,
    **_each("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool", _pool),
    **_each("Pad Resize Upsample Tile", _same_size_axis),
    **_each("Softmax LogSoftmax Hardmax", _softmax),
    "Transpose": _transpose,
    **_each("Concat Split", _concat_like),
    "Slice": _slice,
    **_each("Reshape Flatten Squeeze Unsqueeze", _reshape),
    "Expand": expand_rule,
    "Gather": _gather,
    "Shape": shape_rule,
    **_each("LSTM GRU RNN", _recurrent),
    **_each(
        "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
        "ReduceLogSumExp ReduceSumSquare ArgMax ArgMin",
        _reduce,
    ),
}


def couple(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> Result:
    """Coupled dims of ``node`` for channel dim ``(value, axis)``, or why it is blocked."""
    if node.domain not in ("", "ai.onnx"):
        return Blocked(f"no dependency rule for {node.domain}.{node.op_type}")
    rule = RULES.get(node.op_type)
    if rule is None:
        return Blocked(f"no dependency rule for {node.op_type}")
    # Shapes onnx inference left out are worked out past the op it stopped at (Context).
    unknown = [v for v in _operands(node) if ctx.shape(v) is None]
    if unknown:
        return Blocked(f"{node.op_type}: shapes unknown{_where_stopped(ctx, unknown[0])}")
    return rule(ctx, node, value, axis)


def _where_stopped(ctx: Context, value: ir.Value) -> str:
    """Where shape inference stopped on the way to ``value``, as a message suffix."""
    node = ctx.stopped_at(value)
    if node is None:
        return ""
    op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    return f" (shape inference stops at {op})"


def seeds(ctx: Context, node: ir.Node) -> list[tuple[ir.Value, int]]:
    """Channel dims a parametric node starts the search from (its weights' channel axes)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return []
    if op in ("Conv", "ConvTranspose") and _is_param(node.inputs[1]):
        return [(node.outputs[0], 1), (node.inputs[0], 1)]
    if op == "Gemm" and _is_param(node.inputs[1]):
        return [(node.outputs[0], 1), (node.inputs[0], 0 if attribute(node, "transA", 0) else 1)]
    if op == "MatMul" and any(_is_param(v) for v in node.inputs):
        ra = len(ctx.shape(node.inputs[0]) or ())
        ry = len(ctx.shape(node.outputs[0]) or ())
        return [(node.outputs[0], ry - 1), (node.inputs[0], ra - 1)] if ra >= 2 and ry else []
    if op == "Gather" and _is_param(node.inputs[0]):
        shape = ctx.shape(node.outputs[0])
        return [(node.outputs[0], len(shape) - 1)] if shape else []
    return []


def _is_param(value: ir.Value | None) -> bool:
    if value is None or value.is_graph_input():
        return False
    producer = value.producer()
    return value.const_value is not None or (
        producer is not None and producer.op_type == "Constant"
    )
