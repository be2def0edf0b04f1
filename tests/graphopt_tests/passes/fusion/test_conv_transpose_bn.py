"""fuse-conv-transpose-bn: ConvTranspose + inference BatchNormalization folded together."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.conv_transpose_bn import (
    FuseConvTransposeAffinePass,
    FuseConvTransposeBatchNormPass,
)
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT


def _model(
    group: int = 1,
    bias: bool = True,
    spatial: int = 2,
    extra_output: bool = False,
    bn_attrs: dict | None = None,
    opset: int = 17,
):
    rng = np.random.default_rng(0)
    cin, per_group = 4, 3
    cout = per_group * group
    inits = {"W": rng.normal(size=(cin, per_group, *(3,) * spatial)).astype(np.float32)}
    inputs = ["X", "W"]
    if bias:
        inits["B"] = rng.normal(size=cout).astype(np.float32)
        inputs.append("B")
    inits.update(
        gamma=rng.normal(size=cout).astype(np.float32),
        beta=rng.normal(size=cout).astype(np.float32),
        mean=rng.normal(size=cout).astype(np.float32),
        var=rng.uniform(0.5, 2.0, size=cout).astype(np.float32),
    )
    nodes = [
        helper.make_node("ConvTranspose", inputs, ["c"], group=group, strides=[2] * spatial),
        helper.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["Y"], **(bn_attrs or {})
        ),
    ]
    outputs = [tensor_info("Y", F, [None] * (spatial + 2))]
    if extra_output:
        outputs.append(tensor_info("c", F, [None] * (spatial + 2)))
    x = tensor_info("X", F, [1, cin, *(5,) * spatial])
    return make_model(nodes, [x], outputs, inits, opset=opset)


@pytest.mark.parametrize(
    ("group", "bias", "spatial"),
    [(1, True, 2), (1, False, 2), (2, True, 2), (4, False, 2), (2, True, 1)],
)
def test_fused(group: int, bias: bool, spatial: int) -> None:
    model = _model(group, bias, spatial)
    after, hits = run_pass(model, FuseConvTransposeBatchNormPass)
    assert hits == 1
    assert op_types(after) == ["ConvTranspose"]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert len(after.graph.initializers) == 2
    assert_same_outputs(model, roundtrip(after))


def test_shared_output_is_refused() -> None:
    after, hits = run_pass(_model(extra_output=True), FuseConvTransposeBatchNormPass)
    assert hits == 0
    assert op_types(after) == ["ConvTranspose", "BatchNormalization"]


def test_training_bn_is_refused() -> None:
    _, hits = run_pass(
        _model(bn_attrs={"training_mode": 1}, opset=15), FuseConvTransposeBatchNormPass
    )
    assert hits == 0


def _affine_model(ops: list[tuple[str, tuple]], group: int = 2, then_bn: bool = False):
    rng = np.random.default_rng(1)
    cin, per_group = 4, 3
    cout = per_group * group
    inits = {"W": rng.normal(size=(cin, per_group, 2, 2)).astype(np.float32)}
    nodes = [helper.make_node("ConvTranspose", ["X", "W"], ["t0"], group=group, strides=[2, 2])]
    for i, (op, shape) in enumerate(ops):
        inits[f"k{i}"] = rng.normal(size=shape).astype(np.float32)
        nodes.append(helper.make_node(op, [f"t{i}", f"k{i}"], [f"t{i + 1}"]))
    last = f"t{len(ops)}"
    if then_bn:
        inits.update(
            gamma=rng.normal(size=cout).astype(np.float32),
            beta=rng.normal(size=cout).astype(np.float32),
            mean=rng.normal(size=cout).astype(np.float32),
            var=rng.uniform(0.5, 2.0, size=cout).astype(np.float32),
        )
        nodes.append(
            helper.make_node("BatchNormalization", [last, "gamma", "beta", "mean", "var"], ["bn"])
        )
        last = "bn"
    nodes.append(helper.make_node("Identity", [last], ["Y"]))
    x = tensor_info("X", F, [1, cin, 5, 5])
    return make_model(nodes, [x], [tensor_info("Y", F, [1, cout, 10, 10])], inits)


@pytest.mark.parametrize(
    ("ops", "then_bn"),
    [
        ([("Add", (6, 1, 1))], True),  # paddle2onnx: separate bias Add, then BN
        ([("Mul", (1, 6, 1, 1)), ("Add", ())], False),
    ],
)
def test_affine_then_bn_fused(ops: list, then_bn: bool) -> None:
    model = _affine_model(ops, then_bn=then_bn)
    after, hits = run_pass(model, FuseConvTransposeAffinePass)
    assert hits == len(ops)
    after, hits = run_pass(after, FuseConvTransposeBatchNormPass)
    assert hits == int(then_bn)
    assert op_types(after) == ["ConvTranspose", "Identity"]
    assert_same_outputs(model, roundtrip(after))


def test_spatial_constant_is_refused() -> None:
    after, hits = run_pass(_affine_model([("Add", (1, 10))]), FuseConvTransposeAffinePass)
    assert hits == 0
    assert op_types(after) == ["ConvTranspose", "Add", "Identity"]
