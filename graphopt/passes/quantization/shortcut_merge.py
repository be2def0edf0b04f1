"""Merge two pointwise Convs whose outputs are summed into one Conv over both inputs.

A residual block with a projection shortcut (ResNet, ResNeXt, RegNet, ...) ends in
``Add(Conv1x1(h), Conv1x1(x))``: the branch's last Conv and the shortcut's, the latter often
with stride 2. ONNX Runtime runs that in int8 as two QLinearConvs and a QLinearAdd, each a
pass over the output plus a requantization. One Conv over ``Concat(h, x)`` with the weights
side by side computes the same sum: same multiply-adds, one pass, no Add. A strided shortcut
reads its input through MaxPool(kernel 1, the same strides), which subsamples exactly as the
strided 1x1 Conv did. Measured on int8 ResNet-50 (Zen 5, 1 thread, 4 such blocks): 1.5-1.9%
of the model's time. Only where both inputs together have no more channels than the output
(a bottleneck's 4x expansion): the Concat copies both inputs, which costs more than the saved
passes when they are as wide as the output (RegNetY-400MF: 0.5-2.2% slower merged).

Exact in float. In int8 it is a different quantization, not a rounding of this one: the
concatenated input has one scale where ``h`` and ``x`` had one each, and each output channel
one weight scale where the two Convs had one each. The rewrite runs before calibration, so
ranges, rounding and the fidelity report all see the merged Conv. For ``--target ort`` (static
int8); TensorRT fuses the residual Add into the Conv itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import (
    NameTable,
    attribute,
    constant_array,
    fill_missing_shapes,
    insert_before,
    is_op,
    remove_node,
    take_over,
)


@dataclass
class MergedPair:
    """The Add and the two Convs it summed, now one Conv named ``name``."""

    add: str
    convs: tuple[str, str]
    name: str

    def describe(self) -> str:
        return f"{self.convs[0]} + {self.convs[1]}"


def merge_summed_pointwise_convs(
    model: ir.Model, excluded: Callable[[ir.Node], bool] = lambda node: False
) -> list[MergedPair]:
    """Merge every eligible ``Add(Conv1x1, Conv1x1)`` of ``model``'s main graph in place."""
    graph = model.graph
    merged = []
    if any(_adds_two_convs(node) for node in graph):
        # The merge checks that both Convs give the same shape; fill in any shape not known.
        fill_missing_shapes(model)
    names = NameTable(graph)  # node and value names: records and placements key on them
    for node in list(graph):
        if not is_op(node, "Add") or excluded(node):
            continue
        convs = _summed_convs(node)
        if convs is None or any(excluded(conv) for conv in convs):
            continue
        merged.append(_merge(graph, names, node, convs))
    return merged


def final_names(merged: list[MergedPair]) -> dict[str, str]:
    """Each merged node's name -> the Conv it is part of in the end (a merged Conv can be
    merged again: ``Add(Add(Conv, Conv), Conv)``)."""
    into = {old: pair.name for pair in merged for old in (pair.add, *pair.convs)}
    final = {}
    for old in into:
        name = into[old]
        while name in into:
            name = into[name]
        final[old] = name
    return final


def _adds_two_convs(node: ir.Node) -> bool:
    return is_op(node, "Add") and all(
        v is not None and v.producer() is not None and is_op(v.producer(), "Conv")
        for v in node.inputs
    )


def _pointwise(node: ir.Node | None) -> np.ndarray | None:
    """The [O, C, 1, 1] float weight of a plain pointwise Conv, else None."""
    if node is None or not is_op(node, "Conv") or len(node.inputs) < 2:
        return None
    if attribute(node, "group", 1) != 1 or attribute(node, "auto_pad", "NOTSET") != "NOTSET":
        return None
    if any(attribute(node, "pads", [0])) or any(d != 1 for d in attribute(node, "dilations", [1])):
        return None
    weight = constant_array(node.inputs[1])
    if weight is None or weight.dtype != np.float32 or weight.shape[2:] != (1, 1):
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and constant_array(bias) is None:
        return None
    out = node.outputs[0]
    if len(out.uses()) != 1 or out.is_graph_output():
        return None
    return weight


