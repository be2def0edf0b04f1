"""MatMul + Add → Gemm, only where the pair is exactly a Gemm.

Gemm computes A' @ B' + C for 2-D A and B with C unidirectionally broadcast to [M, N].
MatMul + Add is wider: A of any rank, and a C that may broadcast the *result* up (a [1, M, N]
or [K, N] bias against M = 1). onnxscript's ``matmul_add_to_gemm_rule`` checks only that A
and B have rank 2; this pass also requires a constant float B (what makes the Gemm worth
having) and a C whose shape is known to broadcast into [M, N] without enlarging it.
A with rank > 2 is left alone (Gemm cannot express it; no Reshape is inserted).

C must be a constant (a bias): a residual ``x + r @ W`` (C an activation) or a C fed by a
graph input stays MatMul + Add. Fusing those gains nothing where the model runs: ORT's CPU
provider writes the same Gemm itself (MatMulAddFusion, level extended; its optimized graphs
of both forms are identical). Only with ORT's optimizations off does the Gemm save the Add's
dispatch, a few microseconds per layer at one row (ORT 1.32, 1 thread, 4 layers K = N = 256,
M = 1: 46 vs 57 us; M >= 16 within noise). The fused form hid the residual Add from the
lossy passes that run after the exact ones: ``--erase-blocks`` found no residual block, and
int8-dynamic kept half a residual MLP in float (both now also read such a Gemm, as input
models may carry them).
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register

# ORT's CPU Gemm kernels; float16 Gemm is not available on every execution provider.
_GEMM_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


@register
class FuseMatMulAddPass(GraphPass):
    """MatMul(A, B) + C → Gemm for 2-D A, constant 2-D B, constant C within [M, N]; refuses
    rank > 2 A, an activation or graph-input C (a residual sum: see the module docstring).

    Also refuses a MatMul output read elsewhere and non-float32/64 dtypes.
    """

    name = "fuse-matmul-add"
    ops = frozenset(("MatMul",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        # Gemm before opset 7 had a `broadcast` attribute with other rules; leave such models.
        if _common.default_opset(model) < 7:
            return 0
        matmuls = [
            node
            for graph in _common.all_graphs(model)
            for node in graph
            if editing.is_op(node, "MatMul") and len(node.inputs) == 2
        ]
        # A's rank decides everything; exported graphs often carry no shapes on intermediate
        # values, so infer them (once) when a candidate needs it.
        if any(_needs_shape(m) for m in matmuls):
            editing.fill_missing_shapes(model)
        return sum(1 for matmul in matmuls if self._fuse(matmul))

    def _fuse(self, matmul: ir.Node) -> bool:
        add = editing.single_user(matmul.outputs[0])
        if add is None or not editing.is_op(add, "Add") or add.graph is not matmul.graph:
            return False
        a, b = matmul.inputs
        product = matmul.outputs[0]
        c = add.inputs[1] if add.inputs[0] is product else add.inputs[0]
        if c is None or c is product or not editing.is_constant(c):
            return False
        if a is None or a.dtype not in _GEMM_TYPES or a.shape is None or len(a.shape) != 2:
            return False
        b_array = editing.constant_array(b)
        if b_array is None or b_array.ndim != 2 or b.dtype != a.dtype:
            return False
        if c.dtype != a.dtype or not _broadcasts_into(c, a.shape[0], b_array.shape[1]):
            return False
        gemm = ir.Node("", "Gemm", [a, b, c], name=add.name)
        gemm.outputs[0].type = add.outputs[0].type
        gemm.outputs[0].shape = add.outputs[0].shape
        editing.insert_before(add, [gemm])
        if not editing.replace_value(add.outputs[0], gemm.outputs[0]):
            editing.remove_node(gemm)
            return False
        editing.remove_node(add)
        editing.remove_node(matmul)
        return True


def _needs_shape(matmul: ir.Node) -> bool:
    add = editing.single_user(matmul.outputs[0])
    a = matmul.inputs[0]
    return add is not None and editing.is_op(add, "Add") and a is not None and a.shape is None


def _broadcasts_into(c: ir.Value, m: int | ir.SymbolicDim, n: int) -> bool:
    """C's (known) shape broadcasts into [m, n] without changing it."""
    tensor = ir.convenience.get_const_tensor(c)
    shape = tuple(tensor.shape) if tensor is not None else None
    if shape is None or len(shape) > 2:
        return False
    full = (1,) * (2 - len(shape)) + tuple(shape)
    for dim, target in zip(full, (m, n), strict=True):
        if dim == 1:
            continue
        if isinstance(dim, int) and isinstance(target, int):
            if dim != target:
                return False
        elif not (
            isinstance(dim, ir.SymbolicDim)
            and isinstance(target, ir.SymbolicDim)
            and dim.value is not None
            and dim.value == target.value
        ):
            # An unknown or differently named dim might be 1 at runtime (broadcasting the
            # product up), which Gemm cannot do.
            return False
    return True
