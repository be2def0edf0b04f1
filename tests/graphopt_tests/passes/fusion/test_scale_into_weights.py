"""fold-scale-into-weights: constant scales before MatMul/Gemm/Conv, or Div after, folded."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.scale_into_weights import FoldScaleIntoWeightsPass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT


def _input_side(
    layer: str,
    op: str,
    s_shape: tuple,
    x_shape: tuple = (3, 4),
    group: int = 1,
    attrs: dict | None = None,
    scale_first: bool = False,
):
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 2.0, size=s_shape).astype(np.float32)
    if layer == "Conv":
        cin = x_shape[1]
        weight = rng.normal(size=(2 * group, cin // group, 3, 3))
    elif layer == "Gemm" and (attrs or {}).get("transB"):
        weight = rng.normal(size=(5, x_shape[-1]))
    elif layer == "Gemm" and (attrs or {}).get("transA"):
        weight = rng.normal(size=(x_shape[0], 5))
    else:
        # rows = the scaled width (s may broadcast a one-column X up: a refusal case)
        weight = rng.normal(size=(max(x_shape[-1], s_shape[-1] if s_shape else 0), 5))
    inits = {"s": scale, "W": weight.astype(np.float32)}
    mul_inputs = ["s", "X"] if scale_first else ["X", "s"]
    nodes = [
        helper.make_node(op, mul_inputs, ["xs"]),
        helper.make_node(
            layer,
            ["xs", "W"],
            ["Y"],
            **({"group": group} if layer == "Conv" else {}),
            **(attrs or {}),
        ),
    ]
    x = tensor_info("X", F, list(x_shape))
    return make_model(nodes, [x], [tensor_info("Y", F, [None] * len(x_shape))], inits)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": "MatMul", "op": "Mul", "s_shape": (4,)},
        {"layer": "MatMul", "op": "Div", "s_shape": ()},
        {
            "layer": "MatMul",
            "op": "Mul",
            "s_shape": (1, 1, 4),
            "x_shape": (2, 3, 4),
            "scale_first": True,
        },
        {"layer": "Gemm", "op": "Mul", "s_shape": (1, 4), "attrs": {"transB": 1, "alpha": 0.5}},
        {"layer": "Gemm", "op": "Div", "s_shape": (), "x_shape": (4, 3), "attrs": {"transA": 1}},
        {"layer": "Conv", "op": "Mul", "s_shape": (4, 1, 1), "x_shape": (1, 4, 6, 6)},
        {
            "layer": "Conv",
            "op": "Div",
            "s_shape": (1, 4, 1, 1),
            "x_shape": (1, 4, 6, 6),
            "group": 2,
            "attrs": {"pads": [1, 1, 1, 1]},
        },
        {"layer": "Conv", "op": "Mul", "s_shape": (4, 1, 1), "x_shape": (1, 4, 6, 6), "group": 4},
    ],
)
def test_input_side_folded(kwargs: dict) -> None:
    model = _input_side(**kwargs)
    after, hits = run_pass(model, FoldScaleIntoWeightsPass)
    assert hits == 1
    assert op_types(after) == [kwargs["layer"]]
    assert len(after.graph.initializers) == 1
    assert_same_outputs(model, roundtrip(after))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": "MatMul", "op": "Mul", "s_shape": (3, 1)},  # per row
        {"layer": "MatMul", "op": "Mul", "s_shape": (4,), "x_shape": (3, 1)},  # broadcasts x up
        {"layer": "Gemm", "op": "Mul", "s_shape": (3,), "x_shape": (4, 3), "attrs": {"transA": 1}},
        {"layer": "Conv", "op": "Mul", "s_shape": (1, 1, 6), "x_shape": (1, 4, 6, 6)},  # spatial
        {"layer": "MatMul", "op": "Div", "s_shape": (4,), "scale_first": True},  # s / x
    ],
)
def test_input_side_refused(kwargs: dict) -> None:
    model = _input_side(**kwargs)
    after, hits = run_pass(model, FoldScaleIntoWeightsPass)
    assert hits == 0
    assert len(op_types(after)) == 2


def _output_side(
    layer: str, d_shape: tuple, bias: bool = True, attrs: dict | None = None, zero: bool = False
):
    rng = np.random.default_rng(1)
    divisor = rng.uniform(0.5, 2.0, size=d_shape).astype(np.float32)
    if zero:
        divisor[...] = 0
    if layer == "Conv":
        weight, b, x_shape = rng.normal(size=(6, 3, 3, 3)), rng.normal(size=6), (1, 3, 5, 5)
    elif layer == "Gemm" and (attrs or {}).get("transB"):
        weight, b, x_shape = rng.normal(size=(6, 4)), rng.normal(size=(1, 6)), (3, 4)
    else:
        weight, b, x_shape = rng.normal(size=(4, 6)), rng.normal(size=6), (3, 4)
    inits = {"d": divisor, "W": weight.astype(np.float32)}
    inputs = ["X", "W"]
    if bias and layer != "MatMul":
        inits["B"] = b.astype(np.float32)
        inputs.append("B")
    nodes = [
        helper.make_node(layer, inputs, ["y"], **(attrs or {})),
        helper.make_node("Div", ["y", "d"], ["Y"]),
    ]
    x = tensor_info("X", F, list(x_shape))
    return make_model(nodes, [x], [tensor_info("Y", F, [None] * len(x_shape))], inits)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": "MatMul", "d_shape": (6,)},
        {"layer": "MatMul", "d_shape": ()},
        {"layer": "Gemm", "d_shape": (1, 6), "attrs": {"transB": 1, "beta": 0.5}},
        {"layer": "Gemm", "d_shape": (), "bias": False},
        {"layer": "Conv", "d_shape": (6, 1, 1)},
        {"layer": "Conv", "d_shape": (), "bias": False},
    ],
)
def test_output_side_folded(kwargs: dict) -> None:
    model = _output_side(**kwargs)
    after, hits = run_pass(model, FoldScaleIntoWeightsPass)
    assert hits == 1
    assert op_types(after) == [kwargs["layer"]]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert_same_outputs(model, roundtrip(after))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": "MatMul", "d_shape": (3, 1)},  # per row
        {"layer": "Conv", "d_shape": (1, 5)},  # spatial
        {"layer": "MatMul", "d_shape": (6,), "zero": True},
    ],
)
def test_output_side_refused(kwargs: dict) -> None:
    after, hits = run_pass(_output_side(**kwargs), FoldScaleIntoWeightsPass)
    assert hits == 0
    assert op_types(after)[-1] == "Div"


def test_per_channel_scale_on_unshaped_value_uses_inferred_shape() -> None:
    rng = np.random.default_rng(2)
    inits = {
        "s": rng.uniform(0.5, 2.0, size=4).astype(np.float32),
        "W": rng.normal(size=(4, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Relu", ["X"], ["r"]),  # r carries no shape in the graph
        helper.make_node("Mul", ["r", "s"], ["xs"]),
        helper.make_node("MatMul", ["xs", "W"], ["Y"]),
    ]
    model = make_model(nodes, [tensor_info("X", F, [3, 4])], [tensor_info("Y", F, [3, 5])], inits)
    assert model.graph.node(0).outputs[0].shape is None
    after, hits = run_pass(model, FoldScaleIntoWeightsPass)
    assert hits == 1
    assert op_types(after) == ["Relu", "MatMul"]
    assert_same_outputs(model, roundtrip(after))


def test_erf_gelu_half_is_kept_for_ort_gelu_fusion():
    # x * (1 + erf(x / √2)) * 0.5 → MatMul: folding the 0.5 into W would save one Mul but
    # hide the GELU from ORT's GeluFusion, so the pass leaves it.
    rng = np.random.default_rng(0)
    inits = {
        "sqrt2": np.array(np.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
        "W": rng.normal(size=(4, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Div", ["X", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["X", "a"], ["g"]),
        helper.make_node("Mul", ["g", "half"], ["gh"]),
        helper.make_node("MatMul", ["gh", "W"], ["Y"]),
    ]
    model = make_model(nodes, [tensor_info("X", F, [3, 4])], [tensor_info("Y", F, [3, 5])], inits)
    after, hits = run_pass(model, FoldScaleIntoWeightsPass)
    assert hits == 0
    assert op_types(roundtrip(after)).count("Mul") == 2
    assert_same_outputs(model, after)
