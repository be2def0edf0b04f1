"""Stage order of the default pipeline with lossy passes and a target (no test passes here)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

import graphopt
from graphopt.api import OptimizeOptions
from graphopt_tests.helpers import make_model, tensor_info


def _bias_gelu_mlp() -> ir.Model:
    """x → MatMul → Add(bias) → erf Gelu → MatMul: an ORT Gelu would cover the hidden units."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Div", ["hb", "sqrt2"], ["t1"]),
        helper.make_node("Erf", ["t1"], ["t2"]),
        helper.make_node("Add", ["t2", "one"], ["t3"]),
        helper.make_node("Mul", ["hb", "t3"], ["t4"]),
        helper.make_node("Mul", ["t4", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["y"]),
    ]
    weights = {
        "w1": rng.standard_normal((16, 64)).astype(np.float32),
        "b1": rng.standard_normal(64).astype(np.float32),
        "sqrt2": np.array(np.sqrt(2), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
        "w2": rng.standard_normal((64, 16)).astype(np.float32),
    }
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["batch", 16])],
        [tensor_info("y", TensorProto.FLOAT, ["batch", 16])],
        weights,
    )


def test_target_fusions_run_after_the_lossy_stages() -> None:
    options = OptimizeOptions(target="ort", prune="flops=0.3", calib="random")
    result = graphopt.optimize(_bias_gelu_mlp(), None, options)
    stats = {row.name: row for row in result.report.stats}
    assert stats["prune"].hits > 0, "the contrib fusion ran first and blocked the hidden units"
    assert stats["ort-gelu"].hits == 1
    contrib = [n.op_type for n in result.model.graph if n.domain == "com.microsoft"]
    assert contrib == ["Gelu"]  # the bias went into a Gemm: BiasGelu has nothing to take
    (w1,) = [v for v in result.model.graph.initializers.values() if v.shape and v.shape[0] == 16]
    assert w1.shape[1] < 64
