"""Shapes past ONNX Runtime's contrib ops, which onnx cannot infer: each gets a stand-in of
standard ops with its output's shape, on a throw-away copy (:func:`shapes_past_contrib_ops`).
graphopt's own sparse ops (domain ``graphopt``, :mod:`graphopt.analysis.sparse_ops`) get one
too: a MatMul by a weight of their ``K`` x ``N``.

:mod:`graphopt.analysis.shapes` calls this where its own inference stops short, and replaces
the contrib ops the same way on the copy where it folds shape arithmetic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.analysis.shapes import is_concrete, onnx_inference, static_shape
from graphopt.analysis.sparse_ops import dense_size, is_sparse_op

MS_DOMAIN = "com.microsoft"
# Contrib ops whose output 0 (and the listed others) has input 0's shape: activations,
# normalizations (SkipLayerNormalization's output 3 is the residual sum, which the next
# block reads), rotary embeddings, QLinear unary ops.
_LIKE_INPUT = {
    (MS_DOMAIN, "FastGelu"): (0,),
    (MS_DOMAIN, "BiasGelu"): (0,),
    (MS_DOMAIN, "Gelu"): (0,),
    (MS_DOMAIN, "QuickGelu"): (0,),
    (MS_DOMAIN, "BiasAdd"): (0,),
    (MS_DOMAIN, "SkipLayerNormalization"): (0, 3),
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): (0, 3),
    (MS_DOMAIN, "SimplifiedLayerNormalization"): (0,),
    # ORT registers it in the default domain, where onnx has no schema for it.
    ("", "SimplifiedLayerNormalization"): (0,),
    (MS_DOMAIN, "RotaryEmbedding"): (0,),
    (MS_DOMAIN, "QLinearSigmoid"): (0,),
    (MS_DOMAIN, "QLinearLeakyRelu"): (0,),
    (MS_DOMAIN, "QLinearSoftmax"): (0,),
}


# The stand-in for "this output has input 0's shape": not Identity, which the shape
# arithmetic folding removes (its output's readers, and name, then pass to input 0, and the
# contrib op's output is no longer there to take a shape from). Abs takes every numeric type.
_SAME_SHAPE = "Abs"


def shapes_past_contrib_ops(clone: ir.Model) -> None:
    """Shapes of what follows ONNX Runtime's contrib ops, which onnx cannot infer.

    Without them every node after the first fused SkipLayerNormalization or Attention had an
    unknown shape, and ``optimize --target ort`` seemed to remove nearly all FLOPs. On a
    throw-away copy each such op gets a stand-in of standard ops whose output has the shape
    the contrib op's has (Abs for an activation or a norm, MatMul for MatMulNBits or a
    packed Attention, ...); one onnx inference then reaches past all of them, and the
    shapes are copied back by value name (the clone keeps its nodes, which FLOPs count).
    """
    copy = clone.clone()
    if replace_contrib_ops(copy.graph):
        onnx_inference(copy)
        copy_shapes(copy, clone)


def replace_contrib_ops(graph: ir.Graph) -> int:
    """Put a stand-in (:func:`_stand_ins`) before each contrib op of ``graph`` (a throw-away
    copy) and let it take over the op's output: its readers and its name. The contrib node
    stays, its output renamed and unread. Returns how many outputs were taken over."""
    replaced = 0
    for node in list(graph):
        for index, nodes in _stand_ins(graph, node).items():
            original = node.outputs[index]
            if not original.name:
                continue  # an omitted optional output: nothing reads it, no name to carry
            graph.insert_before(node, nodes)
            replacement = nodes[-1].outputs[0]
            original.replace_all_uses_with(replacement, replace_graph_outputs=True)
            name = original.name
            original.name = f"{name}__contrib_output"
            replacement.name = name
            replaced += 1
    return replaced


def copy_shapes(source: ir.Model, clone: ir.Model, seen: dict[str, ir.Value] | None = None) -> None:
    """Concrete shapes of ``source`` (a copy) onto the clone's values of the same name that
    have none; with the type where the clone's value has none (a contrib op's output):
    serializing a shape without a type drops it, with a warning. ``seen``: values known
    earlier on the copy by name (:func:`concrete_values`), for those folded away since."""
    known = dict(seen or {})
    known.update(concrete_values(source))
    for node in clone.graph:
        for out in node.outputs:
            found = known.get(out.name) if out.name is not None else None
            if found is None or (out.shape is not None and is_concrete(out.shape)):
                continue
            out.shape = ir.Shape(found.shape)
            if out.type is None:
                out.type = found.type


def concrete_values(model: ir.Model) -> dict[str, ir.Value]:
    """{name: a detached copy (type and shape)} of ``model``'s node outputs of concrete
    shape, and of its initializers: where shape arithmetic was folded, a node output became
    an initializer of the same name (a mask computed from ``Range(sequence)``, folded whole
    before inference ever saw it). A copy, since later rounds edit the model's values."""
    found: dict[str, ir.Value] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if value.name is not None and tensor is not None:
            found[value.name] = ir.Value(
                name=value.name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape)
            )
    for node in model.graph:
        for o in node.outputs:
            if o.name is not None and o.shape is not None and is_concrete(o.shape):
                found[o.name] = ir.Value(name=o.name, type=o.type, shape=ir.Shape(o.shape))
    return found


