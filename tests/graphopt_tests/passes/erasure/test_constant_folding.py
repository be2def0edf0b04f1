import numpy as np
from onnx import TensorProto as T
from onnx import helper

from graphopt.passes.erasure.constant_folding import ConstantFoldingPass
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, op_types, run_pass, tensor_info
from graphopt_tests.passes.erasure.util import check

F = T.FLOAT
I64 = np.int64


def test_folds_constant_subexpression():
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("Mul", ["wt", "two"], ["w2"]),
            helper.make_node("MatMul", ["x", "w2"], ["y"]),
        ],
        [tensor_info("x", F, [2, 3])],
        [tensor_info("y", F, [2, 4])],
        {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "two": np.array(2, np.float32)},
    )
    _, hits, ops = check(model, ConstantFoldingPass)
    assert hits == 2 and ops == ["MatMul"]


def test_large_result_from_nothing_refused_small_limit():
    # ConstantOfShape making 4 MB from a few bytes: over a 1 MiB limit
    model = make_model(
        [
            helper.make_node(
                "ConstantOfShape", ["s"], ["big"], value=helper.make_tensor("v", F, [1], [1.0])
            ),
            helper.make_node("Add", ["x", "big"], ["y"]),
        ],
        [tensor_info("x", F, [1024, 1024])],
        [tensor_info("y", F, [1024, 1024])],
        {"s": np.array([1024, 1024], I64)},
    )
    after, hits = run_pass(model, ConstantFoldingPass, PassContext(fold_limit_bytes=1 << 20))
    assert hits == 0 and "ConstantOfShape" in op_types(after)
    after, hits = run_pass(model, ConstantFoldingPass, PassContext(fold_limit_bytes=None))
    assert hits == 1 and op_types(after) == ["Add"]


def test_large_result_replacing_its_input_is_allowed():
    # Transposing a 4 MB weight used once: the result replaces the same bytes
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
        ],
        [tensor_info("x", F, [2, 1024])],
        [tensor_info("y", F, [2, 1024])],
        {"w": w},
    )
    _, hits, ops = check(model, ConstantFoldingPass, PassContext(fold_limit_bytes=1 << 20))
    assert hits == 1 and ops == ["MatMul"]


def test_large_result_of_shared_weight_refused():
    # the weight is read twice, so folding would keep it and add 4 MB more
    w = np.ones((1024, 1024), np.float32)
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["a"]),
            helper.make_node("MatMul", ["a", "w"], ["y"]),
        ],
        [tensor_info("x", F, [2, 1024])],
        [tensor_info("y", F, [2, 1024])],
        {"w": w},
    )
    after, hits = run_pass(model, ConstantFoldingPass, PassContext(fold_limit_bytes=1 << 20))
    assert hits == 0 and "Transpose" in op_types(after)


def _tied_embedding(rows: int, width: int, perm_first: bool = True):
    """GPT-2's tied embedding: ``w[rows, width]`` read by the token Gather and, transposed,
    by the LM head MatMul (the transpose is a new tensor of the weight's size)."""
    w = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    return make_model(
        [
            helper.make_node("Gather", ["w", "ids"], ["h"]),
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["h", "wt"], ["logits"]),
        ],
        [tensor_info("ids", T.INT64, [1, 4])],
        [tensor_info("logits", F, [1, 4, rows])],
        {"w": w},
    )


def test_a_shared_weight_under_the_fold_limit_is_not_copied():
    """A 1000x128 embedding (512 KB, under the 1 MiB limit) read by Gather stays; folding
    its Transpose wrote a second 512 KB copy beside it (gpt2_tiny +128,002 parameters)."""
    model = _tied_embedding(1000, 128)
    after, hits = run_pass(model, ConstantFoldingPass, PassContext(fold_limit_bytes=1 << 20))
    assert hits == 0 and "Transpose" in op_types(after)
    sizes = [v.const_value.size for v in after.graph.initializers.values()]
    assert sizes == [128_000]
    # --fold-limit none lifts every size rule, this one too.
    after, hits = run_pass(model, ConstantFoldingPass, PassContext(fold_limit_bytes=None))
    assert hits == 1 and op_types(after) == ["Gather", "MatMul"]


