"""fuse-rms-norm: LLaMA/Qwen forms (± float32 casts) → RMSNormalization, refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.rms_norm import FuseRmsNormPass
from graphopt.registry import PassContext
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

SHAPE = (2, 4, 16)


def _model(
    casts=False,
    cast_to=TensorProto.FLOAT,
    divide="reciprocal",
    axes=(-1,),
    opset=23,
    dtype=TensorProto.FLOAT,
):
    mh = helper.make_node
    nodes = []
    x = "x"
    if casts:
        nodes.append(mh("Cast", ["x"], ["xc"], to=cast_to))
        x = "xc"
    nodes += [
        mh("Pow", [x, "two"], ["sq"]),
        mh("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        mh("Add", ["ms", "eps"], ["mse"]),
        mh("Sqrt", ["mse"], ["rms"]),
    ]
    if divide == "reciprocal":  # dynamo
        nodes += [mh("Reciprocal", ["rms"], ["inv"]), mh("Mul", [x, "inv"], ["n"])]
    else:  # TorchScript: Div(1, rms)
        nodes += [mh("Div", ["one", "rms"], ["inv"]), mh("Mul", [x, "inv"], ["n"])]
    if casts:
        nodes.append(mh("Cast", ["n"], ["nb"], to=dtype))
    nodes.append(mh("Mul", ["gamma", "nb" if casts else "n"], ["y"]))
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    cdt = np.float32 if casts and cast_to == TensorProto.FLOAT else np_dtype
    inits = {
        "two": np.array(2.0, cdt),
        "axes": np.array(axes, np.int64),
        "eps": np.array(1e-6, cdt),
        "one": np.array(1.0, cdt),
        "gamma": np.random.default_rng(0).standard_normal(SHAPE[-1]).astype(np_dtype),
    }
    if axes != (-1,):
        inits["gamma"] = inits["gamma"].reshape(-1, 1)[: SHAPE[1]]
    return make_model(
        nodes,
        [tensor_info("x", dtype, SHAPE)],
        [tensor_info("y", dtype, SHAPE)],
        inits,
        opset=opset,
        ir_version=10,
    )


@pytest.mark.parametrize(("casts", "divide"), [(False, "reciprocal"), (True, "one_div")])
def test_fuses_llama_forms(casts, divide):
    model = _model(casts=casts, divide=divide)
    fused, hits = run_pass(model, FuseRmsNormPass)
    assert hits == 1
    assert op_types(roundtrip(fused)) == ["RMSNormalization"]
    assert_same_outputs(model, fused)


def test_float16_with_float32_compute_uses_stash_type():
    model = _model(casts=True, dtype=TensorProto.FLOAT16)
    fused, hits = run_pass(model, FuseRmsNormPass)
    assert hits == 1
    (node,) = list(fused.graph)
    assert node.attributes["stash_type"].value == TensorProto.FLOAT
    assert_same_outputs(model, fused, tolerance=2e-3)  # float16 outputs


def test_refuses_compute_cast_to_float16():
    # Computing in float16 is not expressible: stash_type is the float32 the op uses.
    model = _model(casts=True, cast_to=TensorProto.FLOAT16, dtype=TensorProto.FLOAT)
    assert run_pass(model, FuseRmsNormPass)[1] == 0


def test_refuses_non_trailing_axis_and_says_why():
    model = _model(axes=(1,))
    context = PassContext()
    fused, hits = run_pass(model, FuseRmsNormPass, context)
    assert hits == 0 and "RMSNormalization" not in op_types(fused)
    assert any("not a trailing block" in n for n in context.notes)
    assert_same_outputs(model, fused)


def test_low_opset_only_notes():
    context = PassContext()
    _, hits = run_pass(_model(opset=18), FuseRmsNormPass, context)
    assert hits == 0
    assert any("need opset 23" in n for n in context.notes)


def test_leaves_layer_norm_variance_alone():
    # (x - mean(x)) · rsqrt(mean((x - mean(x))²) + eps) · gamma is a LayerNorm: not RMSNorm's.
    model = _model()
    graph = model.graph
    pow_node = next(n for n in graph if n.op_type == "Pow")
    x = graph.inputs[0]
    axes = graph.initializers["axes"]
    mean = ir.node("ReduceMean", [x, axes], attributes={"keepdims": 1})
    centered = ir.node("Sub", [x, mean.outputs[0]])
    graph.insert_before(pow_node, [mean, centered])
    for node in list(graph):
        if node.op_type in ("Pow", "Mul") and node.inputs[0] is x:
            node.replace_input_with(0, centered.outputs[0])
    _, hits = run_pass(model, FuseRmsNormPass)
    assert hits == 0
