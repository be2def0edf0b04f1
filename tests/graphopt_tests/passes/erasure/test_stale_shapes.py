"""Stale declared shapes (value_info) must not be folded into the graph.

Every model here has the input ``x: [N, 4]`` and a value_info that declares an intermediate
as ``[1, 4]`` (or ``[3, 4]``), as an exporter run at batch 1 leaves it. Each pass must fold
from the shapes the inputs imply, not from the stale declaration: the result is compared
with the original in ONNX Runtime at two batch sizes, one of them not the stale one.
"""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto as T
from onnx import helper

from graphopt import editing, io
from graphopt.analysis.shapes import reconcile_shapes
from graphopt.passes.erasure.noop_ops import NoopOpsPass
from graphopt.passes.erasure.reshape_target import ReshapeTargetPass
from graphopt.passes.erasure.shape_folding import ShapeFoldingPass
from graphopt_tests.helpers import tensor_info
from graphopt_tests.passes.erasure.util import check

I64 = np.int64


def _with_stale(nodes, stale, inits=None, out_shape=("N", 4)) -> ir.Model:
    """x: [N, 4] → nodes → y; value_info declares each of ``stale`` {name: shape}."""
    graph = helper.make_graph(
        nodes,
        "stale",
        [tensor_info("x", T.FLOAT, ["N", 4])],
        [tensor_info("y", T.FLOAT, list(out_shape))],
        [onnx.numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
        value_info=[tensor_info(name, T.FLOAT, list(shape)) for name, shape in stale.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    model = io.load(proto).model
    values = {o.name: o for node in model.graph for o in node.outputs}
    for name, shape in stale.items():  # the loader keeps value_info: it reaches the pass
        assert list(values[name].shape) == list(shape)
    return model


def _shape_chain_model() -> ir.Model:
    """a = Relu(x) (declared [1, 4]); y = Reshape(a, [Shape(a)[0], 4])."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Shape", ["a"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "four"], ["target"], axis=0),
        helper.make_node("Reshape", ["a", "target"], ["y"]),
    ]
    inits = {
        "zero": np.array(0, I64),
        "axes": np.array([0], I64),
        "four": np.array([4], I64),
    }
    return _with_stale(nodes, {"a": [1, 4]}, inits)


def _check_at_two_batches(model, pass_cls):
    results = []
    for batch in (1, 2):
        results.append(check(model, pass_cls, shapes={"x": (batch, 4)}))
    return results[-1]


def test_reconcile_replaces_the_stale_batch() -> None:
    model = _shape_chain_model()
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert list(relu.outputs[0].shape) == [1, 4]
    assert reconcile_shapes(model) > 0
    assert [getattr(d, "value", d) for d in relu.outputs[0].shape] == ["N", 4]


def test_reconcile_keeps_a_declared_int_the_bindings_confirm() -> None:
    # ONNX inference loses the 2 of Reshape(x, [0, 2, -1]) ([N, unk, unk]); the declared
    # [N, 2, 2] holds at every batch, so it stays.
    nodes = [
        helper.make_node("Reshape", ["x", "t"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [tensor_info("x", T.FLOAT, ["N", 4])],
        [tensor_info("y", T.FLOAT, ["N", 2, 2])],
        [onnx.numpy_helper.from_array(np.array([0, 2, -1], I64), "t")],
        value_info=[tensor_info("r", T.FLOAT, ["N", 2, 2])],
    )
    model = io.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).model
    reconcile_shapes(model)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert [getattr(d, "value", d) for d in reshape.outputs[0].shape] == ["N", 2, 2]


def _dims(value):
    return [getattr(d, "value", d) for d in value.shape]


def test_reconcile_drops_a_declared_name_the_bindings_contradict() -> None:
    # c = Concat(x, x) is [2N, 4]; a value_info calling it [N, 4] is stale. Inference only
    # finds a made-up dim there; the bindings (N=1: 2, N=3: 6) contradict N.
    nodes = [
        helper.make_node("Concat", ["x", "x"], ["c"], axis=0),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = _with_stale(nodes, {"c": ["N", 4]}, out_shape=(None, 4))
    reconcile_shapes(model)
    concat = next(n for n in model.graph if n.op_type == "Concat")
    assert _dims(concat.outputs[0])[0] != "N" and _dims(concat.outputs[0])[1] == 4


def test_reconcile_keeps_what_nothing_contradicts_past_a_custom_op() -> None:
    # ONNX inference knows nothing of a custom op's output: its declared [N, 4] stands,
    # and so does the declared 2 after the Reshape that inference alone cannot size.
    nodes = [
        helper.make_node("Mystery", ["x"], ["m"], domain="custom"),
        helper.make_node("Reshape", ["m", "t"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [tensor_info("x", T.FLOAT, ["N", 4])],
        [tensor_info("y", T.FLOAT, ["N", 2, 2])],
        [onnx.numpy_helper.from_array(np.array([0, 2, -1], I64), "t")],
        value_info=[
            tensor_info("m", T.FLOAT, ["N", 4]),
            tensor_info("r", T.FLOAT, ["N", 2, 2]),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)]
    model = io.load(helper.make_model(graph, opset_imports=opsets)).model
    reconcile_shapes(model)
    values = {o.name: o for node in model.graph for o in node.outputs}
    assert _dims(values["m"]) == ["N", 4]
    assert _dims(values["r"]) == ["N", 2, 2]


def test_reconcile_runs_once_per_graph() -> None:
    model = _shape_chain_model()
    assert reconcile_shapes(model) > 0
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.outputs[0].shape = ir.Shape([1, 4])  # a later edit is not second-guessed
    assert reconcile_shapes(model) == 0
    assert list(relu.outputs[0].shape) == [1, 4]


def test_shape_folding_does_not_bake_a_stale_batch() -> None:
    _after, _hits, ops = _check_at_two_batches(_shape_chain_model(), ShapeFoldingPass)
    assert "Shape" in ops  # the batch is symbolic: Shape(a)[0] stays a run-time read


def test_reshape_target_does_not_bake_a_stale_batch() -> None:
    after, hits, _ops = _check_at_two_batches(_shape_chain_model(), ReshapeTargetPass)
    assert hits == 1
    reshape = next(n for n in after.graph if n.op_type == "Reshape")
    # Exact whatever the batch: the batch entry becomes -1, not the stale 1.
    assert editing.constant_array(reshape.inputs[1]).tolist() == [-1, 4]


def test_noop_slice_is_kept_when_only_a_stale_shape_says_so() -> None:
    # y = x[:1] + 0: a no-op only when the batch really is 1, as the stale [1, 4] claims.
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Slice", ["a", "st", "en", "ax"], ["b"]),
        helper.make_node("Abs", ["b"], ["y"]),
    ]
    inits = {
        "st": np.array([0], I64),
        "en": np.array([1], I64),
        "ax": np.array([0], I64),
    }
    model = _with_stale(nodes, {"a": [1, 4], "b": [1, 4]}, inits, out_shape=(1, 4))
    _after, hits, ops = _check_at_two_batches(model, NoopOpsPass)
    assert hits == 0 and "Slice" in ops


def test_noop_expand_is_kept_when_only_a_stale_shape_says_so() -> None:
    # Expand(a, [3, 4]) broadcasts a batch of 1; the stale [3, 4] makes it look a no-op.
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Expand", ["a", "s"], ["b"]),
        helper.make_node("Abs", ["b"], ["y"]),
    ]
    model = _with_stale(nodes, {"a": [3, 4]}, {"s": np.array([3, 4], I64)}, out_shape=(3, 4))
    results = [check(model, NoopOpsPass, shapes={"x": (b, 4)}) for b in (1, 3)]
    assert all(hits == 0 and "Expand" in ops for _, hits, ops in results)
