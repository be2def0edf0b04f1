"""Why ``sparse-kernels`` left a sparse layer dense: the reasons its note gives.

The note counts every sparse layer (``lowered H of M``) and says why the others stay dense:
weight dtype (float16/bfloat16: the kernels take float32 or int8), form, Q/K/V left fused in
Attention, not faster than dense, and the layers under :data:`MIN_SPARSITY` zeros; so
``--sparse-kernels`` never does nothing without saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.sparsity.lowerable_layers import MIN_SPARSITY, Layer, zero_share

# The Q/K/V projections of a sparse com.microsoft Attention: fused (counted here), or left
# fused once decided (the pass moves them there, or out of the note when it splits them).
FUSED_QKV = (
    "Q/K/V projection(s) fused into com.microsoft Attention, which runs them dense (zeros and all)"
)
FUSED_QKV_KEPT = (
    "Q/K/V projection(s) left fused in com.microsoft Attention (dense): not all three faster "
    "sparse by --sparse-kernels-min-speedup"
)

# Weight dtypes the kernels take: float32 (SparseMatMul*) and int8 (SparseQMatMul).
_KERNEL_DTYPES = (np.float32, np.int8)


@dataclass
class Unlowerable:
    """The sparse layers (weights at least MIN_SPARSITY zero) the pass cannot lower, by
    reason, and the layers too dense to consider: what its note says besides "lowered"."""

    reasons: dict[str, int] = field(default_factory=dict)  # reason -> layers
    dense: int = 0  # constant-weight layers under MIN_SPARSITY zeros
    densest: float = 0.0  # the largest zero share among those
    lowerable: int = 0  # sparse layers the kernels take (timed or replayed)
    slower: int = 0  # of those, not lowered: not faster than dense by min_speedup

    def add(self, reason: str, count: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + count
        if not self.reasons[reason]:
            del self.reasons[reason]

    def note(self, hits: int, convs: int, tail: str) -> str:
        """``lowered H of M sparse layer(s)``, M counting every sparse layer, and why the
        others were not lowered."""
        total = self.lowerable + sum(self.reasons.values()) + convs
        parts = [f"{count} {reason}" for reason, count in self.reasons.items()]
        if convs:
            parts.append(f"{convs} 1x1 Conv (not implemented)")
        if self.slower:
            parts.append(f"{self.slower} not faster than dense by --sparse-kernels-min-speedup")
        dense = (
            f"under the {MIN_SPARSITY:.0%} zeros the kernels need (the sparsest "
            f"{self.densest:.1%} zero)"
        )
        if not total:
            return (
                f"sparse-kernels: nothing lowered: no sparse layer; the {self.dense} "
                f"constant-weight layer(s) are {dense}"
            )
        if self.dense:
            parts.append(f"{self.dense} other layer(s) {dense}")
        why = f"; not lowered: {'; '.join(parts)}" if parts else ""
        return f"sparse-kernels: lowered {hits} of {total} sparse layer(s){tail}{why}"


def unlowerable(model: ir.Model, layers: list[Layer]) -> Unlowerable:
    """Why the main graph's constant-weight layers other than ``layers`` (and those of
    ``layers`` under MIN_SPARSITY zeros) are not lowered: a note per reason, so that
    ``--sparse-kernels`` never does nothing without saying why."""
    found = Unlowerable()

    def dense(share: float, count: int = 1) -> None:
        found.dense += count
        found.densest = max(found.densest, share)

    taken: set[int] = set()
    for layer in layers:
        taken.update(id(node) for node in layer.removed)
        if layer.sparsity < MIN_SPARSITY:
            dense(layer.sparsity)
    for node in model.graph:
        if id(node) in taken:
            continue
        if node.domain == "com.microsoft" and node.op_type == "Attention":
            w = editing.constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
            if w is None or w.ndim != 2:
                continue
            share = zero_share(w)
            sizes = editing.attribute(node, "qkv_hidden_sizes")
            count = len(sizes) if sizes else 3  # one projection each for Q, K and V
            if share < MIN_SPARSITY:
                dense(share, count)
                continue
            found.add(FUSED_QKV, count)
            continue
        if not (editing.is_op(node, "MatMul") or editing.is_op(node, "Gemm")):
            continue
        w, quantized = _weight(node)
        if w is None:
            continue
        share = zero_share(w)
        if share < MIN_SPARSITY:
            dense(share)
            continue
        found.add(_why_not(node, w, quantized))
    return found


def _weight(node: ir.Node) -> tuple[np.ndarray | None, bool]:
    """A MatMul/Gemm's constant 2-D weight (through a DequantizeLinear), and whether it is
    quantized."""
    b = node.inputs[1] if len(node.inputs) > 1 else None
    if b is None:
        return None, False
    producer = b.producer()
    quantized = producer is not None and editing.is_op(producer, "DequantizeLinear")
    w = editing.constant_array(producer.inputs[0] if quantized else b)
    if w is None or w.ndim != 2:
        return None, quantized
    return w, quantized


def _why_not(node: ir.Node, w: np.ndarray, quantized: bool) -> str:
    """Why a sparse MatMul/Gemm is not one of the layers :func:`find_layers` takes."""
    a = node.inputs[0]
    if w.dtype not in _KERNEL_DTYPES:
        return (
            f"with {w.dtype} weights (the kernels take float32 weights, or int8 QDQ: "
            "--quantize fp16/bf16 leaves sparse layers dense)"
        )
    if quantized:
        from graphopt.kernels.packing import S8_MAX_K

        if w.dtype == np.int8 and w.shape[0] > S8_MAX_K:
            return f"int8 with K over {S8_MAX_K} (the kernel's int32 sums could overflow)"
        return (
            "int8 in a form the kernel does not take (it needs uint8 activations with a "
            "scalar scale and zero point, symmetric int8 weights, no block_size)"
        )
    if a is not None and a.dtype not in (None, ir.DataType.FLOAT):
        return f"with {a.dtype.name.lower()} inputs (the kernels take float32)"
    return "in a form the kernels do not take (Gemm with transA, alpha or beta other than 1)"
