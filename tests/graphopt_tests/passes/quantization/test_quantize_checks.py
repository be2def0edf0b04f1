"""Refusals before quantizing: layers that only control-flow bodies hold."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import api
from graphopt.errors import UserInputError
from graphopt.passes.quantization.quantize_checks import refuse_nothing_to_quantize
from graphopt_tests.helpers import make_model, tensor_info


def _merged_decoder() -> ir.Model:
    """optimum's merged decoder in small: every MatMul sits in a branch of
    If(use_cache_branch), reading a weight of the main graph."""

    def branch(name: str) -> helper.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], [f"{name}_y"])],
            name,
            [],
            [tensor_info(f"{name}_y", TensorProto.FLOAT, [1, 16])],
        )

    weight = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    return make_model(
        [
            helper.make_node(
                "If",
                ["use_cache_branch"],
                ["y"],
                then_branch=branch("with_past"),
                else_branch=branch("without_past"),
            )
        ],
        [
            tensor_info("use_cache_branch", TensorProto.BOOL, [1]),
            tensor_info("x", TensorProto.FLOAT, [1, 16]),
        ],
        [tensor_info("y", TensorProto.FLOAT, [1, 16])],
        {"w": weight},
    )


@pytest.mark.parametrize("mode", ["int8-dynamic", "int4-weight"])
def test_layers_only_inside_if_branches_are_named_as_such(mode: str) -> None:
    # Before: "nothing to quantize: no layer it rewrites; the model would come back
    # unchanged", on a model with a MatMul per layer, all inside If(use_cache_branch).
    expected = (
        f"quantize {mode}: nothing to quantize in the main graph: all 2 MatMul node(s) it "
        f"rewrites are inside If bodies, which --quantize {mode} does not quantize"
    )
    with pytest.raises(UserInputError) as info:
        refuse_nothing_to_quantize(_merged_decoder(), mode)
    assert str(info.value).startswith(expected)
    options = api.OptimizeOptions(quantize=mode, target="ort")
    with pytest.raises(UserInputError, match="inside If bodies"):
        api.optimize(_merged_decoder(), None, options)


def test_a_main_graph_layer_is_still_quantized_beside_branches() -> None:
    # One MatMul in the main graph is enough to go on (the branches are noted, not refused).
    model = _merged_decoder()
    graph = model.graph
    weight = graph.initializers["w"]
    x = graph.inputs[1]
    node = ir.node("MatMul", [x, weight], num_outputs=1)
    graph.append(node)
    node.outputs[0].name = "z"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape([1, 16])
    graph.outputs.append(node.outputs[0])
    refuse_nothing_to_quantize(model, "int8-dynamic")
