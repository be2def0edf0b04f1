"""Rewrite one layer as two thinner ones: ``W[N, K] ≈ U[N, r] · V[r, K]`` in the graph.

The layer's own node stays and becomes the second factor (it keeps its output value, its
name, and its bias and epilogue semantics); a new node, inserted before it, computes the
first factor from the layer's input:

* MatMul ``x @ B``: ``MatMul(x, Vᵀ[K, r])``, then the node as ``MatMul(·, Uᵀ[r, N])``.
* Gemm ``alpha · A op(B) + beta · C``: ``MatMul(A, Vᵀ)``, then the Gemm with ``B`` ← ``U``
  (``transB=1``) or ``Uᵀ`` (``transB=0``); alpha, beta and C unchanged: ``A Wᵀ = (A Vᵀ) Uᵀ``.
* Conv ``[O, C, kh, kw]`` (group 1): ``Conv(x, V[r, C, kh, kw])`` with the layer's kernel,
  strides, pads and dilations, no bias; then the node as a 1×1 Conv ``U[O, r, 1, 1]`` with
  stride 1, no padding and the bias. The canonical K order is (ky, kx, channel)
  (:mod:`graphopt.passes.sparsity.layers`), so ``V``'s rows reshape to ``[r, kh, kw, C]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import NameTable, attribute, insert_before, remove_if_dead
from graphopt.passes.sparsity.layers import Layer

# Attributes of the first Conv that describe the second (a 1×1, stride-1, unpadded Conv).
_SPATIAL = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


@dataclass
class Rewritten:
    """What the rewrite made: the first factor's node and the layer node (now the second)."""

    first: ir.Node
    second: ir.Node
    middle: ir.Value  # the first node's output, [.., r]


def refusal(layer: Layer) -> str:
    """Why ``layer`` cannot be factorized here ("" when it can)."""
    if layer.op == "Conv":
        if layer.groups != 1:
            return f"grouped Conv (group {layer.groups}): no channel decomposition"
        if len(layer.shape) != 4:
            return f"{len(layer.shape) - 2}-D Conv: only 2-D convolutions are factorized"
    if layer.op == "Gemm" and attribute(layer.node, "transA", 0):
        return "Gemm with transA: the first factor cannot read a transposed input"
    return ""


def factorize_layer(
    graph: ir.Graph, layer: Layer, u: np.ndarray, v: np.ndarray, names: NameTable
) -> Rewritten:
    """Replace ``layer``'s weight by ``u @ v`` as two nodes (see the module docstring)."""
    dtype = layer.weight.dtype.numpy() if layer.weight.dtype is not None else np.float32
    node, rank = layer.node, int(u.shape[1])
    base = layer.name or "layer"
    if layer.op == "Conv":
        out, cin, kh, kw = layer.shape
        first_w = np.moveaxis(v.reshape(rank, kh, kw, cin), -1, 1)
        second_w = u.reshape(out, rank, 1, 1)
    else:
        first_w = v.T
        trans = layer.op == "Gemm" and attribute(node, "transB", 0)
        second_w = u if trans else u.T
    first_const = names.add_initializer(
        graph, f"{base}_lowrank_v", np.ascontiguousarray(first_w, dtype=dtype)
    )
    second_const = names.add_initializer(
        graph, f"{base}_lowrank_u", np.ascontiguousarray(second_w, dtype=dtype)
    )
    x = node.inputs[0]
    assert x is not None
    middle = ir.Value(name=names.take(f"{base}_lowrank"), type=x.type)
    if layer.op == "Conv":
        attributes = [a for k, a in node.attributes.items() if k in _SPATIAL]
        first = ir.Node(
            node.domain,
            "Conv",
            inputs=[x, first_const],
            outputs=[middle],
            attributes=attributes,
            name=names.take(f"{base}_lowrank_first"),
        )
        for key in _SPATIAL:
            node.attributes.pop(key, None)
        node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [1, 1])
    else:
        first = ir.Node(
            "",
            "MatMul",
            inputs=[x, first_const],
            outputs=[middle],
            name=names.take(f"{base}_lowrank_first"),
        )
    insert_before(node, [first])
    old = layer.weight
    node.replace_input_with(0, middle)
    node.replace_input_with(1, second_const)
    _drop(graph, old)
    layer.weight = second_const
    return Rewritten(first, node, middle)


def _drop(graph: ir.Graph, old: ir.Value) -> None:
    """Remove the old weight when nothing reads it any more and the graph does not output
    it (an output left naming a deleted initializer made the model uncopyable: exit 3)."""
    if old.uses() or old.is_graph_output():
        return
    producer = old.producer()
    if producer is not None:
        remove_if_dead(producer)
    elif old.name and graph.initializers.get(old.name) is old:
        del graph.initializers[old.name]
