"""reshape-target, proven against ONNX Runtime (dynamic batch, ViT's x.view(*shape[:-2], ...))."""

import numpy as np
from onnx import TensorProto as T
from onnx import helper

from graphopt import editing
from graphopt.passes.erasure.reshape_target import ReshapeTargetPass
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.erasure.util import check, inferred

I64 = np.int64


def _vit_model(tail, allowzero=0, y_shape=("b", 3, 8, 5)):
    """x: [b, 3, 5, 8]; Reshape(Transpose(x), Concat(Shape(x)[:-2], tail))."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "start", "end"], ["lead"]),
        helper.make_node("Concat", ["lead", "tail"], ["target"], axis=0),
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Reshape", ["t", "target"], ["y"], allowzero=allowzero),
    ]
    inits = {
        "start": np.array([np.iinfo(I64).min], I64),
        "end": np.array([-2], I64),
        "tail": np.array(tail, I64),
    }
    return inferred(
        make_model(
            nodes,
            [tensor_info("x", T.FLOAT, ["b", 3, 5, 8])],
            [tensor_info("y", T.FLOAT, list(y_shape))],
            inits,
            opset=18,
        )
    )


def test_one_dynamic_dim_becomes_minus_one():
    for allowzero in (0, 1):
        model = _vit_model([8, 5], allowzero=allowzero)
        for batch in (1, 3):
            after, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (batch, 3, 5, 8)})
            assert hits == 1
            assert not {"Shape", "Slice", "Concat"} & set(ops)
        reshape = next(n for n in after.graph if n.op_type == "Reshape")
        assert editing.constant_array(reshape.inputs[1]).tolist() == [-1, 3, 8, 5]


def test_zero_batch_gives_the_same_shape():
    model = _vit_model([8, 5])
    _after, hits, _ = check(model, ReshapeTargetPass, shapes={"x": (0, 3, 5, 8)})
    assert hits == 1


def test_known_minus_one_next_to_a_dynamic_dim_is_kept():
    model = _vit_model([-1], y_shape=("b", 3, 40))
    _, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (2, 3, 5, 8)})
    assert hits == 0
    assert "Concat" in ops


def test_two_dynamic_dims_are_kept():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Concat", ["s", "one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    model = inferred(
        make_model(
            nodes,
            [tensor_info("x", T.FLOAT, ["b", "n"])],
            [tensor_info("y", T.FLOAT, ["b", "n", 1])],
            {"one": np.array([1], I64)},
        )
    )
    _, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (2, 3)})
    assert hits == 0
    assert "Concat" in ops


def test_scalar_gathers_unsqueezed_are_read():
    # Reshape(x, [Shape(x)[0], 15]) with x: [b, 3, 5] → [-1, 15]
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
        helper.make_node("Concat", ["b1", "fifteen"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {
        "zero": np.array(0, I64),
        "zero1": np.array([0], I64),
        "fifteen": np.array([15], I64),
    }
    model = inferred(
        make_model(
            nodes,
            [tensor_info("x", T.FLOAT, ["b", 3, 5])],
            [tensor_info("y", T.FLOAT, ["b", 15])],
            inits,
        )
    )
    _after, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (4, 3, 5)})
    assert hits == 1
    assert ops.count("Reshape") == 1 and "Shape" not in ops and "Gather" not in ops