def _stand_ins(graph: ir.Graph, node: ir.Node) -> dict[int, list[ir.Node]]:
    """{output index: standard nodes, the last producing a value of that output's shape}
    for a contrib op (empty for any other op, or one without a stand-in)."""
    key = (node.domain or "", node.op_type)
    inputs = list(node.inputs)

    def given(index: int) -> ir.Value | None:
        return inputs[index] if index < len(inputs) else None

    # Names of their own: onnx-ir's automatic ``val_N`` can meet a name the model already
    # uses (graph inputs and initializers are not tracked), and inference goes by name.
    names = (f"__stand_in_{id(node):x}_{i}" for i in itertools.count())

    def new(op: str, args: list, **attributes) -> ir.Node:
        output = ir.Value(name=next(names))
        return ir.node(op, args, attributes=attributes, outputs=[output], name=next(names))

    def const(values: list[int]) -> ir.Value:
        made = new("Constant", [], value=ir.tensor(np.array(values, np.int64)))
        chain.append(made)
        return made.outputs[0]

    def fake(shape: tuple[int, ...] | None, like: ir.Value | None) -> ir.Value | None:
        # A graph input of the copy with the given shape: inference reads only its type.
        if shape is None:
            return None
        dtype = like.dtype if like is not None and like.dtype is not None else None
        value = ir.Value(
            name=next(names),
            type=ir.TensorType(dtype or ir.DataType.FLOAT),
            shape=ir.Shape(shape),
        )
        graph.inputs.append(value)
        return value

    chain: list[ir.Node] = []
    op = node.op_type
    x = given(0)
    if x is not None and is_sparse_op(node):
        # graphopt's own sparse ops: A [..., K] @ W [K, N] (+ bias, activation) → [..., N].
        size = dense_size(node)
        if size is None:
            return {}
        source = x if op != "SparseQMatMul" else _cast(chain, new, x)  # u8 A, float out
        chain.append(new("MatMul", [source, fake(size, source)]))
        return {0: chain}
    if x is None or (node.domain or "") not in ("", MS_DOMAIN):
        return {}
    if key in _LIKE_INPUT:
        return {i: [new(_SAME_SHAPE, [x])] for i in _LIKE_INPUT[key] if i < len(node.outputs)}
    if node.domain != MS_DOMAIN:
        return {}
    if op in ("MultiHeadAttention", "GroupQueryAttention") and given(1) is not None:
        # Output (B, S, heads·head size): the query's shape where K/V's head size is Q's.
        return {0: [new(_SAME_SHAPE, [x])]}
    if op == "MultiHeadAttention":  # packed QKV (B, S, H, 3, Dh) → (B, S, H·Dh)
        index = const([0])
        picked = new("Gather", [x, index], axis=3)
        chain.append(picked)
        squeezed = new("Squeeze", [picked.outputs[0], const([3])])
        chain.append(squeezed)
        chain.append(new("Reshape", [squeezed.outputs[0], const([0, 0, -1])]))
        return {0: chain}
    if op == "GroupQueryAttention":  # packed (B, S, (H + 2·Hkv)·Dh) → (B, S, H·Dh)
        heads = _attr(node, "num_heads", 0)
        kv_heads = _attr(node, "kv_num_heads", 0)
        if not heads or not kv_heads:
            return {}
        split = new("Reshape", [x, const([0, 0, heads + 2 * kv_heads, -1])])
        chain.append(split)
        queries = new("Slice", [split.outputs[0], const([0]), const([heads]), const([2])])
        chain.append(queries)
        chain.append(new("Reshape", [queries.outputs[0], const([0, 0, -1])]))
        return {0: chain}
    if op in ("Attention", "QAttention"):  # input (B, S, D) @ weights (D, Dq + Dk + Dv)
        weights = static_shape(given(1))
        if weights is None or len(weights) != 2:
            return {}
        sizes = _attr(node, "qkv_hidden_sizes", None) or [weights[1] // 3] * 3
        source = x if op == "Attention" else _cast(chain, new, x)
        projection = fake((weights[0], int(sizes[2])), source)
        chain.append(new("MatMul", [source, projection]))
        return {0: chain}
    if op == "MatMulNBits":  # A (..., K) @ B (K, N)
        k, n = _attr(node, "K", None), _attr(node, "N", None)
        if not isinstance(k, int) or not isinstance(n, int):
            return {}
        chain.append(new("MatMul", [x, fake((k, n), x)]))
        return {0: chain}
    if op in ("FusedMatMul", "TransposeMatMul"):
        if given(1) is None or _attr(node, "transBatchA", 0) or _attr(node, "transBatchB", 0):
            return {}
        a = "...ji" if _attr(node, "transA", 0) else "...ij"
        b = "...kj" if _attr(node, "transB", 0) else "...jk"
        return {0: [new("Einsum", [x, given(1)], equation=f"{a},{b}->...ik")]}
    if op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul") and given(1) is not None:
        a, b = _cast(chain, new, x), _cast(chain, new, given(1))
        chain.append(new("MatMul", [a, b]))
        return {0: chain}
    if op in ("QLinearAdd", "QLinearMul") and given(3) is not None:
        chain.append(new(op.removeprefix("QLinear"), [x, given(3)]))
        return {0: chain}
    if op == "QLinearConcat":  # Y_scale, Y_zp, then (X, X_scale, X_zp) per input
        parts = [given(i) for i in range(2, len(inputs), 3)]
        if not parts or any(p is None for p in parts):
            return {}
        return {0: [new("Concat", parts, axis=_attr(node, "axis", 0))]}
    if op == "QLinearGlobalAveragePool" and not _attr(node, "channels_last", 0):
        chain.append(new("GlobalAveragePool", [_cast(chain, new, x)]))
        return {0: chain}
    if op == "GatherBlockQuantized" and given(1) is not None:
        data = static_shape(x)
        bits = _attr(node, "bits", 4)
        if data is None or not data or not isinstance(bits, int) or not 0 < bits <= 8:
            return {}
        if x.dtype == ir.DataType.UINT8:  # packed: 8 / bits values per byte
            data = (*data[:-1], data[-1] * (8 // bits))
        table = fake(data, None)
        chain.append(new("Gather", [table, given(1)], axis=_attr(node, "gather_axis", 0)))
        return {0: chain}
    return {}


def _cast(chain: list[ir.Node], new: Callable[..., ir.Node], value: ir.Value) -> ir.Value:
    """``value`` as float (a stand-in for a quantized op computes in float)."""
    cast = new("Cast", [value], to=ir.DataType.FLOAT)
    chain.append(cast)
    return cast.outputs[0]


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value
