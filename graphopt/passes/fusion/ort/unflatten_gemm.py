"""Reshape(x → 2-D) → Gemm → Reshape(back) → one MatMul on x (+ a bias Add).

GPT-2's Conv1D exports every projection as ``Reshape(x, [-1, K])`` → ``Gemm`` → ``Reshape``
to ``(batch, seq, N)``, the TorchScript export with the second Reshape's target computed at
run time from ``Shape``/``Gather``/``Unsqueeze``/``Concat`` of an earlier value. ORT runs a
MatMul with a 3-D first input and a constant 2-D weight as the same single MLAS GEMM (M =
batch·seq), so the two Reshapes and the target arithmetic are pure overhead: after the other
``--target ort`` passes they are 15 of gpt2_tiny's 43 nodes and 64 of gpt2_tiny_ts's 99 (ORT
CPU, 1 thread, sequence 128: ~1-3 % faster, 1.11-1.12x → 1.12-1.14x over the original).

Exact: a Reshape keeps row-major order, so a 2-D view (M, K) of an x (..., K) is the
flattening of x's leading axes, and the Gemm's rows are x's rows in that order. The Reshape
back yields MatMul(x, W) exactly when its leading dims equal x's: the one fact to prove. It is
proven from dim tokens (:func:`_dim`): ints and names from ONNX's shape inference, plus, for
TorchScript's run-time targets (``Concat`` of ``Gather(Shape(v), i)``), the dims they copy;
and the output shape of the contrib ``Attention`` (``(batch, seq, ·)`` of its input), which
ONNX's inference does not know.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt import editing
from graphopt.passes.fusion.ort._base import MS_DOMAIN
from graphopt.registry import GraphPass, Stage, register


def _dims(value: ir.Value | None) -> tuple | None:
    """The value's dims (ints or symbolic names; None for an unnamed dim), or None."""
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value for d in value.shape.dims)


def _shape_entry(piece: ir.Value) -> tuple[ir.Value, int] | None:
    """(w, i) when the 1-element value ``piece`` is dim i of w: [Unsqueeze](Gather(Shape(w), i))."""
    node = piece.producer()
    if node is not None and editing.is_op(node, "Unsqueeze"):
        if editing.const_ints(node.inputs[1] if len(node.inputs) > 1 else None) != [0]:
            return None
        piece = node.inputs[0]
        node = piece.producer() if piece is not None else None
    if node is None or not editing.is_op(node, "Gather") or editing.attribute(node, "axis", 0):
        return None
    index = editing.const_ints(node.inputs[1])
    shape = node.inputs[0].producer() if node.inputs[0] is not None else None
    if index is None or len(index) != 1 or shape is None or not editing.is_op(shape, "Shape"):
        return None
    if editing.attribute(shape, "start", 0) != 0 or editing.attribute(shape, "end") is not None:
        return None
    w = shape.inputs[0]
    rank = w.shape.rank() if w is not None and w.shape is not None else None
    if w is None or rank is None or not 0 <= index[0] < rank:
        return None  # a negative or unknown index: not worth resolving
    return w, index[0]


def _shape_range(piece: ir.Value) -> list[tuple[ir.Value, int]] | None:
    """[(w, i), …] when ``piece`` is a run of w's dims: Shape(w, start, end), or a Slice of
    Shape(w) with constant bounds on axis 0, step 1 (how exports below opset 15 spell it)."""
    node = piece.producer()
    bounds: tuple[int, int | None] = (0, None)
    if node is not None and editing.is_op(node, "Slice"):
        bounds_read = _slice_bounds(node)
        if bounds_read is None or node.inputs[0] is None:
            return None
        bounds, node = bounds_read, node.inputs[0].producer()
    if node is None or not editing.is_op(node, "Shape") or node.inputs[0] is None:
        return None
    w = node.inputs[0]
    if w.shape is None:
        return None
    # Shape's start/end and Slice's bounds both clamp as Python's slicing does (step 1).
    axes = list(range(w.shape.rank()))
    axes = axes[editing.attribute(node, "start", 0) : editing.attribute(node, "end")]
    return [(w, i) for i in axes[bounds[0] : bounds[1]]]


def _slice_bounds(node: ir.Node) -> tuple[int, int] | None:
    """(start, end) of a Slice of a 1-D value on axis 0 with step 1, bounds constant."""
    if len(node.inputs) == 1:  # opset < 10: bounds are attributes
        starts, ends = editing.attribute(node, "starts"), editing.attribute(node, "ends")
        axes, steps = editing.attribute(node, "axes", [0]), [1]
    else:
        given = [*node.inputs[1:], None, None, None]
        starts, ends = editing.const_ints(given[0]), editing.const_ints(given[1])
        axes = editing.const_ints(given[2]) if given[2] is not None else [0]
        steps = editing.const_ints(given[3]) if given[3] is not None else [1]
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if list(axes or ()) not in ([0], [-1]) or steps != [1]:  # on a 1-D value -1 is axis 0
        return None
    return starts[0], ends[0]


