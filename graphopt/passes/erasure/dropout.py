"""Inference-mode Dropout removal."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.registry import GraphPass, Stage, register


def _is_inference(node: ir.Node, opset: int) -> bool:
    """True when this Dropout passes its input through unchanged at inference."""
    if opset < 7:
        # Dropout-1/6 only skip the random mask when is_test is set.
        return bool(editing.attribute(node, "is_test", 0))
    if opset < 12:
        return True  # Dropout-7..11 is a no-op in inference
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is None:
        return True
    mode = editing.constant_array(training)
    if mode is None or mode.size != 1:
        return False
    if not bool(mode.item()):
        return True
    ratio = editing.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return ratio is not None and ratio.size == 1 and float(ratio.item()) == 0.0


def _mask_needed(node: ir.Node) -> bool:
    if len(node.outputs) < 2:
        return False
    mask = node.outputs[1]
    return bool(mask.uses()) or mask.is_graph_output()


@register
class DropoutPass(GraphPass):
    """Remove inference-mode Dropout (a used mask becomes ConstantOfShape(1)); refuse training."""

    name = "dropout"
    ops = frozenset(("Dropout",))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        opset = editing.opset_version(model)
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, "Dropout") or not _is_inference(node, opset):
                continue
            if _mask_needed(node) and not self._replace_mask(node, opset):
                continue
            if editing.bypass(node):
                hits += 1
        return hits

    def _replace_mask(self, node: ir.Node, opset: int) -> bool:
        """Feed the mask's users an all-true (all-one) mask of the data's shape."""
        mask = node.outputs[1]
        if opset < 12:
            # Dropout-7..11 leave the inference mask undefined ("not filled"): ONNX Runtime
            # returns zeros/False, where Dropout-12+ define all-true. No constant is the
            # model's, so a read mask keeps the node.
            return False
        dtype = ir.DataType.BOOL
        one = np.ones((1,), dtype=dtype.numpy())
        shape = ir.node("Shape", [node.inputs[0]])
        fill = ir.node("ConstantOfShape", [shape.outputs[0]], attributes={"value": ir.tensor(one)})
        fill.outputs[0].type = ir.TensorType(dtype)
        fill.outputs[0].shape = mask.shape
        editing.insert_before(node, [shape, fill])
        if not editing.replace_value(mask, fill.outputs[0]):
            editing.remove_node(fill)
            editing.remove_node(shape)
            return False
        return True
