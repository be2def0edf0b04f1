"""What FLOPs formulas are written in: a node's :class:`Cost`, the FLOPs per element of
normalizations and the like (:data:`PER_ELEMENT`), and the node's static dims, read through
helpers that raise :class:`UnknownShape` when a dim the formula needs is not known.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import onnx_ir as ir

from graphopt.analysis.shapes import static_shape

# FLOPs per output element.
PER_ELEMENT = {
    "BatchNormalization": 2,
    "InstanceNormalization": 5,
    "LayerNormalization": 5,
    "GroupNormalization": 5,
    "RMSNormalization": 4,
    "SimplifiedLayerNormalization": 4,
    "LpNormalization": 3,
    # (x - mean) / sqrt(var): mean, subtract, square and mean, divide (the sqrt per row).
    "MeanVarianceNormalization": 5,
    "Softmax": 3,
    "LogSoftmax": 4,
    "Hardmax": 1,
    "QuantizeLinear": 2,
    "DequantizeLinear": 2,
    "DynamicQuantizeLinear": 3,
}


def lrn_per_element(size: int) -> int:
    """LRN: the square and add of each of the ``size`` channels of the window, then the
    scale by alpha / size, add of bias, power by beta and division."""
    return 2 * size + 4


class Cost(NamedTuple):
    """FLOPs of one node, and the multiply-adds among them (2 FLOPs each)."""

    flops: int
    macs: int = 0


class UnknownShape(Exception):
    """A dim the formula needs is not known (the node is listed as *unknown shape*)."""


def known_shape(value: ir.Value | None) -> tuple[int, ...]:
    shape = static_shape(value)
    if shape is None:
        raise UnknownShape
    return shape


def in_shape(node: ir.Node, index: int) -> tuple[int, ...]:
    return known_shape(node.inputs[index] if index < len(node.inputs) else None)


def out_shape(node: ir.Node) -> tuple[int, ...]:
    return known_shape(node.outputs[0])


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def int_list(node: ir.Node, name: str) -> list[int]:
    attr = node.attributes.get(name)
    return list(attr.value) if attr is not None else []


def has_input(node: ir.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index] is not None