def _dim(value: ir.Value, axis: int, depth: int = 8) -> set[object]:
    """Tokens for dim ``axis`` of ``value``: dims sharing a token are provably equal.

    An int, a named symbolic dim, the (value, axis) itself, and, for a Reshape whose target
    is a Concat of single entries, the tokens of its entry at ``axis``: a constant, dim i of
    the Reshape input (entry 0), or dim i of another value read by Shape/Gather (TorchScript's
    run-time targets, which ONNX's inference leaves as fresh unknown dims).
    """
    # The same axis of the same value is the same dim, whatever else is unknown about it.
    tokens: set[object] = {("value", id(value), axis)}
    dims = value.shape.dims if value.shape is not None else None
    if dims is not None and axis < len(dims):
        dim = dims[axis]
        if isinstance(dim, int):
            tokens.add(dim)
        elif dim.value is not None:
            # A name ONNX's inference gave (or an input's): the same name is the same dim;
            # its "unk__N" names are fresh per unknown dim and only copied by propagation.
            tokens.add(("sym", dim.value))
    node = value.producer()
    if depth == 0 or node is None or not editing.is_op(node, "Reshape"):
        return tokens
    if editing.attribute(node, "allowzero", 0) or node.inputs[1] is None:
        return tokens
    entries = _target_entries(node.inputs[1])
    if entries is None or axis >= len(entries):
        return tokens
    entry = entries[axis]
    if isinstance(entry, tuple):
        tokens |= _dim(entry[0], entry[1], depth - 1)
    elif entry == 0 and node.inputs[0] is not None:
        tokens |= _dim(node.inputs[0], axis, depth - 1)  # 0 copies the input's dim
    elif entry > 0:
        tokens.add(entry)
    return tokens


def _target_entries(target: ir.Value) -> list[int | tuple[ir.Value, int]] | None:
    """A Reshape target's entries: ints, or (w, i) for dim i of w; None if not that simple."""
    constant = editing.const_ints(target)
    if constant is not None:
        return list(constant)
    concat = target.producer()
    if concat is None or not editing.is_op(concat, "Concat"):
        return None
    # Each piece must be exactly one entry, so that piece ``axis`` is target entry ``axis``.
    entries: list[int | tuple[ir.Value, int]] = []
    for piece in concat.inputs:
        if piece is None:
            return None
        constant = editing.const_ints(piece)
        if constant is not None:
            if len(constant) != 1:
                return None
            entries.append(constant[0])
        elif (source := _shape_entry(piece)) is not None:
            entries.append(source)
        elif (run := _shape_range(piece)) is not None:
            entries += run
        else:
            return None
    return entries


def _same_leading(x: ir.Value, y: ir.Value, rank: int) -> bool:
    """Dims 0 … rank-2 of x and y are provably equal."""
    return all(_dim(x, i) & _dim(y, i) for i in range(rank - 1))


def _annotate_attention_outputs(graph: ir.Graph) -> list[tuple[ir.Value, ir.TypeProtocol | None]]:
    """Give unshaped contrib Attention outputs the shape (batch, seq, ?) of their input.

    ORT's Attention output is (batch, sequence, v_hidden) for a (batch, sequence, hidden)
    input; with that, ONNX's inference can follow the reshapes after it. Returns the values
    annotated with their former types, so that the pass can take the annotation back off.
    """
    annotated = []
    for node in graph:
        if node.domain != MS_DOMAIN or node.op_type != "Attention":
            continue
        out, x = node.outputs[0], node.inputs[0]
        if out.shape is not None or x is None or x.shape is None or x.shape.rank() != 3:
            continue
        sizes = editing.attribute(node, "qkv_hidden_sizes")
        bias = editing.constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if sizes is not None and len(sizes) == 3:
            width = int(sizes[2])
        elif bias is not None and bias.ndim == 1 and bias.shape[0] % 3 == 0:
            width = bias.shape[0] // 3  # Q, K and V of equal width
        else:
            continue
        annotated.append((out, out.type))
        out.shape = ir.Shape([x.shape.dims[0], x.shape.dims[1], width])
        if out.type is None and x.type is not None:
            out.type = x.type  # ONNX's inference skips a value with a shape but no type
    return annotated


def _source(start: ir.Value | None, out: ir.Value, rank: int, k: int) -> ir.Value | None:
    """The earliest value x of the Reshape chain ending in ``start`` that the Gemm reads flat.

    x (..., K) viewed as (M, K) feeds the Gemm, and the result is viewed back as ``out``.
    MatMul(x, W) is ``out`` when x has ``out``'s rank and leading dims. x's last dim need not
    be known: with those leading dims, whose product is M, element counts force it to be K
    (Reshapes keep the count and the row-major order, so every value of the chain holds the
    same data). TorchScript exports split heads and merge them back in such chains.
    """
    found, current = None, start
    for _ in range(8):
        if current is None:
            break
        dims = _dims(current)
        if dims is not None and len(dims) == rank:
            last_ok = not isinstance(dims[-1], int) or dims[-1] == k
            if last_ok and _same_leading(current, out, len(dims)):
                found = current
        producer = current.producer()
        if producer is None or not editing.is_op(producer, "Reshape"):
            break
        current = producer.inputs[0]
    return found