def test_small_copies_of_a_shared_constant_still_fold():
    """Under the copy limit (4 KiB) a copy costs nothing worth a node: a 16x8 table transposed
    (512 bytes) folds although the Gather keeps the table."""
    model = _tied_embedding(16, 8)
    _, hits, ops = check(model, ConstantFoldingPass, PassContext(fold_limit_bytes=1 << 20))
    assert hits == 1 and ops == ["Gather", "MatMul"]


def test_a_small_result_of_a_shared_weight_folds():
    """Reading a shared weight is no copy when the result is small: one row of it, or its
    shape, folds."""
    w = np.random.default_rng(0).standard_normal((1000, 128)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Gather", ["w", "ids"], ["h"]),
            helper.make_node("Gather", ["w", "zero"], ["row"]),
            helper.make_node("Add", ["h", "row"], ["y"]),
        ],
        [tensor_info("ids", T.INT64, [1, 4])],
        [tensor_info("y", F, [1, 4, 128])],
        {"w": w, "zero": np.array(0, I64)},
    )
    _, hits, ops = check(model, ConstantFoldingPass, PassContext(fold_limit_bytes=1 << 20))
    assert hits == 1 and ops == ["Gather", "Add"]


def test_a_large_result_replacing_its_input_folds_beside_a_shared_constant():
    """Reshape(weight used once, shape shared with another Reshape): the shape stays, but
    the weight goes, so the model does not grow and the Reshape folds."""
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Reshape", ["w", "shape"], ["w2"]),
            helper.make_node("MatMul", ["x", "w2"], ["y"]),
            helper.make_node("Reshape", ["z", "shape"], ["y2"]),
        ],
        [tensor_info("x", F, [512, 512]), tensor_info("z", F, [512 * 512])],
        [tensor_info("y", F, [512, 512]), tensor_info("y2", F, [512, 512])],
        {"w": rng.standard_normal((256, 1024)).astype(np.float32), "shape": np.array([512, 512])},
    )
    _, hits, ops = check(model, ConstantFoldingPass, PassContext(fold_limit_bytes=1 << 20))
    assert hits == 1 and ops == ["MatMul", "Reshape"]


def test_a_shared_constant_whose_readers_all_fold_is_no_copy():
    """Swin's shifted-window mask: a zero image read by a Slice and by a ScatterND whose
    updates are a Transpose of that Slice. Every reader folds in turn, so the image goes
    with them; refusing the Slice as a copy left 66 nodes more in swin_t."""
    model = make_model(
        [
            helper.make_node("Slice", ["img", "starts", "ends"], ["part"]),
            helper.make_node("Transpose", ["part"], ["upd"], perm=[1, 0]),
            helper.make_node("ScatterND", ["img", "idx", "upd"], ["mask"]),
            helper.make_node("Add", ["x", "mask"], ["y"]),
        ],
        [tensor_info("x", F, [56, 56])],
        [tensor_info("y", F, [56, 56])],
        {
            "img": np.zeros((56, 56), np.float32),
            "starts": np.array([0], I64),
            "ends": np.array([56], I64),
            "idx": np.arange(56, dtype=np.int64).reshape(56, 1),
        },
    )
    _, hits, ops = check(model, ConstantFoldingPass, PassContext(fold_limit_bytes=1 << 20))
    assert hits == 3 and ops == ["Add"]


