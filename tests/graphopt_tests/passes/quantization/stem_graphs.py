"""The stem graph of the layout-rewrite tests (channel padding, SpaceToDepth folding)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt_tests.helpers import make_model, tensor_info


def stem(
    kernel: tuple[int, int] = (3, 3),
    pads: tuple[int, int, int, int] = (1, 1, 1, 1),
    size: tuple[int | str, int | str] = (12, 12),
    c_in: int = 3,
    c_out: int = 16,
    strides: tuple[int, int] = (2, 2),
    group: int = 1,
    dilations: tuple[int, int] = (1, 1),
) -> ir.Model:
    """x [N, c_in, H, W] -> Conv (the stem) -> Relu -> Conv 1x1 -> y."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.standard_normal((c_out, c_in // group, *kernel)).astype(np.float32),
        "b1": rng.standard_normal(c_out).astype(np.float32),
        "w2": rng.standard_normal((8, c_out, 1, 1)).astype(np.float32) * 0.3,
    }
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w1", "b1"],
            ["c1"],
            name="stem",
            kernel_shape=list(kernel),
            strides=list(strides),
            pads=list(pads),
            group=group,
            dilations=list(dilations),
        ),
        helper.make_node("Relu", ["c1"], ["a1"], name="act"),
        helper.make_node("Conv", ["a1", "w2"], ["y"], name="head"),
    ]
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", c_in, *size])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 8, "h", "w"])],
        inits,
    )