def _out_dims(back: ir.Node) -> tuple | None:
    """The Reshape's output dims; from its target when inference left them unknown (ONNX's
    Reshape-13 inference ignores a target computed from Shape, Reshape-14's reads it): only
    the rank and a constant last dim are taken, the leading dims stay tokens of ``_dim``."""
    found = _dims(back.outputs[0])
    if found is not None or editing.attribute(back, "allowzero", 0):
        return found
    entries = _target_entries(back.inputs[1]) if back.inputs[1] is not None else None
    if entries is None or not isinstance(entries[-1], int) or entries[-1] <= 0:
        return None
    return (*[None] * (len(entries) - 1), entries[-1])


def _live(value: ir.Value, depth: int = 16) -> bool:
    """Some path from ``value`` reaches a graph output (or is too long to follow)."""
    if value.is_graph_output() or depth == 0:
        return True
    return any(_live(out, depth - 1) for user, _ in value.uses() for out in user.outputs)


def _rewrite(graph: ir.Graph, gemm: ir.Node) -> bool:
    if not editing.is_op(gemm, "Gemm") or editing.attribute(gemm, "transA", 0):
        return False
    if editing.attribute(gemm, "alpha", 1.0) != 1.0 or editing.attribute(gemm, "beta", 1.0) != 1.0:
        return False
    flat = gemm.inputs[0].producer() if gemm.inputs[0] is not None else None
    back = editing.single_user(gemm.outputs[0])
    if flat is None or back is None or not editing.is_op(flat, "Reshape"):
        return False
    if not editing.is_op(back, "Reshape") or back.inputs[0] is not gemm.outputs[0]:
        return False
    if not _live(back.outputs[0]):
        return False  # dead (e.g. GPT-2's c_attn once packed into Attention): cleanup's job
    weight = editing.constant_array(gemm.inputs[1])
    if weight is None or weight.ndim != 2:
        return False
    if editing.attribute(gemm, "transB", 0):
        weight = weight.T
    k, n = weight.shape
    flat_dims, out_dims = _dims(flat.outputs[0]), _out_dims(back)
    if flat_dims is None or out_dims is None or len(flat_dims) != 2 or flat_dims[1] != k:
        return False
    if len(out_dims) < 2 or out_dims[-1] != n:
        return False
    x = _source(flat.inputs[0], back.outputs[0], len(out_dims), k)
    if x is None:
        return False
    bias = None
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        bias = editing.constant_array(gemm.inputs[2])
        # Only a per-column bias: a (M, N) or (M, 1) C would need M's rows.
        if bias is None or bias.size != n or (bias.ndim == 2 and bias.shape[0] != 1):
            return False
        bias = bias.reshape(n)
    if editing.attribute(gemm, "transB", 0):
        w_value = editing.add_initializer(
            graph, f"{gemm.name}_weight_t", np.ascontiguousarray(weight)
        )
    else:
        w_value = gemm.inputs[1]
    matmul = ir.node("MatMul", [x, w_value], name=f"{gemm.name}_matmul")
    nodes = [matmul]
    result = matmul.outputs[0]
    if bias is not None:
        b_value = editing.add_initializer(graph, f"{gemm.name}_bias", bias)
        # MatMul then Add: the sum ORT's Gemm forms (A·B accumulated, then + C), same order.
        add = ir.node("Add", [result, b_value], name=f"{gemm.name}_bias_add")
        nodes.append(add)
        result.name = editing.unique_name(graph, f"{gemm.outputs[0].name}_matmul")
        result = add.outputs[0]
    out = back.outputs[0]
    result.name = editing.unique_name(graph, f"{out.name}_matmul")
    result.dtype, result.shape = out.dtype, out.shape
    editing.insert_after(back, nodes)
    if not editing.replace_value(out, result):
        for node in reversed(nodes):
            graph.remove(node, safe=True)
        return False
    # The reshape targets (TorchScript computes them from Shape ops) die with the Reshapes.
    pending = [flat, gemm, back]  # popped from the end: users before their producers
    while pending:
        node = pending.pop()
        if node.graph is None:
            continue  # already removed
        producers = [v.producer() for v in node.inputs if v is not None and v.producer()]
        if editing.remove_if_dead(node):  # removal disconnects the inputs: read them first
            pending += producers
    return True


@register
class OrtUnflattenGemmPass(GraphPass):
    """With --target ort: Reshape(x→2-D)→Gemm→Reshape(back) → MatMul(x, W) (+ bias Add)."""

    name = "ort-unflatten-gemm"
    targets = frozenset(("ort",))
    stage = Stage.FUSION
    handles_subgraphs = False

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        if not any(editing.is_op(node, "Gemm") for node in graph):
            return 0
        annotated = _annotate_attention_outputs(graph)
        # Inference only annotates values (no node changes); without shapes nothing is proven.
        with contextlib.suppress(Exception):
            common_passes.ShapeInferencePass()(model)
        hits = sum(_rewrite(graph, node) for node in list(graph))
        for value, former_type in annotated:
            # Only a guide for inference: the Attention node itself is unchanged.
            value.shape, value.type = None, former_type
        return hits
