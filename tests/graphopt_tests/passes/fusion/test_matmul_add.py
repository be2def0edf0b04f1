"""fuse-matmul-add: MatMul + Add → Gemm only where the pair is exactly a Gemm."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.matmul_add import FuseMatMulAddPass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT
K, N = 5, 4


def _model(a_shape, c_shape, bias_first=False, c_input=False, extra_output=False):
    rng = np.random.default_rng(0)
    inits = {"B": rng.normal(size=(K, N)).astype(np.float32)}
    inputs = [tensor_info("A", F, a_shape)]
    if c_input:
        inputs.append(tensor_info("C", F, c_shape))
    else:
        inits["C"] = rng.normal(size=c_shape).astype(np.float32)
    add_inputs = ["C", "p"] if bias_first else ["p", "C"]
    nodes = [
        helper.make_node("MatMul", ["A", "B"], ["p"]),
        helper.make_node("Add", add_inputs, ["Y"]),
    ]
    # output dims left to shape inference (A's rows may be symbolic)
    outputs = [tensor_info("Y", F, [None] * max(len(a_shape), len(c_shape)))]
    if extra_output:
        outputs.append(tensor_info("p", F, [*a_shape[:-1], N]))
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize(
    ("c_shape", "bias_first", "c_input"),
    [((N,), False, False), ((3, N), True, False), ((3, 1), False, False)],
)
def test_exact_gemm_is_fused(c_shape, bias_first: bool, c_input: bool) -> None:
    model = _model((3, K), c_shape, bias_first, c_input)
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 1
    assert op_types(after) == ["Gemm"]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    assert_same_outputs(model, roundtrip(after))


def test_symbolic_m_with_row_bias_is_fused() -> None:
    model = _model(("M", K), (N,))
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 1
    assert_same_outputs(model, roundtrip(after), shapes={"A": (7, K)})


@pytest.mark.parametrize(
    ("a_shape", "c_shape"),
    [
        ((2, 3, K), (N,)),  # 3-D A: Gemm cannot express it
        ((3, K), (2, 3, N)),  # bias raises the rank of the result
        ((1, K), (6, N)),  # bias broadcasts the product's rows up
        (("M", K), (6, N)),  # M unknown: it might be 1 at run time
    ],
)
def test_non_gemm_shapes_are_refused(a_shape, c_shape) -> None:
    model = _model(a_shape, c_shape)
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 0
    assert op_types(after) == ["MatMul", "Add"]


def test_matmul_output_used_elsewhere_is_refused() -> None:
    model = _model((3, K), (N,), extra_output=True)
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 0
    assert op_types(after) == ["MatMul", "Add"]


def test_non_constant_b_is_refused() -> None:
    nodes = [
        helper.make_node("MatMul", ["A", "B"], ["p"]),
        helper.make_node("Add", ["p", "C"], ["Y"]),
    ]
    inputs = [tensor_info("A", F, [3, K]), tensor_info("B", F, [K, N])]
    c = np.random.default_rng(1).normal(size=N).astype(np.float32)
    model = make_model(nodes, inputs, [tensor_info("Y", F, [3, N])], {"C": c})
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 0
    assert op_types(after) == ["MatMul", "Add"]


def test_a_c_fed_by_a_graph_input_is_refused() -> None:
    """Only a constant C is a bias: one the caller feeds stays an Add."""
    after, hits = run_pass(_model((3, K), (1, N), c_input=True), FuseMatMulAddPass)
    assert hits == 0
    assert op_types(after) == ["MatMul", "Add"]


def _residual_mlp(blocks: int = 4, width: int = 32) -> onnx.ModelProto:
    """x → blocks × (x + Relu(x·A)·B), 2-D: every residual sum is MatMul + Add(activation)."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], {}, "x"
    for i in range(blocks):
        nodes += [
            helper.make_node("MatMul", [cur, f"A{i}"], [f"h{i}"], name=f"up{i}"),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("MatMul", [f"r{i}", f"B{i}"], [f"o{i}"], name=f"down{i}"),
            helper.make_node("Add", [cur, f"o{i}"], [f"s{i}"], name=f"sum{i}"),
        ]
        for w in "AB":
            inits[f"{w}{i}"] = (rng.standard_normal((width, width)) * 0.2).astype(np.float32)
        cur = f"s{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [tensor_info("x", F, ["N", width])],
        [tensor_info(cur, F, ["N", width])],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_a_residual_sum_stays_an_add_and_outputs_match_at_two_shapes() -> None:
    """x + r·B with x an activation used to become Gemm(r, B, x): ORT's CPU provider fuses
    that itself, and the Gemm hid the residual Add from the lossy passes."""
    from graphopt import io

    model = io.load(_residual_mlp()).model
    after, hits = run_pass(model, FuseMatMulAddPass)
    assert hits == 0
    assert "Gemm" not in op_types(after)
    for rows in (1, 5):
        assert_same_outputs(model, roundtrip(after), shapes={"x": (rows, 32)})


@pytest.mark.parametrize("mode", ["erase-blocks", "int8-dynamic"])
def test_the_lossy_passes_see_the_residual_blocks_after_the_exact_ones(tmp_path, mode) -> None:
    """The default pipeline runs the exact passes first: on a residual MLP, erase-blocks
    found "0 erasable residual block(s)" (exit 2) and int8-dynamic kept the 4 layers ending
    in a residual Gemm in float. Every block is found, every layer quantized, now."""
    from graphopt.api import OptimizeOptions, optimize

    source, out = tmp_path / "res.onnx", tmp_path / "out.onnx"
    onnx.save(_residual_mlp(), source)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((48, 32)).astype(np.float32))
    if mode == "erase-blocks":
        options = OptimizeOptions(erase_blocks="1", calib=str(calib), verify=False)
        record = optimize(source, out, options).report.details["erase-blocks"]
        assert len(record.blocks) == 4 and len(record.removed) == 1
    else:
        options = OptimizeOptions(quantize="int8-dynamic", verify=False)
        record = optimize(source, out, options).report.details["quantize"]
        layers = [layer for layer in record.layers if layer.op_type in ("MatMul", "Gemm")]
        assert len(layers) == 8 and all(layer.precision == "int8" for layer in layers)
