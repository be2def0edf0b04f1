"""EoRA for a 2-D Conv: the layer's geometry and the Conv pair its path is built from.

A Conv ``[Cout, Cin, kh, kw]`` (group 1) is the layer ``y = P·Wᵀ`` on its im2col patches
``P`` (one row per output position), with ``W[Cout, kh·kw·Cin]`` in the canonical (ky, kx,
channel) order of :mod:`graphopt.passes.sparsity.layers`; its input Gram is the patches'
(:func:`graphopt.passes.sparsity.statistics.gather` gathers it). A rank-r path
``B[Cout, r]·A[r, K]`` then runs as two Convs, as factorization builds them
(:mod:`graphopt.passes.factorization.surgery`): ``Conv(x, A[r, Cin, kh, kw])`` with the
layer's kernel, strides, pads, dilations (and auto_pad), then a 1×1 ``Conv(·, B[Cout, r, 1,
1])``; the sum goes onto the layer's output, so its bias and everything after it are
unchanged. Grouped (depthwise) and non-2-D Convs get no path: their patches are per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import attribute

# The attributes that place a Conv's kernel on its input: the path's first Conv copies them.
SPATIAL = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


@dataclass
class ConvGeometry:
    """What the path's first Conv needs of the layer: its spatial attributes and kernel."""

    attributes: dict[str, ir.Attr]
    channels: int  # Cin
    kernel: tuple[int, int]  # (kh, kw)
    domain: str = ""

    @property
    def features(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1]

    def first_weight(self, a: np.ndarray) -> np.ndarray:
        """``A[r, K]`` (canonical order) as the first Conv's ``[r, Cin, kh, kw]``."""
        rank = a.shape[0]
        return np.moveaxis(a.reshape(rank, *self.kernel, self.channels), -1, 1)

    def second_weight(self, b: np.ndarray) -> np.ndarray:
        """``B[Cout, r]`` as the 1×1 Conv's ``[Cout, r, 1, 1]``."""
        return b.reshape(*b.shape, 1, 1)

    def nodes(
        self,
        x: ir.Value,
        first: ir.Value,
        second: ir.Value,
        down: ir.Value,
        up: ir.Value,
        names: tuple[str, str],
    ) -> list[ir.Node]:
        """The two Convs ``x → down → up``: the layer's placement, then 1×1."""
        # Attributes are plain values: the layer's own objects can be shared with the path.
        attributes = list(self.attributes.values())
        return [
            ir.Node(
                self.domain,
                "Conv",
                inputs=[x, first],
                outputs=[down],
                attributes=attributes,
                name=names[0],
            ),
            ir.Node(
                self.domain,
                "Conv",
                inputs=[down, second],
                outputs=[up],
                attributes=[ir.AttrInt64s("kernel_shape", [1, 1])],
                name=names[1],
            ),
        ]


def geometry(node: ir.Node, shape: tuple[int, ...]) -> tuple[ConvGeometry | None, str]:
    """``node``'s geometry for a path (``shape``: its weight's ``[Cout, Cin/g, kh, kw]``),
    or (None, why there is none)."""
    groups = int(attribute(node, "group", 1))
    if groups != 1:
        kind = "depthwise" if shape[1] == 1 else "grouped"
        return None, (
            f"{kind} Conv (group {groups}): its patches are per group, a Cin-wide path would "
            "mix groups"
        )
    if len(shape) != 4:
        return None, f"{len(shape) - 2}-D Conv: paths are built for 2-D convolutions only"
    attributes = {key: node.attributes[key] for key in SPATIAL if key in node.attributes}
    return ConvGeometry(attributes, int(shape[1]), (int(shape[2]), int(shape[3])), node.domain), ""


def factorized(first: ir.Node, outputs: int) -> tuple[ConvGeometry | None, str]:
    """The geometry of a Conv that factorization split into ``first`` (the layer's kernel,
    strides, pads and dilations, weight ``[r, Cin, kh, kw]``) and a 1×1 Conv with
    ``outputs`` channels: the original layer's, for a path beside the pair."""
    weight = first.inputs[1] if len(first.inputs) > 1 else None
    shape = None if weight is None else weight.shape
    if shape is None and weight is not None and weight.const_value is not None:
        shape = weight.const_value.shape
    if shape is None or not shape.is_static() or len(shape) < 3:
        return None, "the factorized Conv's first weight has no static shape"
    return geometry(first, (outputs, *(int(d) for d in shape.dims[1:])))


def canonical(weight: np.ndarray) -> np.ndarray:
    """A stored Conv weight ``[Cout, Cin, kh, kw]`` as ``W[Cout, kh·kw·Cin]``."""
    return np.moveaxis(weight, 1, -1).reshape(weight.shape[0], -1)


def output_rows(y: np.ndarray) -> np.ndarray:
    """A Conv output ``[B, Cout, OH, OW]`` as rows in im2col's (b, oh, ow) order."""
    return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
