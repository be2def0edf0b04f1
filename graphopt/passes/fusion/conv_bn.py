"""Conv + BatchNormalization (inference form) folded into the Conv's weight and bias.

BN(y) = (y - mean) * gamma / sqrt(var + eps) + beta is an affine map per output channel, so
with s = gamma / sqrt(var + eps): W' = W * s (over the output-channel axis, which is axis 0
of a Conv weight for every group count and spatial rank) and b' = (b - mean) * s + beta.

onnxscript's ``fuse_batchnorm_into_conv_rule`` does the same arithmetic but does not refuse a
BN in training mode (``training_mode=1``, or the extra running-mean/var outputs before
opset 14), the legacy ``spatial=0`` form, non-float dtypes, or params of the wrong shape,
and it overwrites the Conv's weight under its old name; hence this small rewrite of our own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register


@register
class FuseConvBatchNormPass(GraphPass):
    """Fold inference BatchNormalization into the Conv before it; refuses training BN, shared Conv.

    Also refuses non-constant or wrongly shaped params and non-float dtypes.
    """

    name = "fuse-conv-bn"
    ops = frozenset(("BatchNormalization",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        maker = _common.WeightMaker(model)
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                if editing.is_op(node, "Conv"):
                    _give_each_bn_its_conv(node)
            for node in list(graph):
                if editing.is_op(node, "BatchNormalization") and self._fuse(node, maker):
                    hits += 1
        return hits

    def _fuse(self, bn: ir.Node, maker: _common.WeightMaker) -> bool:
        if len(bn.inputs) != 5 or bn.inputs[0] is None:
            return False
        conv = bn.inputs[0].producer()
        if conv is None or not editing.is_op(conv, "Conv") or conv.graph is not bn.graph:
            return False
        # The Conv's output must feed only this BN, or the other readers would see BN applied.
        if editing.single_user(conv.outputs[0]) is not bn:
            return False
        weights = _common.conv_weights(conv)
        if weights is None:
            return False
        weight, bias = weights
        channels = weight.shape[0]
        # None for training mode, spatial=0, used training outputs, bad params, var+eps <= 0.
        affine = _common.bn_scale_shift(bn, channels, weight.dtype)
        if affine is None:
            return False
        scale, shift = affine
        base_bias = np.zeros(channels) if bias is None else bias.astype(np.float64)
        new_weight = weight.astype(np.float64) * scale.reshape(
            _common.channel_axis_shape(weight.ndim, channels)
        )
        new_bias = base_bias * scale + shift
        result = bn.outputs[0]
        _common.set_conv_weights(
            conv, maker, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype)
        )
        if not editing.replace_value(result, conv.outputs[0]):
            return False  # cannot happen: the Conv output is neither input nor output
        param_values = list(bn.inputs[1:])
        editing.remove_node(bn)
        for value in param_values:
            _common.drop_if_unused(value)
        return True


def _is_inference_form(bn: ir.Node) -> bool:
    if editing.attribute(bn, "training_mode", 0):
        return False
    # opset < 9: spatial=0 means per-activation statistics, not per channel
    if not editing.attribute(bn, "spatial", 1):
        return False
    # Before opset 14 the training statistics were optional extra outputs.
    return all(not out.uses() and not out.is_graph_output() for out in bn.outputs[1:])


def _give_each_bn_its_conv(conv: ir.Node) -> None:
    """When a Conv feeds only inference BNs (several), give each BN its own copy of the Conv.

    CSE merges identical Convs that read the same input; when their BNs differ, one shared
    Conv + k BNs (k + 1 nodes) becomes k fused Convs. Any other reader keeps the Conv whole.
    """
    output = conv.outputs[0]
    uses = output.uses()
    if len(uses) < 2 or output.is_graph_output() or len(conv.outputs) != 1:
        return
    readers = [use.node for use in uses]
    if len({id(n) for n in readers}) != len(readers):
        return
    if not all(
        editing.is_op(n, "BatchNormalization") and use.idx == 0 and _is_inference_form(n)
        for n, use in zip(readers, uses, strict=True)
    ):
        return
    if _common.conv_weights(conv) is None:
        return
    for reader in readers[1:]:
        copy = ir.Node(
            conv.domain,
            conv.op_type,
            list(conv.inputs),
            attributes=list(conv.attributes.values()),
            overload=conv.overload,
            version=conv.version,
            name=f"{conv.name or 'conv'}_for_{reader.name or 'bn'}",
        )
        copy.outputs[0].type = output.type
        copy.outputs[0].shape = output.shape
        editing.insert_after(conv, [copy])
        reader.replace_input_with(0, copy.outputs[0])
