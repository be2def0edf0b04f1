"""initializer-inputs, and the default pipeline as a whole."""

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper

from graphopt import io
from graphopt.analysis.stats import count_nodes
from graphopt.passes.erasure.constant_folding import ConstantFoldingPass
from graphopt.passes.erasure.initializer_inputs import InitializerInputsPass
from graphopt.pipeline import PassManager, default_pipeline
from graphopt.registry import PassContext
from graphopt_tests.helpers import assert_same_outputs, op_types, roundtrip, tensor_info

F = T.FLOAT


def _old_ir_model():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["w", "two"], ["w2"]),
            helper.make_node("Add", ["x", "w2"], ["y"]),
        ],
        "old",
        [tensor_info("x", F, [2, 3]), tensor_info("w", F, [2, 3]), tensor_info("two", F, [])],
        [tensor_info("y", F, [2, 3])],
        [
            onnx.numpy_helper.from_array(w, "w"),
            onnx.numpy_helper.from_array(np.array(2, np.float32), "two"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    return io.load(proto).model


def test_initializer_inputs_removed_and_ir_upgraded():
    model = _old_ir_model()
    context = PassContext()
    after = model.clone()
    graph_pass = InitializerInputsPass(context)
    graph_pass(after)
    assert graph_pass.hits == 2 and after.ir_version == 4
    assert [v.name for v in after.graph.inputs] == ["x"]
    assert any("IR" in note for note in context.notes)
    after = roundtrip(after)
    feeds = {"x": np.ones((2, 3), np.float32)}
    assert_same_outputs(model, after, feeds=feeds)
    # now constant: folding may use them
    folded = after.clone()
    ConstantFoldingPass(PassContext())(folded)
    assert op_types(folded) == ["Add"]


def test_initializer_inputs_leaves_new_ir_alone():
    model = _old_ir_model()
    model.ir_version = 8
    graph_pass = InitializerInputsPass(PassContext())
    graph_pass(model)
    assert graph_pass.hits == 0 and len(model.graph.inputs) == 3


def _messy_model():
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"]),
        helper.make_node("Transpose", ["x1"], ["t1"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["t2"], ["s"]),
        helper.make_node("Reshape", ["t2", "s"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax"], ["q"]),
        helper.make_node("Dropout", ["q"], ["d"]),
        helper.make_node("Mul", ["w1", "w2"], ["ww"]),
        helper.make_node("Add", ["d", "ww"], ["a1"]),
        helper.make_node("Add", ["d", "ww"], ["a2"]),
        helper.make_node("Sub", ["a1", "a2"], ["z"]),
        helper.make_node("Add", ["z", "zero"], ["y"]),
    ]
    w = np.arange(4, dtype=np.float32).reshape(1, 1, 1, 4)
    graph = helper.make_graph(
        nodes,
        "messy",
        [tensor_info("x", F, [1, 3, 2, 4])],
        [tensor_info("y", F, [1, 3, 2, 4])],
        [
            onnx.numpy_helper.from_array(w, "w1"),
            onnx.numpy_helper.from_array(w.copy(), "w2"),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "ax"),
            onnx.numpy_helper.from_array(np.zeros(4, np.float32), "zero"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return io.load(proto).model


def test_default_pipeline_reaches_fixed_point():
    model = _messy_model()
    original = model.clone()
    first, report = PassManager(default_pipeline(), PassContext(fold_limit_bytes=None)).run(model)
    assert report.nodes_after < report.nodes_before
    assert_same_outputs(original, roundtrip(first))
    snapshot = io.to_proto(first).SerializeToString()
    again, report2 = PassManager(default_pipeline(), PassContext(fold_limit_bytes=None)).run(first)
    assert all(s.hits == 0 for s in report2.stats), [(s.name, s.hits) for s in report2.stats]
    assert io.to_proto(again).SerializeToString() == snapshot
    assert count_nodes(again) == report.nodes_after
