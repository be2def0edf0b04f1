"""residual-sum: a residual Add read only by LayerNormalization becomes a two-input Sum."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.passes.fusion.ort.skip_layer_norm import OrtResidualSumPass
from graphopt.passes.fusion.residual_sum import ResidualSumPass
from graphopt.registry import PassContext
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT
HIDDEN = 32
SHAPE = [1, 8, HIDDEN]


def _block(extra_reader: bool = False, constant_operand: bool = False):
    """y = LayerNorm(MatMul(x, W) + x): a post-LN transformer residual."""
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, size=HIDDEN).astype(np.float32),
        "b": rng.normal(size=HIDDEN).astype(np.float32),
        "c": rng.normal(size=SHAPE).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "c" if constant_operand else "x"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "g", "b"], ["y"], axis=-1, epsilon=1e-5),
    ]
    outputs = [tensor_info("y", F, SHAPE)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["r"], ["z"]))
        outputs.append(tensor_info("z", F, SHAPE))
    return make_model(nodes, [tensor_info("x", F, SHAPE)], outputs, inits)


def _ort_optimized_ops(model) -> list[str]:
    """Op types of ORT's ORT_ENABLE_ALL graph of ``model`` (its optimized_model_filepath)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="graphopt-test-") as tmp:
        target = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.fspath(target)
        options.log_severity_level = 3
        data = io.to_proto(model).SerializeToString()
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(target).graph.node]


def test_residual_add_becomes_sum_and_ort_keeps_layer_norm() -> None:
    model = _block()
    # The premise: ORT fuses the residual Add + LayerNormalization of the original.
    assert "SkipLayerNormalization" in _ort_optimized_ops(model)
    summed, hits = run_pass(model, ResidualSumPass)
    assert hits == 1
    assert sorted(op_types(summed)) == ["LayerNormalization", "MatMul", "Sum"]
    assert_same_outputs(model, roundtrip(summed))
    fused = _ort_optimized_ops(roundtrip(summed))
    assert "SkipLayerNormalization" not in fused
    assert "LayerNormalization" in fused


def test_bias_add_and_shared_sum_are_left_alone() -> None:
    # A constant operand is a bias, not a residual; an Add with another reader is not fused
    # by ORT either. Neither changes.
    for model in (_block(constant_operand=True), _block(extra_reader=True)):
        same, hits = run_pass(model, ResidualSumPass)
        assert hits == 0
        assert "Sum" not in op_types(same)


def test_target_ort_leaves_it_to_ort_residual_sum() -> None:
    _, hits = run_pass(_block(), ResidualSumPass, PassContext(target="ort"))
    assert hits == 0


@pytest.mark.parametrize("pass_class", [ResidualSumPass, OrtResidualSumPass])
def test_two_unnamed_residuals_get_distinct_sum_names(pass_class) -> None:
    """Two post-LN blocks of unnamed nodes: each Sum used to be named "_sum" (from the Add's
    empty name), the duplicate failed verification and the pass was rolled back. Names are
    unique now, and the outputs stay equal at two batch sizes."""
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, size=HIDDEN).astype(np.float32),
        "b": rng.normal(size=HIDDEN).astype(np.float32),
    }
    nodes = []
    for i, x in enumerate(("x", "y0")):
        nodes += [
            helper.make_node("MatMul", [x, "W"], [f"h{i}"]),
            helper.make_node("Add", [f"h{i}", x], [f"r{i}"]),
            helper.make_node("LayerNormalization", [f"r{i}", "g", "b"], [f"y{i}"], axis=-1),
        ]
    shape = ["B", 8, HIDDEN]
    model = make_model(nodes, [tensor_info("x", F, shape)], [tensor_info("y1", F, shape)], inits)
    target = "ort" if pass_class is OrtResidualSumPass else PassContext().target
    summed, hits = run_pass(model, pass_class, PassContext(target=target))
    assert hits == 2
    sums = [node.name for node in summed.graph if node.op_type == "Sum"]
    assert all(sums) and len(set(sums)) == 2
    after = roundtrip(summed)
    onnx.checker.check_model(io.to_proto(after), full_check=True)
    for batch in (1, 3):
        assert_same_outputs(model, after, shapes={"x": (batch, 8, HIDDEN)})
