"""Constant Pad on spatial axes folded into the following AveragePool / MaxPool ``pads``.

A pool's own padding is exact only where it means the same as the explicit Pad:

* AveragePool with ``count_include_pad=1`` averages its padding as zeros, so a zero Pad
  folds in; with ``count_include_pad=0`` the padded zeros would leave the divisor: refused.
* MaxPool ignores its padding, i.e. pads with -inf, so only a Pad whose fill value is -inf
  folds in (a zero Pad could win the max over negative inputs: refused). MaxPool's
  ``Indices`` output must be unused (indices count positions in the padded input).

Both refuse ``ceil_mode=1`` (the rule that drops a last window starting in the padding
depends on where the padding is), ``auto_pad`` other than NOTSET, negative amounts and
padding of batch or channel axes.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register


@register
class FusePadPoolPass(GraphPass):
    """Fold Pad into AveragePool (zero fill, count_include_pad=1) or MaxPool (-inf fill).

    Refuses other fills, ceil_mode, auto_pad, used MaxPool indices, non-spatial padding and
    pads that reach the kernel size.
    """

    name = "fuse-pad-pool"
    ops = frozenset(("Pad",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        return _common.fold_pad_into_readers(model, ("AveragePool", "MaxPool"), self._fuse)

    def _fuse(self, pad: ir.Node, pool: ir.Node, opset: int) -> bool:
        if editing.attribute(pool, "auto_pad", "NOTSET") != "NOTSET":
            return False
        if editing.attribute(pool, "ceil_mode", 0):
            return False
        kernel = editing.attribute(pool, "kernel_shape", None)
        if not kernel:
            return False
        rank = len(kernel) + 2
        spec = _common.pad_spec(pad, rank, opset)
        if spec is None:
            return False
        amounts, fill = spec
        if pool.op_type == "AveragePool":
            if not editing.attribute(pool, "count_include_pad", 0) or fill != 0.0:
                return False
        else:
            if not (math.isinf(fill) and fill < 0):
                return False
            if len(pool.outputs) > 1 and (
                pool.outputs[1].uses() or pool.outputs[1].is_graph_output()
            ):
                return False
        if any(p < 0 for p in amounts):
            return False
        if amounts[0] or amounts[1] or amounts[rank] or amounts[rank + 1]:
            return False
        spatial = rank - 2
        added = amounts[2:rank] + amounts[rank + 2 :]
        current = editing.attribute(pool, "pads", None) or [0] * (2 * spatial)
        if len(current) != 2 * spatial:
            return False
        pads = [int(a) + int(b) for a, b in zip(current, added, strict=True)]
        # ORT rejects a pool whose padding reaches a whole kernel (a window of padding only).
        if any(p >= k for p, k in zip(pads, list(kernel) * 2, strict=True)):
            return False
        pool.attributes["pads"] = ir.AttrInt64s("pads", pads)
        pool.replace_input_with(0, pad.inputs[0])
        return True
