"""The demo model: a tiny CNN classifier full of the leftovers exporters typically emit.

Built with ``onnx.helper`` and seeded numpy only (no torch), so the README's first command
works on a bare install. Every leftover is there for a specific pass to remove:

* Identity and Dropout nodes (inference no-ops),
* Pad in front of a Conv (foldable into the Conv's ``pads``),
* Conv + BatchNormalization (foldable into the Conv weights),
* Shape→Gather→Unsqueeze→Concat→Reshape on a static dim (foldable to a constant shape),
* a constant subgraph (Div of two Constants; Transpose of a weight initializer),
* MatMul + Add on 2-D tensors (a Gemm) and a Transpose pair that cancels,
* duplicate initializers, a repeated subexpression, an unused initializer, a dead branch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.models.catalog import ModelSpec, register

DEMO_OPSET = 17
DEMO_IR_VERSION = 8
DEMO_INPUT = "input"
DEMO_OUTPUT = "logits"
DEMO_INPUT_SHAPE: tuple[int | str, ...] = ("N", 3, 32, 32)
NUM_CLASSES = 10
_SEED = 0


def make_demo() -> onnx.ModelProto:
    """The demo model as a checked ``ModelProto`` (deterministic: same bytes every call)."""
    rng = np.random.default_rng(_SEED)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def bn_params(prefix: str, channels: int) -> list[np.ndarray]:
        return [
            (1.0 + rand(channels, scale=0.1), f"{prefix}_gamma"),
            (rand(channels, scale=0.1), f"{prefix}_beta"),
            (rand(channels, scale=0.1), f"{prefix}_mean"),
            (np.abs(1.0 + rand(channels, scale=0.1)), f"{prefix}_var"),
        ]

    arrays: list[tuple[np.ndarray, str]] = [
        (np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads"),
        (rand(8, 3, 3, 3), "conv1_w"),
        (rand(8), "conv1_b"),
        *bn_params("bn1", 8),
        (rand(8, 8, 3, 3, scale=0.1), "conv2_w"),
        *bn_params("bn2", 8),
        # The same scalar stored twice, as exporters do for every use of a literal.
        (np.array(0.5, dtype=np.float32), "half_a"),
        (np.array(0.5, dtype=np.float32), "half_b"),
        (np.array(1, dtype=np.int64), "channel_axis"),
        (np.array([0], dtype=np.int64), "unsqueeze_axes"),
        (np.array([-1], dtype=np.int64), "minus_one"),
        # Stored transposed: the graph transposes it back at run time (a constant subgraph).
        (rand(NUM_CLASSES, 8, scale=0.3), "fc_w_t"),
        (rand(NUM_CLASSES, scale=0.1), "fc_b"),
        # Never used by any node.
        (rand(64), "unused_weight"),
    ]
    initializers = [numpy_helper.from_array(a, name) for a, name in arrays]

    def node(op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, outputs, name=name, **attrs)

    nodes = [
        node("Identity", [DEMO_INPUT], ["x"], "input_identity"),
        node("Pad", ["x", "pads"], ["x_padded"], "pad", mode="constant"),
        node("Conv", ["x_padded", "conv1_w", "conv1_b"], ["c1"], "conv1", kernel_shape=[3, 3]),
        node(
            "BatchNormalization",
            ["c1", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"],
            ["b1"],
            "bn1",
            epsilon=1e-5,
        ),
        node("Relu", ["b1"], ["r1"], "relu1"),
        node("Dropout", ["r1"], ["d1"], "dropout1"),
        node(
            "Conv",
            ["d1", "conv2_w"],
            ["c2"],
            "conv2",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        node(
            "BatchNormalization",
            ["c2", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"],
            ["b2"],
            "bn2",
            epsilon=1e-5,
        ),
        # Swish written twice over (a repeated subexpression), averaged with duplicate 0.5s.
        node("Sigmoid", ["b2"], ["s_a"], "sigmoid_a"),
        node("Sigmoid", ["b2"], ["s_b"], "sigmoid_b"),
        node("Mul", ["b2", "s_a"], ["swish_a"], "swish_a"),
        node("Mul", ["b2", "s_b"], ["swish_b"], "swish_b"),
        node("Mul", ["swish_a", "half_a"], ["half_swish_a"], "scale_a"),
        node("Mul", ["swish_b", "half_b"], ["half_swish_b"], "scale_b"),
        node("Add", ["half_swish_a", "half_swish_b"], ["act"], "average"),
        node("GlobalAveragePool", ["act"], ["pooled"], "pool"),
        # Flatten spelled the way the TorchScript exporter spells x.view(x.size(0), C)
        # with C read from the (static) channel dim.
        node("Shape", ["pooled"], ["pooled_shape"], "shape"),
        node("Gather", ["pooled_shape", "channel_axis"], ["channels"], "gather", axis=0),
        node("Unsqueeze", ["channels", "unsqueeze_axes"], ["channels_1d"], "unsqueeze"),
        node("Concat", ["minus_one", "channels_1d"], ["flat_shape"], "concat", axis=0),
        node("Reshape", ["pooled", "flat_shape"], ["flat"], "reshape"),
        # A Transpose pair that cancels out.
        node("Transpose", ["flat"], ["flat_t"], "transpose_a", perm=[1, 0]),
        node("Transpose", ["flat_t"], ["features"], "transpose_b", perm=[1, 0]),
        # Weight transposed at run time, then MatMul + Add (a Gemm).
        node("Transpose", ["fc_w_t"], ["fc_w"], "weight_transpose", perm=[1, 0]),
        node("MatMul", ["features", "fc_w"], ["fc_mm"], "fc_matmul"),
        node("Add", ["fc_mm", "fc_b"], ["fc_out"], "fc_add"),
        # Temperature computed from two Constants (a constant subgraph).
        helper.make_node(
            "Constant",
            [],
            ["t_num"],
            name="t_num",
            value=numpy_helper.from_array(np.array(3.0, dtype=np.float32)),
        ),
        helper.make_node(
            "Constant",
            [],
            ["t_den"],
            name="t_den",
            value=numpy_helper.from_array(np.array(2.0, dtype=np.float32)),
        ),
        node("Div", ["t_num", "t_den"], ["temperature"], "temperature"),
        node("Div", ["fc_out", "temperature"], ["scaled"], "apply_temperature"),
        node("Dropout", ["scaled"], ["scaled_d"], "dropout2"),
        node("Identity", ["scaled_d"], [DEMO_OUTPUT], "output_identity"),
        # A dead branch: computed, never consumed.
        node("Relu", ["pooled"], ["dead_relu"], "dead_relu"),
        node("Sigmoid", ["dead_relu"], ["dead_sigmoid"], "dead_sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "graphopt_demo",
        [helper.make_tensor_value_info(DEMO_INPUT, TensorProto.FLOAT, list(DEMO_INPUT_SHAPE))],
        [helper.make_tensor_value_info(DEMO_OUTPUT, TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", DEMO_OPSET)],
        ir_version=DEMO_IR_VERSION,
        producer_name="graphopt.models.demo",
        doc_string="graphopt demo: a small CNN classifier with typical exporter leftovers.",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def write_demo(path: str | os.PathLike) -> Path:
    """Write the demo model to ``path`` atomically; returns the path."""
    from graphopt import io

    return io.save(io.load(make_demo()).model, path)


def _build_demo(path: Path) -> dict[str, Any]:
    write_demo(path)
    return {
        "exporter": "onnx.helper (graphopt.models.demo, numpy seed 0)",
        "source": "graphopt.models.demo.make_demo",
        "test_shapes": {DEMO_INPUT: [1, *DEMO_INPUT_SHAPE[1:]]},
    }


register(
    ModelSpec(
        name="demo",
        family="demo",
        description="small CNN classifier full of exporter leftovers (no torch needed)",
        builder=_build_demo,
    )
)
