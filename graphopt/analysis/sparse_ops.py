"""graphopt's own sparse ops (domain ``graphopt``; ``graphopt/kernels/LAYOUTS.md``) for the
analysis: where their inputs sit, the dense op each computes, and what that op costs.

``SparseMatMul``, ``SparseMatMul24`` and ``SparseQMatMul`` all compute
``Y = act(A @ W + bias)``, ``A`` ``[..., K]`` and ``Y`` ``[..., N]`` (``K``, ``N`` attributes),
``act`` none, Relu or Gelu (erf). onnx has no schema for them, so shapes past them come from a
MatMul stand-in (:mod:`graphopt.analysis.contrib_shapes`), and FLOPs count the dense layer
they replace: MatMul (MatMulIntegerToFloat for ``SparseQMatMul``) + bias Add + activation, as
fused ops count as their unfused pattern. The FLOPs a sparse kernel skips (the zeros of the
packed weight) are not taken off: the headline stays comparable with the dense model, as
for a fused op; the sparsity pass reports the weights' sparsity itself.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.analysis.flops_fused import GELU_ERF
from graphopt.analysis.flops_terms import Cost, UnknownShape, has_input, in_shape, numel
from graphopt.analysis.shapes import static_shape
from graphopt.backends.ort_custom_ops import OWN_DOMAIN
from graphopt.editing import attribute

# Op → (index of the activations A, float or uint8; index of the optional bias, the input
# after the packed weight's: LAYOUTS.md).
SPARSE_OPS: dict[str, tuple[int, int]] = {
    "SparseMatMul": (0, 4),  # A, values, col_idx, row_ptr, bias?
    "SparseMatMul24": (0, 3),  # A, values, indices, bias?
    # A (u8), a_scale, a_zero_point, values, col_idx, row_ptr, w_scale, w_rowsum, bias?
    "SparseQMatMul": (0, 8),
}
# FLOPs per output element of the fused activation, as the node it absorbed counted: Relu 1,
# Gelu the erf formula (flops_fused.GELU_ERF).
_ACTIVATION = {"": 0, "none": 0, "relu": 1, "gelu": GELU_ERF}


def is_sparse_op(node: ir.Node) -> bool:
    return node.domain == OWN_DOMAIN and node.op_type in SPARSE_OPS


def dense_size(node: ir.Node) -> tuple[int, int] | None:
    """(K, N) of the dense weight the op holds packed, from its attributes."""
    k, n = attribute(node, "K", None), attribute(node, "N", None)
    if not isinstance(k, int) or not isinstance(n, int) or k < 0 or n < 0:
        return None
    return k, n


def sparse_matmul(node: ir.Node) -> Cost:
    """FLOPs of a graphopt sparse op as the dense ``act(A @ W + bias)`` it computes."""
    size = dense_size(node)
    if size is None:
        raise UnknownShape
    k, n = size
    a_index, bias_index = SPARSE_OPS[node.op_type]
    a = in_shape(node, a_index)
    if not a or a[-1] != k:
        raise UnknownShape
    outputs = numel(a[:-1]) * n
    macs = outputs * k
    flops = 2 * macs
    if _has_bias(node, bias_index):
        flops += outputs
    activation = attribute(node, "activation", "")
    activation = activation.decode() if isinstance(activation, bytes) else str(activation)
    flops += _ACTIVATION.get(activation.lower(), 0) * outputs
    return Cost(flops, macs)


def _has_bias(node: ir.Node, index: int) -> bool:
    # "omitted or empty = no bias" (LAYOUTS.md): an empty tensor adds nothing.
    if not has_input(node, index):
        return False
    shape = static_shape(node.inputs[index])
    return shape is None or numel(shape) > 0
