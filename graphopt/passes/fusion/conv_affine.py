"""Conv followed by Mul / Add with a per-output-channel constant, folded into the Conv.

Conv(x) * s = Conv_{W*s, b*s}(x) and Conv(x) + a = Conv_{W, b+a}(x) hold exactly when s and
a are constant over batch and spatial positions, i.e. they broadcast as a scalar, [C], ...
right-aligned to [N, C, *spatial] with 1 everywhere but the channel axis. A constant that
would enlarge the output's rank, or varies over batch or space, is refused.

onnxscript's ``conv_affine_fusion_rule`` only folds a scalar Mul followed by a scalar Add
into a Conv that has a bias; this pass covers per-channel constants, a lone Mul or Add, and
a bias-less Conv, and chains (Conv → Mul → Add) fold one step at a time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register


@register
class FuseConvAffinePass(GraphPass):
    """Fold Mul/Add by a per-channel constant after Conv; refuses spatial/batch-varying ones.

    Also refuses a Conv output read elsewhere and non-float or non-constant weights.
    """

    name = "fuse-conv-affine"
    ops = frozenset(("Conv",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        # Fold the whole chain behind each Conv, one Mul or Add at a time.
        return _common.fold_into_each(model, "Conv", self._fuse_next)

    def _fuse_next(self, conv: ir.Node, maker: _common.WeightMaker) -> bool:
        successor = _common.affine_successor(conv)
        if successor is None:
            return False
        user, other = successor
        weights = _common.conv_weights(conv)
        if weights is None:
            return False
        weight, bias = weights
        channels = weight.shape[0]
        constant = editing.constant_array(other)
        if constant is None or constant.dtype != weight.dtype:
            return False
        per_channel = _per_channel(constant, weight.ndim, channels)
        if per_channel is None:
            return False
        base_bias = np.zeros(channels) if bias is None else bias.astype(np.float64)
        new_weight = weight.astype(np.float64)
        if user.op_type == "Mul":
            new_weight = new_weight * per_channel.reshape(
                _common.channel_axis_shape(weight.ndim, channels)
            )
            new_bias = base_bias * per_channel
        else:
            new_bias = base_bias + per_channel
        result = user.outputs[0]
        _common.set_conv_weights(
            conv, maker, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype)
        )
        # The Conv output is not a graph output (single_user), so this always succeeds.
        editing.replace_value(result, conv.outputs[0])
        editing.remove_node(user)
        _common.drop_if_unused(other)
        return True


def _per_channel(constant: np.ndarray, out_rank: int, channels: int) -> np.ndarray | None:
    """The constant as a float64 [C] vector, or None when it is not per output channel."""
    if constant.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - constant.ndim) + constant.shape
    for axis, size in enumerate(shape):
        if axis == 1:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    vector = constant.astype(np.float64).reshape(-1)
    return np.broadcast_to(vector, (channels,)).copy()
