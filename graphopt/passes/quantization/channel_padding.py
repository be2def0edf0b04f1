"""Pad a stem Conv's input channels to the multiple ONNX Runtime's fast int8 conv needs.

ORT's x86 QLinearConv has two paths for symmetric int8 weights: MLAS's direct "ConvSym"
kernels, and im2col + an int8 GEMM. The direct path needs the input channels per group to be
a multiple of 4 and at least 16 output channels, a multiple of 4 (``MlasConvSymPackWSize``,
``KernelInputChannelAlignment``). The first Conv of an image model reads 3 channels, so it
takes the GEMM path: on ResNet-50 (Zen 5, 1 thread) that one layer took 7.6% of the int8
time at a third of the other layers' speed. With a zero fourth channel (the float input
padded before it is quantized, a zero weight slice) the direct path applies: 799 -> 618 us
for 4/3 of the multiply-adds, 2.4% of the whole model. Exact: the padded channel is 0.0,
quantizes to the zero point, and meets zero weights.

A stride-2 stem with static, even height and width is folded by SpaceToDepth instead
(:mod:`.stem_space_to_depth`: 12 channels, and fewer kernel taps); this pads the rest. Only
where the Conv reads a graph input (a float Pad there costs ~5% of the layer's time; deeper in
a quantized graph it would sit between a DequantizeLinear and a QuantizeLinear), for
``--target ort``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import (
    NameTable,
    add_initializer,
    attribute,
    constant_array,
    insert_before,
    is_op,
    unique_name,
)

# MLAS's ConvSym conditions on x86 (convsym.cpp): input channels a multiple of this, output
# channels a multiple of it and at least OUTPUT_PACK.
CHANNEL_ALIGN = 4
OUTPUT_PACK = 16


@dataclass
class PaddedConv:
    """One Conv whose input channels were padded: its float input ``x`` now reaches it through
    a Pad as ``padded``; its weight ``weight`` became ``padded_weight`` (``extra`` zero
    channels appended)."""

    node: ir.Node
    x: ir.Value
    padded: ir.Value
    weight: str
    padded_weight: str
    channels: tuple[int, int]

    @property
    def extra(self) -> int:
        return self.channels[1] - self.channels[0]

    def describe(self) -> str:
        return f"{self.node.name} ({self.channels[0]} -> {self.channels[1]})"


def zero_channels(array: np.ndarray, extra: int, axis: int) -> np.ndarray:
    """``array`` with ``extra`` zero entries appended along ``axis`` (a weight's input
    channels, a per-channel vector): what padding a Conv's input does to each of them."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, extra)
    return np.pad(array, widths)


def input_convs(model: ir.Model, excluded: Callable[[ir.Node], bool]) -> list[ir.Node]:
    """The Convs of ``model``'s main graph that read a graph input (the stems), less the
    ``excluded`` ones: a list, so that callers may rewrite while walking it."""
    inputs = {id(v) for v in model.graph.inputs}
    return [
        node
        for node in model.graph
        if is_op(node, "Conv")
        and not excluded(node)
        and len(node.inputs) >= 2
        and node.inputs[0] is not None
        and id(node.inputs[0]) in inputs
    ]


def pad_stem_channels(
    model: ir.Model, excluded: Callable[[ir.Node], bool] = lambda node: False
) -> list[PaddedConv]:
    """Pad every eligible Conv of ``model`` in place (``excluded(node)``: leave it)."""
    graph = model.graph
    padded = []
    for node in input_convs(model, excluded):
        weight = constant_array(node.inputs[1])
        if weight is None or weight.dtype != np.float32 or weight.ndim < 3:
            continue
        if attribute(node, "group", 1) != 1 or attribute(node, "auto_pad", "NOTSET") != "NOTSET":
            continue
        c_out, c_in = weight.shape[:2]
        extra = -c_in % CHANNEL_ALIGN
        if extra == 0 or c_out < OUTPUT_PACK or c_out % CHANNEL_ALIGN:
            continue
        x = node.inputs[0]
        if x.shape is None or len(x.shape) != weight.ndim or x.shape[1] != c_in:
            continue
        if x.type is None or x.type.dtype != ir.DataType.FLOAT:
            continue
        new_weight = add_initializer(
            graph, f"{node.name}_weight_padded", zero_channels(weight, extra, axis=1)
        )
        pads = np.zeros(2 * weight.ndim, np.int64)
        pads[weight.ndim + 1] = extra  # the end of the channel axis
        pad_node = ir.node(
            "Pad",
            [x, add_initializer(graph, f"{node.name}_channel_pads", pads)],
            attributes={"mode": "constant"},
            name=NameTable(graph).take(f"{node.name}_pad_channels"),
        )
        out = pad_node.outputs[0]
        out.name = unique_name(graph, f"{x.name}_padded_{c_in + extra}")
        out.type = x.type
        out.shape = ir.Shape([*x.shape.dims[:1], c_in + extra, *x.shape.dims[2:]])
        insert_before(node, [pad_node])
        old_weight = node.inputs[1]
        node.replace_input_with(0, out)
        node.replace_input_with(1, new_weight)
        if not old_weight.uses() and old_weight.name in graph.initializers:
            del graph.initializers[old_weight.name]
        padded.append(
            PaddedConv(node, x, out, old_weight.name, new_weight.name, (c_in, c_in + extra))
        )
    return padded


def note(padded: list[PaddedConv]) -> str:
    """The record's line for the Convs that stay padded."""
    return "input channels zero-padded to a multiple of 4 for ORT's direct int8 conv: " + (
        ", ".join(p.describe() for p in padded)
    )


__all__ = [
    "CHANNEL_ALIGN",
    "OUTPUT_PACK",
    "PaddedConv",
    "input_convs",
    "note",
    "pad_stem_channels",
    "zero_channels",
]
