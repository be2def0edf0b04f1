import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from graphopt.passes.erasure.dropout import DropoutPass
from graphopt.passes.erasure.identity import IdentityPass
from graphopt_tests.helpers import make_model, op_types, run_pass, tensor_info
from graphopt_tests.passes.erasure.util import check

F = T.FLOAT


def test_identity_removed_and_output_name_kept():
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
            helper.make_node("Identity", ["b"], ["y"]),
        ],
        [tensor_info("x", F, [2, 3])],
        [tensor_info("y", F, [2, 3])],
    )
    _, hits, ops = check(model, IdentityPass)
    assert hits == 2 and ops == ["Relu"]


def test_identity_between_input_and_output_is_kept():
    model = make_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [tensor_info("x", F, [2])],
        [tensor_info("y", F, [2])],
    )
    _, hits, ops = check(model, IdentityPass)
    assert hits == 0 and ops == ["Identity"]


def test_identity_feeding_subgraph_value():
    # the subgraph reads `b` from the outer scope; it must follow the rewire to `a`
    then = helper.make_graph(
        [helper.make_node("Neg", ["b"], ["t"])], "then", [], [tensor_info("t", F, [2])]
    )
    other = helper.make_graph(
        [helper.make_node("Abs", ["b"], ["e"])], "else", [], [tensor_info("e", F, [2])]
    )
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        ],
        [tensor_info("x", F, [2]), tensor_info("c", T.BOOL, [])],
        [tensor_info("y", F, [2])],
    )
    for cond in (True, False):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(cond)}
        _, hits, ops = check(model, IdentityPass, feeds=feeds)
        assert hits == 1 and "Identity" not in ops


def _dropout_model(opset, extra_inputs=(), outputs=("y",), inits=None):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Dropout", ["a", *extra_inputs], list(outputs)),
    ]
    if "mask" in outputs:
        nodes.append(helper.make_node("Not", ["mask"], ["m2"]))
    outs = [tensor_info("y", F, [2, 3])]
    if "mask" in outputs:
        outs.append(tensor_info("m2", T.BOOL, [2, 3]))
    return make_model(nodes, [tensor_info("x", F, [2, 3])], outs, inits or {}, opset=opset)


def test_dropout_removed_inference():
    model = _dropout_model(13)
    _, hits, ops = check(model, DropoutPass)
    assert hits == 1 and ops == ["Relu"]


def test_dropout_training_false_constant():
    model = _dropout_model(
        13, ["r", "t"], inits={"r": np.array(0.5, np.float32), "t": np.array(False)}
    )
    _, hits, ops = check(model, DropoutPass)
    assert hits == 1 and "Dropout" not in ops


def test_dropout_training_mode_is_refused():
    model = _dropout_model(
        13, ["r", "t"], inits={"r": np.array(0.5, np.float32), "t": np.array(True)}
    )
    after, hits = run_pass(model, DropoutPass)
    assert hits == 0 and "Dropout" in op_types(after)


def test_dropout_training_mode_as_input_is_refused():
    model = make_model(
        [helper.make_node("Dropout", ["x", "", "t"], ["y"])],
        [tensor_info("x", F, [2, 3]), tensor_info("t", T.BOOL, [])],
        [tensor_info("y", F, [2, 3])],
        opset=13,
    )
    after, hits = run_pass(model, DropoutPass)
    assert hits == 0 and op_types(after) == ["Dropout"]


def test_dropout_used_mask_becomes_all_true():
    model = _dropout_model(13, outputs=("y", "mask"))
    _, hits, ops = check(model, DropoutPass)
    assert hits == 1 and "Dropout" not in ops and "ConstantOfShape" in ops


@pytest.mark.parametrize("opset", [10, 11])
def test_an_old_dropout_with_a_read_mask_is_kept(opset: int) -> None:
    """Dropout-7..11 leave the inference mask undefined and ONNX Runtime fills it with False;
    the pass fed its readers all-true (error 1.53 on Add(y, mask) at opset 9)."""
    model = _dropout_model(opset, outputs=("y", "mask"))
    after, hits = run_pass(model, DropoutPass)
    assert hits == 0 and "Dropout" in op_types(after)
    # Without a reader of the mask it still goes.
    _, hits, ops = check(_dropout_model(opset), DropoutPass)
    assert hits == 1 and "Dropout" not in ops


def test_dropout_mask_as_graph_output():
    model = make_model(
        [helper.make_node("Dropout", ["x"], ["y", "mask"])],
        [tensor_info("x", F, [2, 3])],
        [tensor_info("y", F, [2, 3]), tensor_info("mask", T.BOOL, [2, 3])],
        opset=13,
    )
    # y would have to become the graph input x, so Dropout stays (its mask may go constant)
    _, hits, ops = check(model, DropoutPass)
    assert hits == 0 and "Dropout" in ops


def test_dropout_old_opset_is_test_zero_refused():
    node = helper.make_node("Dropout", ["x"], ["y"], is_test=0)
    proto = helper.make_model(
        helper.make_graph(
            [node, helper.make_node("Relu", ["y"], ["z"])],
            "g",
            [tensor_info("x", F, [2])],
            [tensor_info("z", F, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 6)],
        ir_version=3,
    )
    from graphopt import io

    model = io.load(proto).model
    after, hits = run_pass(model, DropoutPass)
    assert hits == 0 and "Dropout" in op_types(after)
    onnx.checker.check_model(proto)
