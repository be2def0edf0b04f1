"""The packed format of a sparse layer and its rewrite into graphopt's ops (domain
``graphopt``, ``graphopt/kernels``).

Format: 2:4 (``SparseMatMul24``) or BSR (``SparseMatMul``; int8: ``SparseQMatMul``) with the
block shape (R outputs x C inputs) among :data:`BSR_SHAPES` (int8: :data:`S8_SHAPES`) that
stores the fewest bytes; the fewest bytes wins because the kernels stream the packed weight
(memory-bound at these sizes), and it is a deterministic function of the weight.

The rewrite (:func:`lower`) replaces the layer's nodes (the anchor and the epilogue folded
into the op) by the op holding the packed weight as initializers, equal arrays shared, and
drops the constants nothing reads any more, so that the output is a fixed point of
``optimize``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.backends.ort_custom_ops import OWN_DOMAIN
from graphopt.passes.sparsity.lowerable_layers import Layer

# (R, C): R outputs (N) by C inputs (K) per block. int8 blocks need C % 4 == 0 (VNNI).
BSR_SHAPES = ((1, 4), (4, 1), (16, 1), (4, 4), (1, 1))
S8_SHAPES = ((1, 4), (4, 4), (16, 4), (1, 8))


def choose_format(layer: Layer) -> tuple[Any, str]:
    """The packed weight and its format name (``2:4`` or ``bsrRxC``): fewest stored bytes."""
    from graphopt.kernels import packing

    w = layer.w
    if layer.op == "QMatMul":
        r, c = min(S8_SHAPES, key=lambda shape: _bsr_bytes(w, *shape, itemsize=1))
        assert layer.w_scale is not None
        return packing.pack_bsr_s8(w, layer.w_scale, r, c), f"bsr{r}x{c}"
    r, c = min(BSR_SHAPES, key=lambda shape: _bsr_bytes(w, *shape, itemsize=4))
    best = _bsr_bytes(w, r, c, itemsize=4)
    K, N = w.shape
    bytes_24 = N * (K // 2) * 4 + N * -(-K // 8)
    if K % 4 == 0 and bytes_24 <= best and _fits_24(w):
        return packing.pack_24(w), "2:4"
    return packing.pack_bsr(w, r, c), f"bsr{r}x{c}"


def _bsr_bytes(w: np.ndarray, r: int, c: int, itemsize: int) -> int:
    """Bytes of ``w`` in BSR with R x C blocks: values, col_idx and row_ptr."""
    K, N = w.shape
    kb, nb = -(-K // c), -(-N // r)
    nonzero = np.zeros((kb * c, nb * r), dtype=bool)
    nonzero[:K, :N] = w != 0
    blocks = int(nonzero.reshape(kb, c, nb, r).any(axis=(1, 3)).sum())
    return blocks * (r * c * itemsize + 4) + (nb + 1) * 4


def _fits_24(w: np.ndarray) -> bool:
    K, N = w.shape
    return bool(((w != 0).reshape(K // 4, 4, N).sum(axis=1) <= 2).all())


def op_parts(layer: Layer, packed: Any, fmt: str) -> tuple[str, list[tuple[str, Any]], dict]:
    """The op type, its constant inputs after A (name suffix, array; the bias last, if any)
    and its attributes."""
    attrs: dict[str, Any] = {"K": layer.K, "N": layer.N, "activation": layer.activation}
    bias = [] if layer.bias is None else [("bias", layer.bias)]
    if fmt == "2:4":
        consts = [("values", packed.values), ("indices", packed.indices), *bias]
        return "SparseMatMul24", consts, attrs
    attrs.update(block_r=int(packed.R), block_c=int(packed.C))
    bsr = [("values", packed.values), ("col_idx", packed.col_idx), ("row_ptr", packed.row_ptr)]
    if layer.op != "QMatMul":
        return "SparseMatMul", [*bsr, *bias], attrs
    assert layer.a_scale is not None and layer.a_zero is not None
    consts = [("a_scale", layer.a_scale), ("a_zero_point", layer.a_zero), *bsr]
    consts += [("w_scale", packed.w_scale), ("w_rowsum", packed.w_rowsum), *bias]
    return "SparseQMatMul", consts, attrs


def lower(
    graph: ir.Graph,
    layer: Layer,
    packed: Any,
    fmt: str,
    shared: dict[tuple[str, tuple[int, ...], str], ir.Value] | None = None,
) -> tuple[ir.Value, ir.Value]:
    """Replace the layer's nodes by the sparse op (through :mod:`graphopt.editing`); the
    layer's old output and the op's, which took its place.

    ``shared``: the arrays this run added, by content. Equal ones (the row_ptr of layers
    sparsified alike) are one initializer, as the cleanup passes would make them on the next
    run: so ``optimize`` of the output changes nothing."""
    shared = {} if shared is None else shared
    op_type, consts, attrs = op_parts(layer, packed, fmt)
    inputs = [layer.a]
    for suffix, array in consts:
        array = np.ascontiguousarray(array)
        key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        if key not in shared:
            name = editing.unique_name(graph, f"{layer.name}.sparse_{suffix}")
            shared[key] = editing.register_array(graph, name, array)
        inputs.append(shared[key])
    node = ir.node(op_type, inputs, attrs, domain=OWN_DOMAIN, name=layer.name, num_outputs=1)
    editing.insert_before(layer.anchor, [node])
    old, new = layer.output, node.outputs[0]
    new.type, new.shape = old.type, old.shape
    name = old.name
    # What the replaced nodes read, collected before they go: removing a node detaches its
    # inputs (onnx_ir's safe removal sets them to None), so reading them afterwards finds
    # nothing, and the int8 weights, scales and zero points stayed as dead initializers.
    reads = [v for n in (*layer.removed, *layer.sources) for v in n.inputs if v is not None]
    if not editing.replace_value(old, new):
        raise AssertionError("the sparse op's output is a fresh node output")
    for dead in reversed(layer.removed):
        editing.remove_node(dead)
    if not new.is_graph_output():
        new.name = name
    for source in layer.sources:
        editing.remove_if_dead(source)  # a DequantizeLinear other nodes read stays
    drop_unused(graph, reads)
    return old, new


def drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the constants among ``values`` that nothing reads any more (initializers, and
    Constant nodes), so that the output holds no dead weight: the cleanup passes, which run
    before this pass, would remove them on the next ``optimize`` and the output would not be
    a fixed point. A constant something else still reads is kept."""
    for value in dict.fromkeys(values):  # a value read twice: once, in order
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer():
            if graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]
            continue
        producer = value.producer()
        if producer is not None and editing.is_op(producer, "Constant"):
            editing.remove_if_dead(producer)
