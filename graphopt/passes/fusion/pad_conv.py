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
    ops = frozenset(("Pad",))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        # Every Conv reading the padded tensor as its data input can take the padding.
        return _common.fold_pad_into_readers(model, ("Conv",), self._fuse)

    def _fuse(self, pad: ir.Node, conv: ir.Node, opset: int) -> bool:
        if editing.attribute(conv, "auto_pad", "NOTSET") != "NOTSET":
            return False
        rank = _conv_rank(conv)
        spec = None if rank is None else _common.pad_spec(pad, rank, opset)
        if spec is None or spec[1] != 0.0:
            return False  # other modes, unknown amounts or a non-zero fill
        amounts = spec[0]
        if any(p < 0 for p in amounts):
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
