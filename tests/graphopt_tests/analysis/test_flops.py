"""FLOPs against hand-computed values (multiply-add = 2 FLOPs)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.analysis.flops import model_flops
from graphopt_tests.helpers import import_or_skip, make_model, tensor_info

F = TensorProto.FLOAT


def _unranked(name: str, rank: int = 4):
    """An output whose dims are left for inference (the checker wants a rank)."""
    return helper.make_tensor_value_info(name, F, [None] * rank)


def _single(node, inputs, outputs, inits=None, opset=17):
    return make_model([node], inputs, outputs, inits or {}, opset=opset)


def test_conv_3_to_8_3x3_on_32x32() -> None:
    model = _single(
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
        [tensor_info("x", F, [1, 3, 32, 32])],
        [tensor_info("y", F, [1, 8, 32, 32])],
        {"w": np.ones((8, 3, 3, 3), np.float32), "b": np.ones(8, np.float32)},
    )
    report = model_flops(model)
    # 8·32·32 outputs, each 3·3·3 multiply-adds, plus one bias add.
    assert report.total == 2 * 8 * 32 * 32 * 27 + 8 * 32 * 32
    assert report.by_op == {"Conv": report.total}


def test_grouped_conv_stride_no_bias() -> None:
    model = _single(
        helper.make_node("Conv", ["x", "w"], ["y"], group=4, strides=[2, 2]),
        [tensor_info("x", F, [2, 8, 9, 9])],
        [_unranked("y")],
        {"w": np.ones((16, 2, 3, 3), np.float32)},
    )
    # output 2x16x4x4; each output sees C_in/groups=2 channels of a 3x3 window.
    assert model_flops(model).total == 2 * (2 * 16 * 4 * 4) * (2 * 3 * 3)


def test_conv_transpose() -> None:
    model = _single(
        helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2]),
        [tensor_info("x", F, [1, 4, 5, 5])],
        [_unranked("y")],
        {"w": np.ones((4, 6, 2, 2), np.float32)},
    )
    assert model_flops(model).total == 2 * (4 * 5 * 5) * (6 * 2 * 2)


def test_batched_matmul_with_broadcast() -> None:
    model = _single(
        helper.make_node("MatMul", ["a", "b"], ["c"]),
        [tensor_info("a", F, [2, 4, 8])],
        [tensor_info("c", F, [2, 4, 16])],
        {"b": np.ones((8, 16), np.float32)},
    )
    assert model_flops(model).total == 2 * 2 * 4 * 8 * 16


def test_matmul_broadcast_both_sides() -> None:
    model = _single(
        helper.make_node("MatMul", ["a", "b"], ["c"]),
        [tensor_info("a", F, [3, 1, 5, 7]), tensor_info("b", F, [1, 2, 7, 4])],
        [_unranked("c")],
    )
    assert model_flops(model).total == 2 * (3 * 2) * 5 * 7 * 4


def test_gemm_trans_b_with_bias() -> None:
    model = _single(
        helper.make_node("Gemm", ["a", "w", "c"], ["y"], transB=1),
        [tensor_info("a", F, [4, 10])],
        [tensor_info("y", F, [4, 6])],
        {"w": np.ones((6, 10), np.float32), "c": np.ones(6, np.float32)},
    )
    assert model_flops(model).total == 2 * 4 * 6 * 10 + 4 * 6


def test_elementwise_norm_softmax_pool_reduce() -> None:
    nodes = [
        helper.make_node("Add", ["x", "x"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("BatchNormalization", ["r", "s", "bb", "m", "v"], ["n"]),
        helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Softmax", ["p"], ["sm"], axis=1),
        helper.make_node("ReduceMean", ["sm"], ["y"], keepdims=0),
        helper.make_node("Reshape", ["y", "shape"], ["z"]),
    ]
    c = np.ones(3, np.float32)
    model = make_model(
        nodes,
        [tensor_info("x", F, [1, 3, 8, 8])],
        [_unranked("z", 1)],
        {"s": c, "bb": c, "m": c, "v": c, "shape": np.array([-1], np.int64)},
    )
    report = model_flops(model)
    n = 3 * 8 * 8
    assert report.by_op == {
        "Add": n,
        "Relu": n,
        "BatchNormalization": 2 * n,
        "MaxPool": (n // 4) * 4,
        "Softmax": 3 * (n // 4),
        "ReduceMean": n // 4,
    }
    assert report.total == sum(report.by_op.values())
    assert not report.not_counted and not report.unknown_shape


def test_unknown_op_is_listed_not_counted() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mystery", ["r"], ["y"], domain="custom.domain"),
    ]
    graph = helper.make_graph(nodes, "g", [tensor_info("x", F, [2, 3])], [_unranked("y", 2)])
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.domain", 1)],
        ir_version=8,
    )
    from graphopt.io import load

    report = model_flops(load(proto).model)
    assert report.total == 6
    assert report.not_counted == {"custom.domain.Mystery": 1}


def test_symbolic_dims_use_defaults_and_given_shapes() -> None:
    model = _single(
        helper.make_node("Relu", ["x"], ["y"]),
        [tensor_info("x", F, ["N", 3, "H", "W"])],
        [tensor_info("y", F, ["N", 3, "H", "W"])],
    )
    # Defaults as in graphopt.inputs: batch 1, image dims 32.
    assert model_flops(model).total == 3 * 32 * 32
    assert model_flops(model, {"x": (2, 3, 10, 10)}).total == 2 * 3 * 10 * 10
    # Analysis works on a clone: the caller's symbolic shape is untouched.
    assert str(model.graph.inputs[0].shape) == "[N,3,H,W]"


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_resnet18_is_about_1_82_gmacs(tmp_path) -> None:
    torch = import_or_skip("torch", reason="needs the [torch] extra")
    torchvision = import_or_skip("torchvision", reason="needs the [torch] extra")
    from graphopt.io import load

    net = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False)
    report = model_flops(load(path).model)
    macs = (report.by_op["Conv"] + report.by_op["Gemm"]) / 2
    # torchvision documents 1.81 GFLOPs for resnet18 counting a multiply-add once.
    assert macs == pytest.approx(1.814e9, rel=0.01)
    assert not report.not_counted and not report.unknown_shape
