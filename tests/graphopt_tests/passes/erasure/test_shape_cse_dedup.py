"""shape-folding, cse, dedup-initializers, unused-initializers, dead-code."""

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper

from graphopt import io
from graphopt.passes.erasure.cse import CsePass
from graphopt.passes.erasure.dead_code import DeadCodePass, UnusedInitializersPass
from graphopt.passes.erasure.dedup_initializers import DedupInitializersPass
from graphopt.passes.erasure.shape_folding import ShapeFoldingPass
from graphopt_tests.helpers import make_model, op_types, run_pass, tensor_info
from graphopt_tests.passes.erasure.util import check, inferred

F = T.FLOAT
I64 = T.INT64


def test_shape_size_folded():
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Shape", ["a"], ["s"]),
            helper.make_node("Shape", ["a"], ["s2"], start=-2, end=10),
            helper.make_node("Size", ["a"], ["n"]),
            helper.make_node("Reshape", ["a", "s"], ["y"]),
        ],
        [tensor_info("x", F, [2, 3, 4])],
        [
            tensor_info("y", F, [2, 3, 4]),
            tensor_info("s2", I64, [2]),
            tensor_info("n", I64, []),
        ],
    )
    _, hits, ops = check(inferred(model), ShapeFoldingPass)
    assert hits == 3 and "Shape" not in ops and "Size" not in ops


def test_shape_of_dynamic_tensor_kept():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Shape", ["a"], ["y"])],
        [tensor_info("x", F, ["n", 3])],
        [tensor_info("y", I64, [2])],
    )
    _, hits, ops = check(inferred(model), ShapeFoldingPass, shapes={"x": (5, 3)})
    assert hits == 0 and "Shape" in ops


def test_cse_merges_duplicates_and_keeps_output_names():
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Relu", ["x"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
            helper.make_node("Relu", ["x"], ["z"]),
        ],
        [tensor_info("x", F, [4])],
        [tensor_info("y", F, [4]), tensor_info("z", F, [4])],
    )
    after, hits, ops = check(model, CsePass)
    # b merges into a; z is a graph output and takes a's place, keeping its name
    assert hits == 2 and ops.count("Relu") == 1
    assert [v.name for v in after.graph.outputs] == ["y", "z"]


def test_cse_two_graph_outputs_not_merged():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
        [tensor_info("x", F, [4])],
        [tensor_info("y", F, [4]), tensor_info("z", F, [4])],
    )
    _, hits, _ = check(model, CsePass)
    assert hits == 0


def test_cse_never_merges_random_ops():
    model = make_model(
        [
            helper.make_node("RandomUniformLike", ["x"], ["a"]),
            helper.make_node("RandomUniformLike", ["x"], ["b"]),
            helper.make_node("Sub", ["a", "b"], ["y"]),
        ],
        [tensor_info("x", F, [4])],
        [tensor_info("y", F, [4])],
    )
    after, hits = run_pass(model, CsePass)
    assert hits == 0 and op_types(after).count("RandomUniformLike") == 2


def test_cse_inside_subgraph():
    body = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["p"]),
            helper.make_node("Neg", ["x"], ["q"]),
            helper.make_node("Add", ["p", "q"], ["t"]),
        ],
        "then",
        [],
        [tensor_info("t", F, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"])], "else", [], [tensor_info("e", F, [2])]
    )
    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)],
        [tensor_info("x", F, [2]), tensor_info("c", T.BOOL, [])],
        [tensor_info("y", F, [2])],
    )
    feeds = {"x": np.array([1.0, -2.0], np.float32), "c": np.array(True)}
    _, hits, ops = check(model, CsePass, feeds=feeds)
    assert hits == 1 and ops.count("Neg") == 1


def test_dedup_initializers():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = make_model(
        [
            helper.make_node("Add", ["x", "w1"], ["a"]),
            helper.make_node("Add", ["a", "w2"], ["b"]),
            helper.make_node("Mul", ["b", "w3"], ["y"]),
        ],
        [tensor_info("x", F, [2, 3])],
        [tensor_info("y", F, [2, 3])],
        {"w1": w, "w2": w.copy(), "w3": w + 1},
    )
    after, hits, _ = check(model, DedupInitializersPass)
    assert hits == 1 and len(after.graph.initializers) == 2


