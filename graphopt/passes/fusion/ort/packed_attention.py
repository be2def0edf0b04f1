"""MultiHeadAttention fed by three projections of one input → packed-QKV com.microsoft Attention.

ORT's CPU Attention kernel takes the layer input and one [hidden, 3·hidden] weight: the three
Q/K/V GEMMs become one larger GEMM inside the kernel, with the bias add and the head split
fused. onnxscript's ``fuse_attention`` only packs MHAs whose projections it matched itself
(MatMul + Add with the bias second); this pass packs the rest: projections without bias (the
zero biases of freshly initialised models are erased), and GPT-2's Conv1D form, where one Gemm
already computes Q|K|V on the flattened input and a Split separates them.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt import editing
from graphopt.passes.fusion.ort._base import MS_DOMAIN
from graphopt.registry import GraphPass, Stage, register

# MultiHeadAttention inputs (com.microsoft): query, key, value, bias, key_padding_mask,
# attention_bias, past_key, past_value.
QUERY, KEY, VALUE, BIAS, KEY_PADDING_MASK, ATTENTION_BIAS, PAST_KEY, PAST_VALUE = range(8)
# Attributes both ops share with the same meaning.
SHARED_ATTRIBUTES = ("num_heads", "scale", "mask_filter_value", "unidirectional")


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _const_vector(value: ir.Value | None) -> np.ndarray | None:
    array = editing.constant_array(value)
    return array if array is not None and array.ndim == 1 else None


def _projection(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(x, W, b) when ``value`` = MatMul(x, W) (+ b), W a constant matrix, b a constant vector."""
    node = value.producer()
    bias = None
    if node is not None and editing.is_op(node, "Add") and len(node.inputs) == 2:
        first, second = node.inputs
        if (bias := _const_vector(second)) is not None:
            node = first.producer() if first is not None else None
        elif (bias := _const_vector(first)) is not None:
            node = second.producer() if second is not None else None
        else:
            return None
    if node is None or not editing.is_op(node, "MatMul"):
        return None
    weight = editing.constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or node.inputs[0] is None:
        return None
    if bias is not None and bias.shape[0] != weight.shape[1]:
        return None
    return node.inputs[0], weight, bias


def _same_dims(a: ir.Value, b: ir.Value, count: int) -> bool:
    """The first ``count`` dims of two rank-3 values are known and equal."""
    if a.shape is None or b.shape is None or a.shape.rank() != 3 or b.shape.rank() != 3:
        return False
    for left, right in zip(a.shape.dims[:count], b.shape.dims[:count], strict=True):
        if isinstance(left, int) != isinstance(right, int):
            return False
        if isinstance(left, int):
            if left != right:
                return False
        elif left.value is None or left.value != right.value:
            return False
    return True


def _through_reshapes(value: ir.Value) -> ir.Value:
    """The earliest value of a Reshape chain ending in ``value`` that is provably ``value``.

    TorchScript exports split heads and merge them back (Reshape to (B, S, N, D), a Transpose
    and its inverse, then Reshape to (B, S, -1)) in front of the MHA. Reshapes keep row-major
    order, so such a chain is the identity when its start and end have the same shape: both
    rank 3 with the same (symbolic or static) batch and sequence dims, which fixes the third.
    """
    found, current = value, value
    while (producer := current.producer()) is not None:
        if editing.is_op(producer, "Reshape"):
            current = producer.inputs[0]
        elif (inner := _inverse_transpose_pair(producer)) is not None:
            current = inner.inputs[0]  # still in the graph until cleanup drops the pair
        else:
            break
        if current is None:
            break
        if _same_dims(value, current, 2):
            found = current
    return found


def _inverse_transpose_pair(outer: ir.Node) -> ir.Node | None:
    """The inner Transpose when ``outer`` is a Transpose undoing it (their product is identity)."""
    if not editing.is_op(outer, "Transpose") or outer.inputs[0] is None:
        return None
    inner = outer.inputs[0].producer()
    if inner is None or not editing.is_op(inner, "Transpose"):
        return None
    first, second = editing.attribute(inner, "perm"), editing.attribute(outer, "perm")
    if first is None or second is None or len(first) != len(second):
        return None
    return inner if all(first[axis] == i for i, axis in enumerate(second)) else None


