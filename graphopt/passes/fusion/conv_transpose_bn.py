"""ConvTranspose + BatchNormalization (inference form) or per-channel Mul/Add, folded in.

Exporters that keep the bias as a separate Add (paddle2onnx: ConvTranspose → Add → BN)
need the Add folded into the bias first, so ``fuse-conv-transpose-affine`` runs before
``fuse-conv-transpose-bn``. A per-output-channel constant broadcasts as a scalar, [C, 1..]
or [1, C, 1..] against [N, C, *spatial]; anything varying over batch or space is refused.

A ConvTranspose weight is laid out [C_in, C_out / group, k...]: output channel
``g * (C_out / group) + j`` reads column ``j`` of the rows of group ``g``. Scaling output
channels therefore scales axis 1 *per group*: the weight is viewed as
[group, C_in / group, C_out / group, k...] and multiplied by the BN scale viewed as
[group, 1, C_out / group, 1...]. The bias ([C_out]) becomes (b - mean) * s + beta.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register


@register
class FuseConvTransposeAffinePass(GraphPass):
    """Fold Mul/Add by a per-channel constant after ConvTranspose; refuses spatial constants.

    Also refuses a shared ConvTranspose output and non-constant or non-float weights.
    """

    name = "fuse-conv-transpose-affine"
    ops = frozenset(("ConvTranspose",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        return _common.fold_into_each(model, "ConvTranspose", self._fuse_next)

    def _fuse_next(self, convt: ir.Node, maker: _common.WeightMaker) -> bool:
        successor = _common.affine_successor(convt)
        weights = _weights(convt)
        if successor is None or weights is None:
            return False
        user, other = successor
        weight, bias, group = weights
        channels = weight.shape[1] * group
        constant = editing.constant_array(other)
        if constant is None or constant.dtype != weight.dtype:
            return False
        vector = _per_channel(constant, weight.ndim, channels)
        if vector is None:
            return False
        base = np.zeros(channels) if bias is None else bias.astype(np.float64)
        if user.op_type == "Mul":
            new_weight = _scale_output_channels(weight, vector, group)
            new_bias = base * vector
        else:
            new_weight, new_bias = weight, base + vector
        _common.set_conv_weights(convt, maker, new_weight, new_bias.astype(weight.dtype))
        editing.replace_value(user.outputs[0], convt.outputs[0])  # not an output: single_user
        editing.remove_node(user)
        _common.drop_if_unused(other)
        return True


@register
class FuseConvTransposeBatchNormPass(GraphPass):
    """Fold inference BatchNormalization into the ConvTranspose before it; refuses training BN.

    Also refuses a shared ConvTranspose output, non-constant or wrongly shaped weights/params.
    """

    name = "fuse-conv-transpose-bn"
    ops = frozenset(("ConvTranspose",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        maker = _common.WeightMaker(model)
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                if editing.is_op(node, "BatchNormalization") and self._fuse(node, maker):
                    hits += 1
        return hits

    def _fuse(self, bn: ir.Node, maker: _common.WeightMaker) -> bool:
        if len(bn.inputs) != 5 or bn.inputs[0] is None:
            return False
        convt = bn.inputs[0].producer()
        if convt is None or not editing.is_op(convt, "ConvTranspose"):
            return False
        if convt.graph is not bn.graph or editing.single_user(convt.outputs[0]) is not bn:
            return False
        weights = _weights(convt)
        if weights is None:
            return False
        weight, bias, group = weights
        channels = weight.shape[1] * group
        affine = _common.bn_scale_shift(bn, channels, weight.dtype)
        if affine is None:
            return False
        scale, shift = affine
        new_weight = _scale_output_channels(weight, scale, group)
        base = np.zeros(channels) if bias is None else bias.astype(np.float64)
        new_bias = (base * scale + shift).astype(weight.dtype)
        result = bn.outputs[0]
        _common.set_conv_weights(convt, maker, new_weight, new_bias)
        editing.replace_value(result, convt.outputs[0])  # not an output: single_user above
        params = list(bn.inputs[1:])
        editing.remove_node(bn)
        for value in params:
            _common.drop_if_unused(value)
        return True


def _weights(convt: ir.Node) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """The constant float weight, bias (None when absent) and group count, or None."""
    if len(convt.inputs) < 2:
        return None
    weight = editing.constant_array(convt.inputs[1])
    if not _common.is_float_array(weight) or weight.ndim < 3:
        return None
    group = int(editing.attribute(convt, "group", 1))
    if group < 1 or weight.shape[0] % group:
        return None
    bias_value = convt.inputs[2] if len(convt.inputs) > 2 else None
    if bias_value is None:
        return weight, None, group
    bias = editing.constant_array(bias_value)
    if bias is None or bias.dtype != weight.dtype or bias.shape != (weight.shape[1] * group,):
        return None
    return weight, bias, group


def _scale_output_channels(weight: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """``weight`` [C_in, C_out / group, k...] with output channel o scaled by scale[o]."""
    cin, per_group = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    grouped = weight.astype(np.float64).reshape(group, cin // group, per_group, *kernel)
    grouped = grouped * scale.reshape(group, 1, per_group, *(1,) * len(kernel))
    return grouped.reshape(weight.shape).astype(weight.dtype)


def _per_channel(constant: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """The constant as a float64 [C] vector when it varies along axis 1 only, else None."""
    if constant.ndim > rank:
        return None
    shape = (1,) * (rank - constant.ndim) + constant.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()
