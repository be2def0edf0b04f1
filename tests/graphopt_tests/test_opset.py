"""Raising the default-domain opset: exact conversions pass, interface changes are refused."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.errors import UserInputError
from graphopt.opset import convert_opset, default_opset


def _scan_8() -> ir.Model:
    """A Scan at opset 8, whose inputs carry a batch axis that Scan 9 no longer has."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["sum_in", "next"], ["sum_out"]),
            helper.make_node("Identity", ["sum_out"], ["scan_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("sum_in", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("next", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("sum_out", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [2]),
        ],
    )
    scan = helper.make_node("Scan", ["", "initial", "x"], ["y", "z"], body=body, num_scan_inputs=1)
    graph = helper.make_graph(
        [scan],
        "g",
        [
            helper.make_tensor_value_info("initial", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 4
    return ir.serde.deserialize_model(model)


def _relu(opset: int) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return ir.serde.deserialize_model(model)


def test_an_exact_conversion_keeps_the_interface_and_says_so() -> None:
    converted, note = convert_opset(_relu(11), 17)
    assert default_opset(converted) == 17 and note == "converted default-domain opset 11 -> 17"
    assert [v.name for v in converted.graph.inputs] == ["x"]


def test_a_conversion_that_changes_the_inputs_is_refused() -> None:
    """The onnx converter turns Scan 8 into Scan 9 by dropping the batch axis from the
    graph's inputs: int8-dynamic (which needs opset 11) then failed with exit 1."""
    with pytest.raises(UserInputError, match=r"changes the model's interface \('initial' \[1, 2\]"):
        convert_opset(_scan_8(), 11)


def test_a_model_without_a_default_domain_import_is_refused_in_words() -> None:
    """onnx's converter asserted in C++ ("assertInVersionRange ... between 1 an") on a model
    that imports only other domains (the training ops' ai.onnx.preview.training)."""
    graph = helper.make_graph(
        [helper.make_node("Custom", ["x"], ["y"], domain="example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("example", 1)])
    model.ir_version = 8
    with pytest.raises(UserInputError, match="imports no default-domain"):
        convert_opset(ir.serde.deserialize_model(model), 11)
