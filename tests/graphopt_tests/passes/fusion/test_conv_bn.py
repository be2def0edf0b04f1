"""fuse-conv-bn: Conv + inference BatchNormalization folded into the Conv."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.conv_bn import FuseConvBatchNormPass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT


def _bn_params(rng: np.random.Generator, channels: int, dtype=np.float32) -> dict:
    return {
        "gamma": rng.normal(size=channels).astype(dtype),
        "beta": rng.normal(size=channels).astype(dtype),
        "mean": rng.normal(size=channels).astype(dtype),
        "var": rng.uniform(0.5, 2.0, size=channels).astype(dtype),
    }


def _conv_bn_model(
    spatial: int = 2,
    group: int = 1,
    bias: bool = True,
    extra_output: bool = False,
    bn_attrs: dict | None = None,
    opset: int = 17,
):
    rng = np.random.default_rng(0)
    cin, cout = 4, 8 if group == 1 else 4
    kernel = (3,) * spatial
    size = (6,) * spatial
    inits = {"W": rng.normal(size=(cout, cin // group, *kernel)).astype(np.float32)}
    conv_inputs = ["X", "W"]
    if bias:
        inits["B"] = rng.normal(size=cout).astype(np.float32)
        conv_inputs.append("B")
    inits.update(_bn_params(rng, cout))
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], group=group, pads=[1] * (2 * spatial)),
        helper.make_node(
            "BatchNormalization",
            ["c", "gamma", "beta", "mean", "var"],
            ["Y"],
            epsilon=1e-3,
            **(bn_attrs or {}),
        ),
    ]
    outputs = [tensor_info("Y", F, [1, cout, *size])]
    if extra_output:
        outputs.append(tensor_info("c", F, [1, cout, *size]))
    return make_model(nodes, [tensor_info("X", F, [1, cin, *size])], outputs, inits, opset=opset)


@pytest.mark.parametrize(
    ("spatial", "group", "bias"),
    [(2, 1, True), (2, 1, False), (1, 1, True), (3, 1, False), (2, 4, True), (2, 2, False)],
)
def test_conv_bn_fused(spatial: int, group: int, bias: bool) -> None:
    model = _conv_bn_model(spatial, group, bias)
    after, hits = run_pass(model, FuseConvBatchNormPass)
    assert hits == 1
    assert op_types(after) == ["Conv"]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert_same_outputs(model, roundtrip(after))
    # old weight, bias and BN params are gone; only the fused weight and bias remain
    assert len(after.graph.initializers) == 2


def test_bn_output_of_conv_used_elsewhere_is_refused() -> None:
    model = _conv_bn_model(extra_output=True)
    after, hits = run_pass(model, FuseConvBatchNormPass)
    assert hits == 0
    assert op_types(after) == ["Conv", "BatchNormalization"]


def test_training_mode_bn_is_refused() -> None:
    model = _conv_bn_model(bn_attrs={"training_mode": 1}, opset=15)
    _, hits = run_pass(model, FuseConvBatchNormPass)
    assert hits == 0


def test_shared_weight_is_left_intact() -> None:
    # The Conv weight also feeds a second Conv: the fold must not change what that one reads.
    rng = np.random.default_rng(1)
    inits = {"W": rng.normal(size=(4, 4, 1, 1)).astype(np.float32), **_bn_params(rng, 4)}
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["Y"]),
        helper.make_node("Conv", ["X", "W"], ["Z"]),
    ]
    x = tensor_info("X", F, [1, 4, 5, 5])
    outs = [tensor_info("Y", F, [1, 4, 5, 5]), tensor_info("Z", F, [1, 4, 5, 5])]
    model = make_model(nodes, [x], outs, inits)
    after, hits = run_pass(model, FuseConvBatchNormPass)
    assert hits == 1
    assert op_types(after) == ["Conv", "Conv"]
    assert_same_outputs(model, roundtrip(after))


def test_non_constant_bn_params_are_refused() -> None:
    rng = np.random.default_rng(2)
    params = _bn_params(rng, 4)
    del params["gamma"]  # fed at run time instead
    inits = {"W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), **params}
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["Y"]),
    ]
    inputs = [tensor_info("X", F, [1, 3, 5, 5]), tensor_info("gamma", F, [4])]
    model = make_model(nodes, inputs, [tensor_info("Y", F, [1, 4, 3, 3])], inits)
    after, hits = run_pass(model, FuseConvBatchNormPass)
    assert hits == 0
    assert op_types(after) == ["Conv", "BatchNormalization"]


def test_fuses_inside_if_branch() -> None:
    rng = np.random.default_rng(3)
    weight = helper.make_tensor("W", F, [4, 3, 1, 1], rng.normal(size=12).tolist())
    params = [
        helper.make_tensor(name, F, [4], values.tolist())
        for name, values in _bn_params(rng, 4).items()
    ]
    branch = helper.make_graph(
        [
            helper.make_node("Conv", ["X", "W"], ["c"]),
            helper.make_node(
                "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["then_y"]
            ),
        ],
        "then",
        [],
        [tensor_info("then_y", F, [1, 4, 5, 5])],
        [weight, *params],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["else_y"])],
        "else",
        [],
        [tensor_info("else_y", F, [1, 3, 5, 5])],
    )
    nodes = [helper.make_node("If", ["cond"], ["Y"], then_branch=branch, else_branch=other)]
    inputs = [tensor_info("X", F, [1, 3, 5, 5]), tensor_info("cond", TensorProto.BOOL, [])]
    model = make_model(nodes, inputs, [tensor_info("Y", F, [1, "C", 5, 5])])
    after, hits = run_pass(model, FuseConvBatchNormPass)
    assert hits == 1
    assert "BatchNormalization" not in op_types(after)
    x = np.random.default_rng(4).normal(size=(1, 3, 5, 5)).astype(np.float32)
    assert_same_outputs(model, roundtrip(after), {"X": x, "cond": np.array(True)})


def test_float16_conv_bn_is_fused_in_float64_then_cast() -> None:
    rng = np.random.default_rng(5)
    h = TensorProto.FLOAT16
    inits = {
        "W": rng.normal(size=(4, 3, 3, 3)).astype(np.float16),
        **_bn_params(rng, 4, np.float16),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["Y"]),
    ]
    model = make_model(
        nodes, [tensor_info("X", h, [1, 3, 6, 6])], [tensor_info("Y", h, [1, 4, 4, 4])], inits
    )
    after, hits = run_pass(model, FuseConvBatchNormPass)
    assert hits == 1
    assert op_types(after) == ["Conv"]
    # float16 rounds the folded weights once; the reference rounds after every op
    assert_same_outputs(model, roundtrip(after), tolerance=1e-2)
