"""reshape-target, proven against ONNX Runtime (dynamic batch, ViT's x.view(*shape[:-2], ...))."""

import numpy as np
from onnx import TensorProto as T
from onnx import helper

from graphopt import editing
from graphopt.passes.erasure.reshape_target import ReshapeTargetPass
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.erasure.util import check, inferred, reshape_by_lying_value_info

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


def test_known_minus_one_next_to_a_copied_dim_becomes_zero():
    # [Shape(x)[0], 3, -1] over Transpose(x): the batch entry is the input's own batch
    # (same input symbol, same position), so 0 copies it; the -1 stays the only -1.
    model = _vit_model([-1], y_shape=("b", 3, 40))
    for batch in (1, 3):
        after, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (batch, 3, 5, 8)})
        assert hits == 1 and "Concat" not in ops
    reshape = next(n for n in after.graph if n.op_type == "Reshape")
    assert editing.constant_array(reshape.inputs[1]).tolist() == [0, 3, -1]


def test_known_minus_one_next_to_a_dynamic_dim_is_kept():
    # With allowzero=1 a 0 is no copy, and -1 cannot take a second dynamic entry.
    model = _vit_model([-1], allowzero=1, y_shape=("b", 3, 40))
    _, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (2, 3, 5, 8)})
    assert hits == 0
    assert "Concat" in ops


def test_dims_read_from_the_input_itself_become_copies():
    # Reshape(x, Concat(Shape(x), [1])): both dims are x's own, at their own positions.
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
    for shape in ((2, 3), (5, 1), (0, 3)):
        after, hits, ops = check(model, ReshapeTargetPass, shapes={"x": shape})
        assert hits == 1 and "Concat" not in ops and "Shape" not in ops
    reshape = next(n for n in after.graph if n.op_type == "Reshape")
    assert editing.constant_array(reshape.inputs[1]).tolist() == [0, 0, 1]


def test_two_dynamic_dims_of_another_tensor_are_kept():
    # Reshape(Transpose(x), Concat(Shape(x), [1])): x's dims land at other positions of
    # the transposed tensor; with two of them unknown there is no constant target.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Concat", ["s", "one"], ["target"], axis=0),
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
        helper.make_node("Reshape", ["t", "target"], ["y"]),
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


def test_copy_is_not_used_with_allowzero():
    # With allowzero=1 a 0 entry is a zero-size dim, not a copy: the target stays computed.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Concat", ["s", "one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], allowzero=1),
    ]
    model = inferred(
        make_model(
            nodes,
            [tensor_info("x", T.FLOAT, ["b", "n"])],
            [tensor_info("y", T.FLOAT, ["b", "n", 1])],
            {"one": np.array([1], I64)},
            opset=14,
        )
    )
    _, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (2, 3)})
    assert hits == 0 and "Concat" in ops


def _swin_windows(batch_dim="b"):
    """Swin's window partition and attention-mask reshape, as TorchScript exports them.

    x: [b, 2, 3, 2, 3, 4] (2x2 windows of 3x3 tokens, 4 channels)
    w = Reshape(Transpose(x), [Shape(x)[0] * 4, 9, 4])          # [b*4, 9, 4] windows
    y = Reshape(w, [Shape(w)[0] / 4, 4, 9, 4])                  # [b, 4, 9, 4] back again
    Only the batch is symbolic; the other entries are static constants.
    """

    def scalar_chain(source, index, op, factor, out):
        return [
            helper.make_node("Shape", [source], [f"{out}_shape"]),
            helper.make_node("Gather", [f"{out}_shape", index], [f"{out}_dim"], axis=0),
            helper.make_node(op, [f"{out}_dim", factor], [f"{out}_scaled"]),
            helper.make_node("Unsqueeze", [f"{out}_scaled", "axis0"], [out]),
        ]

    nodes = [
        *scalar_chain("x", "zero", "Mul", "four", "n_windows"),
        helper.make_node("Concat", ["n_windows", "nine", "channels"], ["w_target"], axis=0),
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2, 4, 5]),
        helper.make_node("Reshape", ["t", "w_target"], ["w"]),
        *scalar_chain("w", "zero", "Div", "four", "n_images"),
        helper.make_node("Concat", ["n_images", "four1", "nine", "channels"], ["y_target"], axis=0),
        helper.make_node("Reshape", ["w", "y_target"], ["y"]),
    ]
    inits = {
        "zero": np.array(0, I64),
        "four": np.array(4, I64),
        "axis0": np.array([0], I64),
        "nine": np.array([9], I64),
        "channels": np.array([4], I64),
        "four1": np.array([4], I64),
    }
    return inferred(
        make_model(
            nodes,
            [tensor_info("x", T.FLOAT, [batch_dim, 2, 3, 2, 3, 4])],
            [tensor_info("y", T.FLOAT, [batch_dim, 4, 9, 4])],
            inits,
        )
    )


def test_swin_window_targets_with_a_computed_batch_become_constants():
    model = _swin_windows()
    for batch in (1, 3):
        after, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (batch, 2, 3, 2, 3, 4)})
        assert hits == 2
        assert not {"Shape", "Gather", "Mul", "Div", "Unsqueeze", "Concat"} & set(ops)
    targets = [
        editing.constant_array(n.inputs[1]).tolist() for n in after.graph if n.op_type == "Reshape"
    ]
    assert targets == [[-1, 9, 4], [-1, 4, 9, 4]]


def test_computed_entry_next_to_a_copy_is_kept():
    # [Shape(x)[0], Shape(x)[1] * 2, 2] over x: [b, n, 4]: the first entry copies x's dim,
    # the second is computed. -1 next to a copy is not unique when b is 0: kept as it is.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero1", "one"], ["lead"]),
        helper.make_node("Gather", ["s", "one_scalar"], ["n"], axis=0),
        helper.make_node("Mul", ["n", "two"], ["n2"]),
        helper.make_node("Unsqueeze", ["n2", "zero1"], ["n2v"]),
        helper.make_node("Concat", ["lead", "n2v", "two1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {
        "zero1": np.array([0], I64),
        "one": np.array([1], I64),
        "one_scalar": np.array(1, I64),
        "two": np.array(2, I64),
        "two1": np.array([2], I64),
    }
    model = inferred(
        make_model(
            nodes,
            [tensor_info("x", T.FLOAT, ["b", "n", 4])],
            [tensor_info("y", T.FLOAT, ["b", "m", 2])],
            inits,
        )
    )
    _, hits, ops = check(model, ReshapeTargetPass, shapes={"x": (2, 3, 4)})
    assert hits == 0 and "Concat" in ops


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


def test_a_dim_named_only_by_a_value_info_is_not_copied():
    # The value_info calls z's dim 1 S (x's), inference cannot derive it: copying x's dim
    # there (a 0) is wrong whenever S != T, and Softmax over the last axis shows it.
    model = reshape_by_lying_value_info()
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((2, 4, 8)).astype(np.float32),
        "y": rng.standard_normal((2, 2, 8)).astype(np.float32),
    }
    after, _hits, _ = check(model, ReshapeTargetPass, feeds=feeds)
    inner = next(n for n in after.graph if n.op_type == "Reshape" and n.outputs[0].name == "r")
    assert not editing.is_constant(inner.inputs[1])