def test_dedup_never_merges_graph_input_initializers():
    w = np.ones((3,), np.float32)
    model = make_model(
        [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "w2"], ["y"])],
        [tensor_info("x", F, [3]), tensor_info("w1", F, [3])],
        [tensor_info("y", F, [3])],
        {"w1": w, "w2": w.copy()},
    )
    after, hits = run_pass(model, DedupInitializersPass)
    assert hits == 0 and len(after.graph.initializers) == 2


def test_dedup_external_data(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("MatMul", ["a", "w2"], ["y"]),
        ],
        [tensor_info("x", F, [2, 64])],
        [tensor_info("y", F, [2, 64])],
        {"w1": w, "w2": w.copy()},
    )
    proto = io.to_proto(model)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, size_threshold=0, location="m.data")
    loaded = io.load(path).model
    after, hits = run_pass(loaded, DedupInitializersPass)
    assert hits == 1 and len(after.graph.initializers) == 1


def test_dedup_compares_an_external_tensor_with_an_in_memory_twin(tmp_path):
    """A pass that replaced one of two external weights (quantization writes new in-memory
    tensors) leaves an external and an in-memory tensor with equal bytes: compared chunk by
    chunk, which once tested a numpy chunk's truth value and crashed (rolled back)."""
    import onnx_ir as ir

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("MatMul", ["a", "w2"], ["y"]),
        ],
        [tensor_info("x", F, [2, 64])],
        [tensor_info("y", F, [2, 64])],
        {"w1": w, "w2": w.copy()},
    )
    path = tmp_path / "m.onnx"
    onnx.save(
        io.to_proto(model), path, save_as_external_data=True, size_threshold=0, location="m.data"
    )
    loaded = io.load(path).model
    w2 = loaded.graph.initializers["w2"]
    w2.const_value = ir.Tensor(w.copy(), name="w2")  # now in memory, w1 still external
    after, hits = run_pass(loaded, DedupInitializersPass)
    assert hits == 1 and len(after.graph.initializers) == 1


def test_unused_initializers_and_dead_code():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["dead"])],
        [tensor_info("x", F, [3])],
        [tensor_info("y", F, [3])],
        {"unused": np.ones(3, np.float32)},
    )
    after, hits, ops = check(model, DeadCodePass)
    assert ops == ["Relu"]
    after, hits, _ = check(after, UnusedInitializersPass)
    assert hits == 0  # dead-code already dropped the main graph's unused initializers
    after, hits, _ = check(model, UnusedInitializersPass)
    assert hits == 1 and not after.graph.initializers


def test_partly_dynamic_shape_gather_and_slice_of_static_dims_folded():
    """TorchScript's Shape→Gather on a [N, 8, 4] tensor: the 8 is known, N is not."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
        helper.make_node("Slice", ["s", "start2", "end_big"], ["tail"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["c", "axes0"], ["c1"]),
        helper.make_node("Concat", ["minus1", "c1", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n_out"]),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", T.FLOAT, ["N", 8, 4])],
        [tensor_info("y", T.FLOAT, ["N", 8, 4]), tensor_info("n_out", T.INT64, [1])],
        {
            "one": np.array(1, dtype=np.int64),
            "zero": np.array(0, dtype=np.int64),
            "start2": np.array([2], dtype=np.int64),
            "end_big": np.array([2**62], dtype=np.int64),
            "axes0": np.array([0], dtype=np.int64),
            "minus1": np.array([-1], dtype=np.int64),
        },
    )
    _, hits, ops = check(inferred(model), ShapeFoldingPass, shapes={"x": (3, 8, 4)})
    assert hits == 2  # Gather(1) and Slice(2:); Gather(0) reads the symbolic batch: kept
    assert ops.count("Gather") == 1 and "Slice" not in ops and "Shape" in ops