def _summed_convs(add: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    if len(add.inputs) != 2 or any(v is None for v in add.inputs):
        return None
    producers = [v.producer() for v in add.inputs]
    if producers[0] is producers[1]:
        return None
    weights = [_pointwise(p) for p in producers]
    if any(w is None for w in weights) or weights[0].shape[0] != weights[1].shape[0]:
        return None
    if weights[0].shape[1] + weights[1].shape[1] > weights[0].shape[0]:
        # The Concat copies both inputs; the merge saves passes over the output. Worth it
        # where the inputs are narrower than the output (a bottleneck's expansion, ResNet-50:
        # 1.5-1.9% faster), not where they are as wide (RegNetY-400MF: 0.5-2.2% slower).
        return None
    shapes = [v.shape for v in add.inputs]
    # Same output shapes, every dim known or the same named symbol: no broadcasting in the
    # Add, and the two (subsampled) inputs cover the same pixels. Unnamed symbolic dims
    # compare equal to each other, so they prove nothing.
    if any(s is None for s in shapes) or list(shapes[0].dims) != list(shapes[1].dims):
        return None
    if not all(isinstance(d, int) or d.value is not None for d in shapes[0].dims):
        return None
    for p in producers:
        x = p.inputs[0]
        if x is None or x.type is None or x.type.dtype != ir.DataType.FLOAT:
            return None
    # The unstrided Conv first: the Concat keeps its input in front.
    producers.sort(key=lambda p: any(s != 1 for s in attribute(p, "strides", [1, 1])))
    return producers[0], producers[1]


def _merge(
    graph: ir.Graph, names: NameTable, add: ir.Node, convs: tuple[ir.Node, ir.Node]
) -> MergedPair:
    name = names.take(f"{convs[0].name}_merged")
    inputs, before = [], []
    for conv in convs:
        x = conv.inputs[0]
        strides = list(attribute(conv, "strides", [1, 1]))
        if any(s != 1 for s in strides):
            pool = ir.node(
                "MaxPool",
                [x],
                attributes={"kernel_shape": [1, 1], "strides": strides},
                name=names.take(f"{conv.name}_subsample"),
            )
            sub = pool.outputs[0]
            sub.name = names.take(f"{x.name}_subsampled")
            sub.type = x.type
            if x.shape is not None and conv.outputs[0].shape is not None:
                sub.shape = ir.Shape([*x.shape.dims[:2], *conv.outputs[0].shape.dims[2:]])
            before.append(pool)
            x = sub
        inputs.append(x)
    concat = ir.node("Concat", inputs, attributes={"axis": 1}, name=names.take(f"{name}_inputs"))
    joined = concat.outputs[0]
    joined.name = names.take(f"{name}_input")
    joined.type = inputs[0].type
    weights = [constant_array(c.inputs[1]) for c in convs]
    channels = [w.shape[1] for w in weights]
    if inputs[0].shape is not None:
        joined.shape = ir.Shape(
            [inputs[0].shape.dims[0], sum(channels), *convs[0].outputs[0].shape.dims[2:]]
        )
    bias = np.zeros(weights[0].shape[0], np.float32)
    for conv in convs:
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            bias = bias + constant_array(conv.inputs[2]).astype(np.float32)
    weight = names.add_initializer(graph, f"{name}_weight", np.concatenate(weights, axis=1))
    merged = ir.node(
        "Conv",
        [joined, weight, names.add_initializer(graph, f"{name}_bias", bias)],
        attributes={"kernel_shape": [1, 1]},
        name=name,
    )
    out = add.outputs[0]
    insert_before(add, [*before, concat, merged])
    # The merged Conv takes over the Add's output value (its name, type, shape and uses).
    merged_out = merged.outputs[0]
    merged_out.type, merged_out.shape = out.type, out.shape
    take_over(out, merged_out)
    pair = MergedPair(add.name, (convs[0].name, convs[1].name), name)
    remove_node(add)
    for conv in convs:
        old = [v for v in conv.inputs[1:] if v is not None]
        remove_node(conv)
        for value in old:
            if not value.uses() and value.name in graph.initializers:
                del graph.initializers[value.name]
    return pair


def note(merged: list[MergedPair]) -> str:
    """The record's line for the merged pairs."""
    return "summed pointwise Convs merged into one Conv over their concatenated inputs: " + (
        ", ".join(pair.describe() for pair in merged)
    )


__all__ = ["MergedPair", "final_names", "merge_summed_pointwise_convs", "note"]
