"""Gemm followed by Mul / Add with a per-column constant, folded into B and C.

Gemm computes Y = alpha * A' @ B' + beta * C with Y of shape [M, N]. For a constant m that
is a scalar, [N] or [1, N] (constant down the rows): Y * m = alpha * A' @ (B' * m) +
(beta * C) * m, i.e. B's columns (its rows under transB=1) and C scale; Y + a folds into
C alone. C must then be constant (or absent); beta is folded into the new C (beta := 1).
A constant that varies over rows ([M, 1], [M, N]) or would enlarge the rank is refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register


@register
class FuseGemmAffinePass(GraphPass):
    """Fold Mul/Add by a scalar or per-column constant after Gemm into B, C; refuses per-row.

    Also refuses a non-constant B (for Mul) or C, a shared Gemm output and non-float types.
    """

    name = "fuse-gemm-affine"
    ops = frozenset(("Gemm",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        return _common.fold_into_each(model, "Gemm", self._fuse_next)

    def _fuse_next(self, gemm: ir.Node, maker: _common.WeightMaker) -> bool:
        successor = _common.affine_successor(gemm)
        if successor is None or len(gemm.inputs) < 2:
            return False
        user, other = successor
        b = editing.constant_array(gemm.inputs[1])
        if not _common.is_float_array(b) or b.ndim != 2:
            return False
        trans_b = bool(editing.attribute(gemm, "transB", 0))
        n = b.shape[0] if trans_b else b.shape[1]
        constant = editing.constant_array(other)
        if constant is None or constant.dtype != b.dtype:
            return False
        if constant.ndim > 2 or any(d != 1 for d in constant.shape[:-1]):
            return False
        if constant.ndim and constant.shape[-1] not in (1, n):
            return False
        column = np.broadcast_to(constant.astype(np.float64).reshape(-1), (n,))
        c_value = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        c = None if c_value is None else editing.constant_array(c_value)
        if c_value is not None and (c is None or c.dtype != b.dtype or c.ndim > 2):
            return False
        beta = float(editing.attribute(gemm, "beta", 1.0))
        scaled_c = None if c is None else c.astype(np.float64) * beta
        graph = editing.owning_graph(gemm)
        b_value = gemm.inputs[1]
        base = b_value.name or "gemm"
        if user.op_type == "Mul":
            new_b = b.astype(np.float64) * (column[:, None] if trans_b else column[None, :])
            gemm.replace_input_with(1, maker.add(graph, f"{base}_scaled", new_b.astype(b.dtype)))
            new_c = None if scaled_c is None else scaled_c * column
        else:
            new_c = column.copy() if scaled_c is None else scaled_c + column
        if new_c is not None:
            if len(gemm.inputs) < 3:
                gemm.resize_inputs(3)
            gemm.replace_input_with(2, maker.add(graph, f"{base}_bias", new_c.astype(b.dtype)))
            gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        editing.replace_value(user.outputs[0], gemm.outputs[0])  # no graph output: single_user
        editing.remove_node(user)
        for value in (other, b_value, c_value):
            _common.drop_if_unused(value)
        return True