def _split_gemm(node: ir.Node) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(x, W, b) when Q, K, V are the outputs of Split(Reshape(Gemm(Reshape(x), W, b)))."""
    q, k, v = (_input(node, i) for i in (QUERY, KEY, VALUE))
    if q is None or k is None or v is None:
        return None
    q, k, v = (_through_reshapes(x) for x in (q, k, v))
    split = q.producer()
    if split is None or not editing.is_op(split, "Split") or len(split.outputs) != 3:
        return None
    if [q, k, v] != list(split.outputs) or editing.attribute(split, "axis", 0) not in (2, -1):
        return None
    sizes = editing.const_ints(_input(split, 1))
    if sizes is not None and len(set(sizes)) != 1:
        return None
    packed = split.inputs[0]
    reshape = packed.producer()
    if reshape is None or not editing.is_op(reshape, "Reshape"):
        return None
    gemm = reshape.inputs[0].producer()
    if gemm is None or not editing.is_op(gemm, "Gemm") or editing.attribute(gemm, "transA", 0):
        return None
    if editing.attribute(gemm, "alpha", 1.0) != 1.0 or editing.attribute(gemm, "beta", 1.0) != 1.0:
        return None
    weight = editing.constant_array(gemm.inputs[1])
    bias = _const_vector(_input(gemm, 2)) if _input(gemm, 2) is not None else None
    if weight is None or weight.ndim != 2 or (_input(gemm, 2) is not None and bias is None):
        return None
    if editing.attribute(gemm, "transB", 0):
        weight = weight.T
    flat = gemm.inputs[0].producer()
    if flat is None or not editing.is_op(flat, "Reshape"):
        return None
    x = flat.inputs[0]
    # The flattening keeps the last (hidden) axis and the reshape back restores x's batch and
    # sequence axes: only then is Split's input the per-token projection of x.
    if x is None or not _same_dims(x, packed, 2) or weight.shape[0] != x.shape.dims[2]:
        return None
    if packed.shape.dims[2] != weight.shape[1] or weight.shape[1] % 3:
        return None
    return x, weight, bias


def _separate(node: ir.Node) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(x, W, b) packed from three MatMul projections of the same x."""
    found = [_projection(v) if v is not None else None for v in node.inputs[:3]]
    if any(f is None for f in found):
        return None
    xs = {id(f[0]) for f in found}
    widths = {f[1].shape[1] for f in found}
    if len(xs) != 1 or len(widths) != 1 or len({f[1].shape[0] for f in found}) != 1:
        return None
    x = found[0][0]
    if x.shape is None or x.shape.rank() != 3:
        return None  # Attention wants (batch, sequence, hidden)
    dtype = found[0][1].dtype
    weight = np.concatenate([f[1] for f in found], axis=1).astype(dtype)
    if all(f[2] is None for f in found):
        return x, weight, None
    width = widths.pop()
    bias = np.concatenate([f[2] if f[2] is not None else np.zeros(width, dtype) for f in found])
    return x, weight, bias.astype(dtype)


def _packable(node: ir.Node) -> bool:
    if node.domain != MS_DOMAIN or node.op_type != "MultiHeadAttention":
        return False
    if any(_input(node, i) is not None for i in (KEY_PADDING_MASK, PAST_KEY, PAST_VALUE)):
        return False
    # present_key / present_value: Attention has no such outputs in this form.
    return not any(o.uses() or o.is_graph_output() for o in node.outputs[1:])


@register
class OrtPackedAttentionPass(GraphPass):
    """With --target ort: MultiHeadAttention on Q/K/V projections of one input → Attention."""

    name = "ort-packed-attention"
    targets = frozenset(("ort",))
    stage = Stage.FUSION
    handles_subgraphs = False

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        if not any(_packable(node) for node in graph):
            return 0
        # The shape checks need ONNX's shapes (with data propagation) on the current graph;
        # inference only annotates values, it changes no node.
        with contextlib.suppress(Exception):  # no shapes: fewer proofs, the checks refuse
            common_passes.ShapeInferencePass()(model)
        hits = 0
        for node in list(graph):
            if not _packable(node):
                continue
            found = _separate(node) or _split_gemm(node)
            if found is None:
                continue
            x, weight, bias = found
            mha_bias = editing.constant_array(_input(node, BIAS))
            if _input(node, BIAS) is not None:
                if mha_bias is None or mha_bias.shape != (weight.shape[1],):
                    continue
                bias = mha_bias if bias is None else bias + mha_bias
            if bias is None:
                bias = np.zeros(weight.shape[1], weight.dtype)
            w_value = editing.add_initializer(graph, f"{node.name}_qkv_weight", weight)
            b_value = editing.add_initializer(graph, f"{node.name}_qkv_bias", bias)
            inputs = [x, w_value, b_value]
            if (attention_bias := _input(node, ATTENTION_BIAS)) is not None:
                inputs += [None, None, attention_bias]
            attributes = {
                name: node.attributes[name].value
                for name in SHARED_ATTRIBUTES
                if name in node.attributes
            }
            fused = ir.node(
                "Attention",
                inputs,
                attributes=attributes,
                domain=MS_DOMAIN,
                name=f"{node.name}_packed",
            )
            out = node.outputs[0]
            fused.outputs[0].name = editing.unique_name(graph, f"{out.name}_packed")
            if out.dtype is not None:
                fused.outputs[0].dtype = out.dtype
            fused.outputs[0].shape = out.shape
            editing.insert_after(node, [fused])
            if not editing.replace_value(out, fused.outputs[0]):
                graph.remove(fused, safe=True)
                continue
            graph.remove(node, safe=True)
            hits += 1
        return hits
