"""Zero Pad on spatial axes folded into the following Conv's ``pads``.

A Conv's own padding is zero padding of its input, so Conv(Pad(x)) with a constant-mode,
zero-valued, non-negative Pad that leaves batch and channel axes alone equals Conv(x) with
the Pad's amounts added to the Conv's pads. Only Convs with ``auto_pad`` NOTSET qualify (the
SAME_* modes compute their padding from the padded input size).

onnxscript's ``fuse_pad_into_conv_rule`` checks the same conditions for opset ≥ 11 Pads, but
reads ``inputs[1]`` unconditionally (an opset < 11 Pad keeps its pads in an attribute and its
fill value in ``value``) and needs the input's shape; this pass reads both forms and takes the
rank from the Conv weight.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register


@register
class FusePadConvPass(GraphPass):
    """Fold zero constant Pad on spatial axes into Conv pads; refuses other modes, auto_pad.

    Also refuses non-zero fill, negative pads and padding of batch/channel axes.
    """

    name = "fuse-pad-conv"
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        opset = _common.default_opset(model)
        hits = 0
        for graph in _common.all_graphs(model):
            for pad in list(graph):
                if not editing.is_op(pad, "Pad") or pad.outputs[0].is_graph_output():
                    continue
                # Every Conv reading the padded tensor as its data input can take the padding;
                # the Pad goes once nobody else reads it.
                for use in list(pad.outputs[0].uses()):
                    conv = use.node
                    foldable = use.idx == 0 and editing.is_op(conv, "Conv")
                    if foldable and conv.graph is graph and self._fuse(pad, conv, opset):
                        hits += 1
                editing.remove_if_dead(pad)
        return hits

    def _fuse(self, pad: ir.Node, conv: ir.Node, opset: int) -> bool:
        if editing.attribute(conv, "auto_pad", "NOTSET") != "NOTSET":
            return False
        if editing.attribute(pad, "mode", "constant") != "constant":
            return False
        rank = _conv_rank(conv)
        if rank is None:
            return False
        amounts = _pad_amounts(pad, rank, opset)
        if amounts is None or len(amounts) != 2 * rank or any(p < 0 for p in amounts):
            return False
        if amounts[0] or amounts[1] or amounts[rank] or amounts[rank + 1]:
            return False  # batch or channel padding changes what the Conv sees
        spatial = rank - 2
        added = amounts[2:rank] + amounts[rank + 2 :]
        current = editing.attribute(conv, "pads", None) or [0] * (2 * spatial)
        if len(current) != 2 * spatial:
            return False
        new_pads = [int(a) + int(b) for a, b in zip(current, added, strict=True)]
        conv.attributes["pads"] = ir.AttrInt64s("pads", new_pads)
        conv.replace_input_with(0, pad.inputs[0])
        return True


def _conv_rank(conv: ir.Node) -> int | None:
    """Rank of the Conv's data input, from its weight (same rank by definition)."""
    if len(conv.inputs) < 2 or conv.inputs[1] is None:
        return None
    weight = conv.inputs[1]
    tensor = None if weight.is_graph_input() else ir.convenience.get_const_tensor(weight)
    if tensor is not None:
        return len(tensor.shape)
    if weight.shape is not None:
        return len(weight.shape)
    data = conv.inputs[0]
    return len(data.shape) if data is not None and data.shape is not None else None


def _pad_amounts(pad: ir.Node, rank: int, opset: int) -> list[int] | None:
    """The Pad's [begin..., end...] amounts over all ``rank`` axes, or None when they (or a
    non-zero fill value) are not known constants."""
    if opset < 11:
        pads = editing.attribute(pad, "pads", None)
        if pads is None or float(editing.attribute(pad, "value", 0.0)) != 0.0:
            return None
        return [int(p) for p in pads]
    inputs = list(pad.inputs) + [None] * (4 - len(pad.inputs))
    pads = editing.constant_array(inputs[1])
    if pads is None or pads.ndim != 1:
        return None
    if inputs[2] is not None:
        fill = editing.constant_array(inputs[2])
        if fill is None or fill.size != 1 or fill.reshape(()).item() != 0:
            return None
    if inputs[3] is None:
        return [int(p) for p in pads]
    axes = editing.constant_array(inputs[3])
    if axes is None or axes.ndim != 1 or len(pads) != 2 * len(axes):
        return None
    full = [0] * (2 * rank)
    seen: set[int] = set()
    for i, axis in enumerate(int(a) for a in axes):
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank or axis in seen:
            return None
        seen.add(axis)
        full[axis] = int(pads[i])
        full[axis + rank] = int(pads[i + len(axes)])
    return full
