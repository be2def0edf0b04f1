"""ort-unflatten-gemm: Reshape(x→2-D) → Gemm → Reshape(back) becomes one MatMul on x."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt import api, models
from graphopt.passes.fusion.ort.unflatten_gemm import OrtUnflattenGemmPass
from graphopt.registry import PassContext
from graphopt.verify import run_model
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

ORT = PassContext(target="ort")
FLOAT = TensorProto.FLOAT
K, N = 8, 12


def conv1d_model(back_axes: tuple[int, int] = (0, 1), bias: bool = True, trans_b: bool = True):
    """GPT-2 Conv1D as TorchScript exports it: the target of the Reshape back to 3-D is built
    at run time from x's Shape; ``back_axes`` picks which of x's dims it reads (and in what
    order), so (1, 0) is a reshape to a *different* shape than x's leading dims."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    inits = {
        "w": weight,
        "flat": np.array([-1, K], np.int64),
        "i0": np.array(back_axes[0], np.int64),
        "i1": np.array(back_axes[1], np.int64),
        "zero": np.array([0], np.int64),
        "n": np.array([N], np.int64),
    }
    gemm_inputs = ["x2", "w"]
    if bias:
        inits["b"] = rng.standard_normal(N).astype(np.float32)
        gemm_inputs.append("b")
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("Gemm", gemm_inputs, ["y2"], transB=int(trans_b)),
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "i0"], ["d0"]),
        helper.make_node("Gather", ["sx", "i1"], ["d1"]),
        helper.make_node("Unsqueeze", ["d0", "zero"], ["u0"]),
        helper.make_node("Unsqueeze", ["d1", "zero"], ["u1"]),
        helper.make_node("Concat", ["u0", "u1", "n"], ["target"], axis=0),
        helper.make_node("Reshape", ["y2", "target"], ["y3"]),
        helper.make_node("Relu", ["y3"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", FLOAT, ["batch", "seq", K])],
        [tensor_info("y", FLOAT, [None, None, N])],
        inits,
    )


@pytest.mark.parametrize(("bias", "trans_b"), [(True, True), (False, False)])
def test_conv1d_becomes_matmul(bias, trans_b):
    model = conv1d_model(bias=bias, trans_b=trans_b)
    assert run_pass(model, OrtUnflattenGemmPass)[1] == 0  # portable target: untouched
    fused, hits = run_pass(model, OrtUnflattenGemmPass, ORT)
    assert hits == 1
    ops = op_types(fused)
    assert ops == ["MatMul", "Add", "Relu"] if bias else ["MatMul", "Relu"]
    fused = roundtrip(fused)
    for shape in ((2, 5, K), (1, 7, K)):
        assert_same_outputs(model, fused, shapes={"x": shape})
    # Same GEMM, then the bias: bit-identical in ORT, not merely within tolerance.
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 4, K)).astype(np.float32)}
    assert np.array_equal(run_model(model, feeds)[0], run_model(fused, feeds)[0])


def test_reshape_to_other_leading_dims_is_refused():
    # (batch, seq) → (seq, batch, N): same data, different shape; MatMul would give (batch, seq).
    model = conv1d_model(back_axes=(1, 0))
    assert run_pass(model, OrtUnflattenGemmPass, ORT)[1] == 0


def test_gemm_read_elsewhere_is_refused():
    model = conv1d_model()
    gemm_out = next(n for n in model.graph if n.op_type == "Gemm").outputs[0]
    model.graph.outputs.append(gemm_out)  # the 2-D value itself is needed
    assert run_pass(model, OrtUnflattenGemmPass, ORT)[1] == 0


@pytest.mark.parametrize("name", ["gpt2_tiny", "gpt2_tiny_ts"])
def test_gpt2_projections_in_the_ort_pipeline(name):
    # After the attention fusions: c_attn is inside Attention; c_proj (attention), c_fc and
    # c_proj (MLP) in each of the 2 layers lose their Reshape pairs.
    result = api.optimize(models.get(name), None, api.OptimizeOptions(target="ort"))
    assert result.report.verification is not None and result.report.verification.ok
    assert not result.report.rolled_back
    stats = {s.name: s for s in result.report.stats}
    assert stats["ort-unflatten-gemm"].hits == 6
    ops = op_types(result.model)
    assert "Gemm" not in ops
    # No projection reads a Reshape any more (the lm head's MatMul, which produces the graph
    # output, is not one of the Gemms: TorchScript's export reshapes its input).
    for node in result.model.graph:
        if node.op_type == "MatMul" and not node.outputs[0].is_graph_output():
            producer = node.inputs[0].producer()
            assert producer is None or producer.op_type != "Reshape", node.name
    assert ops.count("MatMul") == 7  # 6 projections + the lm head


def sliced_shape_model(opset: int, shape_attrs: bool = False, first: int = 0):
    """Reshape(x, [-1, K]) → Gemm → Reshape to Concat(Slice(Shape(x), first, first + 2), [N]):
    the target as exports below opset 15 spell it (or Shape(x, start, end) with
    ``shape_attrs``, opset 15+; or Slice's attributes below opset 10)."""
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((K, N)).astype(np.float32),
        "b": rng.standard_normal(N).astype(np.float32),
        "flat": np.array([-1, K], np.int64),
        "n": np.array([N], np.int64),
    }
    if shape_attrs:
        lead = [helper.make_node("Shape", ["x"], ["lead"], start=first, end=first + 2)]
    elif opset < 10:
        lead = [
            helper.make_node("Shape", ["x"], ["sx"]),
            helper.make_node("Slice", ["sx"], ["lead"], starts=[first], ends=[first + 2]),
        ]
    else:
        inits |= {"st": np.array([first], np.int64), "en": np.array([first + 2], np.int64)}
        lead = [
            helper.make_node("Shape", ["x"], ["sx"]),
            helper.make_node("Slice", ["sx", "st", "en"], ["lead"]),
        ]
    nodes = [
        *lead,
        helper.make_node("Concat", ["lead", "n"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("Gemm", ["x2", "w", "b"], ["y2"]),
        helper.make_node("Reshape", ["y2", "target"], ["y3"]),
        helper.make_node("Relu", ["y3"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", FLOAT, ["batch", "seq", K])],
        [tensor_info("y", FLOAT, ["batch", "seq", N])],
        inits,
        opset=opset,
    )


@pytest.mark.parametrize(
    ("opset", "shape_attrs"), [(9, False), (13, False), (14, False), (15, True)]
)
def test_target_from_a_sliced_shape_at_every_opset(opset, shape_attrs):
    # ONNX's Reshape-13 inference leaves the output unshaped when the target is computed (14's
    # reads it): the fusion must read the target itself, or it fires at 14 and not at 13.
    model = sliced_shape_model(opset, shape_attrs)
    fused, hits = run_pass(model, OrtUnflattenGemmPass, ORT)
    assert hits == 1
    assert op_types(fused) == ["MatMul", "Add", "Relu"]
    fused = roundtrip(fused)
    for shape in ((2, 5, K), (1, 7, K)):
        feeds = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        assert np.array_equal(run_model(model, feeds)[0], run_model(fused, feeds)[0])


@pytest.mark.parametrize("opset", [13, 14])
def test_target_from_other_sliced_dims_is_refused(opset):
    # Slice(Shape(x), 1, 3) reads (seq, K): a different shape than x's leading (batch, seq).
    model = sliced_shape_model(opset, first=1)
    assert run_pass(model, OrtUnflattenGemmPass, ORT)[1] == 0