def test_random_ops_never_folded():
    model = make_model(
        [
            helper.make_node("RandomNormal", [], ["r"], shape=[3]),
            helper.make_node("Add", ["x", "r"], ["y"]),
            helper.make_node("Bernoulli", ["p"], ["b"]),
            helper.make_node("Add", ["y", "b"], ["z"]),
        ],
        [tensor_info("x", F, [3])],
        [tensor_info("z", F, [3])],
        {"p": np.full(3, 0.5, np.float32)},
    )
    after, hits = run_pass(model, ConstantFoldingPass, PassContext(fold_limit_bytes=None))
    assert hits == 0 and {"RandomNormal", "Bernoulli"} <= set(op_types(after))


def test_graph_input_initializer_is_not_constant():
    # IR>=4: an initializer listed as an input is an overridable default
    model = make_model(
        [
            helper.make_node("Mul", ["w", "two"], ["w2"]),
            helper.make_node("Add", ["x", "w2"], ["y"]),
        ],
        [tensor_info("x", F, [3]), tensor_info("w", F, [3])],
        [tensor_info("y", F, [3])],
        {"w": np.ones(3, np.float32), "two": np.array(2, np.float32)},
    )
    after, hits = run_pass(model, ConstantFoldingPass)
    assert hits == 0 and op_types(after) == ["Mul", "Add"]
    assert after.graph.inputs[1].const_value is not None  # still has its default


def test_output_signature_unchanged():
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Add", ["one", "one"], ["two"]),
            helper.make_node("Mul", ["a", "two"], ["y"]),
            helper.make_node("Identity", ["two"], ["k"]),
        ],
        [tensor_info("x", F, ["n", 3])],
        [tensor_info("y", F, ["n", None]), tensor_info("k", F, [])],
        {"one": np.array(1, np.float32)},
    )
    before = [(v.name, v.type, v.shape) for v in model.graph.outputs]
    after, hits, _ = check(model, ConstantFoldingPass, shapes={"x": (2, 3)})
    assert hits >= 1
    assert [(v.name, v.type, v.shape) for v in after.graph.outputs] == before


def _sequence_concat(opset: int):
    nodes = [
        helper.make_node("SequenceConstruct", ["x", "y"], ["s"]),
        helper.make_node("ConcatFromSequence", ["s"], ["z"], axis=0, new_axis=1),
    ]
    inputs = [tensor_info("x", T.FLOAT, [2, 3]), tensor_info("y", T.FLOAT, [2, 3])]
    return make_model(nodes, inputs, [tensor_info("z", T.FLOAT, [2, 2, 3])], opset=opset)


def test_sequence_rewrites_only_where_the_opset_allows_them():
    """onnxscript rewrites ConcatFromSequence of a SequenceConstruct into Unsqueeze (axes as
    an input: opset 13) + Concat. Below 13 that model is invalid: left alone. From 13 the
    rewrite is a change the pass reports (it reported none, so a broken one escaped replay)."""
    old, hits = run_pass(_sequence_concat(12), ConstantFoldingPass, PassContext())
    assert hits == 0 and op_types(old) == ["SequenceConstruct", "ConcatFromSequence"]
    _, hits, ops = check(_sequence_concat(13), ConstantFoldingPass)
    assert hits >= 1 and "ConcatFromSequence" not in ops


def test_abs_of_shape_arithmetic_is_not_dropped():
    """onnxscript's folder turned Abs(Shape(x)[0:1] - 5) into Identity (it takes every
    symbolic shape value for a dim, so >= 0): 2 - 5 came out -3, not 3."""
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
            helper.make_node("Add", ["s", "c"], ["a"]),
            helper.make_node("Abs", ["a"], ["y"]),
        ],
        [tensor_info("x", F, ["N", 3])],
        [tensor_info("y", T.INT64, [1])],
        {"c": np.array([-5], I64)},
        opset=17,
    )
    for rows in (2, 7):
        feeds = {"x": np.ones((rows, 3), np.float32)}
        _, _, ops = check(model, ConstantFoldingPass, feeds=feeds)
        assert "Abs" in ops
