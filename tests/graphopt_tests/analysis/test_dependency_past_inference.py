"""Shapes past the node where onnx inference stops.

onnx inference gives up on GroupNormalization (a function op since opset 18, whose body it
does not expand) and leaves every later value without a shape, so pruning refused the
model ("all blocked (Conv: shapes unknown)"). The channel rules now work those shapes out
node by node, and where they cannot, the reason names the op where inference stopped.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import io
from graphopt.analysis.zig import analyze
from graphopt.passes.pruning.prune import PrunePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import tensor_info

F = TensorProto.FLOAT
SHAPES = [(1, 3, 16, 16), (2, 3, 9, 13)]


def group_norm_model(opset: int) -> ir.Model:
    """Conv(3→16) → GroupNormalization(4 groups) → Relu → 1x1 Conv(16→4)."""
    rng = np.random.default_rng(0)
    affine = 4 if opset < 21 else 16  # scale/bias per group (18), per channel (21)
    inits = {
        "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        "b1": rng.standard_normal(16).astype(np.float32),
        "gs": rng.uniform(0.5, 1.5, affine).astype(np.float32),
        "gb": rng.uniform(-1, 1, affine).astype(np.float32),
        "w3": rng.standard_normal((4, 16, 1, 1)).astype(np.float32),
        "b3": rng.standard_normal(4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
        helper.make_node("GroupNormalization", ["c1", "gs", "gb"], ["g"], num_groups=4),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("Conv", ["r", "w3", "b3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [tensor_info("x", F, ["N", 3, "H", "W"])],
        [tensor_info("y", F, ["N", 4, "H", "W"])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    # Not through onnx's checker: it calls opset 18's GroupNormalization deprecated, which
    # ONNX Runtime and exporters still use.
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8
    )
    return io.load(proto).model


def _zeroed(model: ir.Model, gone: list[int], per_group: bool) -> onnx.ModelProto:
    """The original with the removed channels' conv rows, biases and norm affine zeroed."""
    proto = ir.to_proto(model)
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init).copy()
        if init.name in ("w1", "b1"):
            array[gone] = 0
        elif init.name in ("gs", "gb"):
            array[sorted({c // 4 for c in gone}) if per_group else gone] = 0
        init.CopyFrom(numpy_helper.from_array(array, init.name))
    return proto


@pytest.mark.parametrize("opset", [18, 21])
def test_a_model_with_group_normalization_prunes_whole_groups(opset) -> None:
    model = group_norm_model(opset)
    report = analyze(model, {"x": SHAPES[0]})
    (group,) = report.prunable
    assert group.size == 4  # the normalization groups
    assert {m.tensor for m in group.members} >= {"w1", "w3"}  # w3: shapes past the norm
    pruned = model.clone()
    PrunePass(PassContext(), flops=0.3)(pruned)
    w1 = next(n.inputs[1] for n in pruned.graph if n.op_type == "Conv")
    kept = {tuple(r) for r in w1.const_value.numpy().reshape(len(w1.const_value.numpy()), -1)}
    rows = model.graph.initializers["w1"].const_value.numpy().reshape(16, -1)
    gone = [k for k in range(16) if tuple(rows[k]) not in kept]
    assert gone and len(gone) % 4 == 0
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(
        _zeroed(model, gone, opset < 21).SerializeToString(), options, ["CPUExecutionProvider"]
    )
    got = ort.InferenceSession(
        ir.to_proto(pruned).SerializeToString(), options, ["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(1)
    for shape in SHAPES:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        expected = want.run(None, feeds)[0]
        np.testing.assert_allclose(got.run(None, feeds)[0], expected, rtol=1e-4, atol=1e-4)


def test_a_block_past_an_op_without_rules_names_that_op() -> None:
    """Past a custom op nothing can be worked out: the reason says where inference stops."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "raw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("Mystery", ["raw"], ["bias"], domain="com.example"),
        helper.make_node("Conv", ["r", "w2", "bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [tensor_info("x", F, [1, 3, 8, 8])], [tensor_info("y", F, [1, 4, 8, 8])], inits
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
        ir_version=8,
    )
    (group,) = [g for g in analyze(io.load(proto).model).groups if g.size == 8]
    assert group.reasons == ["Conv: shapes unknown (shape inference stops at com.example.Mystery)"]
