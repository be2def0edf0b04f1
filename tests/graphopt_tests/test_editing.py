"""The graph-editing helpers: ``take_over`` moves every use and the name of a value."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.editing import (
    add_initializer,
    fill_missing_shapes,
    insert_after,
    insert_before,
    remove_node,
    replace_value,
    take_over,
)
from graphopt_tests.helpers import assert_same_outputs, make_model, tensor_info


def _model(output: str) -> ir.Model:
    """x -> Relu -> a -> Neg -> y  (or a itself is the output)."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu")]
    if output == "y":
        nodes.append(helper.make_node("Neg", ["a"], ["y"], name="neg"))
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [2, 3])],
        [tensor_info(output, TensorProto.FLOAT, [2, 3])],
    )


def _swap_relu_for_max(model: ir.Model) -> ir.Value:
    """Replace Relu(x) by Max(x, x - x) (the same values), through ``take_over``."""
    relu = next(n for n in model.graph if n.name == "relu")
    x = relu.inputs[0]
    zero = ir.node("Sub", [x, x], name="zero")
    new = ir.node("Max", [x, zero.outputs[0]], name="max")
    insert_before(relu, [zero, new])
    take_over(relu.outputs[0], new.outputs[0])
    remove_node(relu)
    return new.outputs[0]


def test_the_new_value_gets_the_uses_and_the_name() -> None:
    model = _model("y")
    before = model.clone()
    value = _swap_relu_for_max(model)
    assert value.name == "a"
    neg = next(n for n in model.graph if n.name == "neg")
    assert neg.inputs[0] is value
    assert_same_outputs(before, model, tolerance=0.0)


def test_a_graph_output_keeps_its_name() -> None:
    model = _model("a")
    before = model.clone()
    value = _swap_relu_for_max(model)
    assert [v.name for v in model.graph.outputs] == ["a"] and model.graph.outputs[0] is value
    assert_same_outputs(before, model, tolerance=0.0)


@pytest.mark.parametrize("output", ["a", "y"])
def test_a_node_appended_after_a_value_keeps_reading_it(output: str) -> None:
    """An Add inserted after a layer that then takes over the layer's output (pruning's bias
    compensation on a MatMul that is the graph output): replace_value rewired the Add's own
    input too, a cycle ORT refused ("the graph is not acyclic", exit 3)."""
    model = _model(output)
    before = model.clone()
    last = list(model.graph)[-1]
    out = last.outputs[0]
    zero = add_initializer(model.graph, "zero", np.zeros((2, 3), np.float32))
    add = ir.node("Add", [out, zero], name="after")
    insert_after(last, [add])
    assert replace_value(out, add.outputs[0])
    assert add.inputs[0] is out and add.outputs[0].name == output
    assert out.name and out.name != output  # still read, so still named
    assert_same_outputs(before, model, tolerance=0.0)


def test_shape_filling_remembers_a_model_without_keeping_it_alive() -> None:
    """The skip-if-unchanged memory holds the model weakly: a clone inferred and dropped
    (as the fp16 type fill does) is freed, not pinned until the next call."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
        [tensor_info("x", TensorProto.FLOAT, ["N", 4])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    fill_missing_shapes(model)  # fills in r's shape
    assert model.graph.node(0).outputs[0].shape is not None
    fill_missing_shapes(model)  # changes nothing: remembered
    held = weakref.ref(model)
    del model
    gc.collect()
    assert held() is None


def test_take_over_by_a_node_reading_the_value_keeps_it_named() -> None:
    """take_over(y, Add(y, y)) kept the Add reading y (replace_value) but dropped y's name:
    the model could not be serialized (SerdeError on a nameless value)."""
    model = _model("y")
    before = model.clone()
    neg = next(n for n in model.graph if n.name == "neg")
    out = neg.inputs[0]
    double = ir.node("Add", [out, out], name="double")
    insert_after(next(n for n in model.graph if n.name == "relu"), [double])
    half = add_initializer(model.graph, "half", np.full((2, 3), 0.5, np.float32))
    scale = ir.node("Mul", [double.outputs[0], half], name="halve")
    insert_after(double, [scale])
    take_over(out, scale.outputs[0])
    assert scale.outputs[0].name == "a" and out.name and out.name != "a"
    assert double.inputs[0] is out
    assert_same_outputs(before, model, tolerance=0.0)
