"""--target ort fusions run under graphopt's own guards: fold limit, trigger ops, no chdir."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

import graphopt
from graphopt.api import OptimizeOptions
from graphopt.passes.fusion.ort._base import OrtFusionPass
from graphopt.passes.fusion.ort.gelu import OrtGeluPass
from graphopt.registry import PassContext, all_passes
from graphopt_tests.helpers import assert_same_outputs, make_model, op_types, run_pass, tensor_info

FLOAT = TensorProto.FLOAT
ROOT = Path(__file__).resolve().parents[5]


def _gelu_with_big_constant():
    """Erf Gelu (fusable) beside a Tile making 256 KiB out of 16 KiB (over a 64 KiB limit)."""
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["t1"]),
        helper.make_node("Erf", ["t1"], ["t2"]),
        helper.make_node("Add", ["t2", "one"], ["t3"]),
        helper.make_node("Mul", ["x", "t3"], ["t4"]),
        helper.make_node("Mul", ["t4", "half"], ["y"]),
        helper.make_node("Tile", ["small", "reps"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["x", "total"], ["z"]),
    ]
    weights = {
        "sqrt2": np.array(np.sqrt(2), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
        "small": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32),
        "reps": np.array([4, 4], np.int64),
    }
    outputs = [tensor_info("y", FLOAT, [2, 16]), tensor_info("z", FLOAT, [2, 16])]
    return make_model(nodes, [tensor_info("x", FLOAT, [2, 16])], outputs, weights, opset=17)


def test_ort_fusion_folds_under_the_runs_fold_limit():
    model = _gelu_with_big_constant()
    context = PassContext(target="ort", fold_limit_bytes=64 * 1024)
    fused, hits = run_pass(model, OrtGeluPass, context)
    assert hits == 1 and "Gelu" in op_types(fused)
    # onnxscript's own optimizer folds outputs up to 512x512 elements; the run's limit says no.
    assert "Tile" in op_types(fused)
    assert_same_outputs(model, fused)


def test_contrib_fusions_are_skipped_on_a_model_without_their_trigger_ops():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    weights = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    model = make_model(
        nodes,
        [tensor_info("x", FLOAT, ["N", 3, 8, 8])],
        [tensor_info("y", FLOAT, ["N", 4, 8, 8])],
        weights,
    )
    result = graphopt.optimize(model, None, OptimizeOptions(target="ort"))
    fusion_passes = {name for name, cls in all_passes().items() if issubclass(cls, OrtFusionPass)}
    assert len(fusion_passes) >= 6
    runs = {row.name: row.runs for row in result.report.stats if row.name in fusion_passes}
    assert runs == dict.fromkeys(fusion_passes, 0)


def test_every_contrib_fusion_declares_its_trigger_ops():
    for name, cls in all_passes().items():
        if issubclass(cls, OrtFusionPass):
            assert cls.ops, f"{name} runs its whole preparation on every model"


def test_no_library_code_changes_the_working_directory():
    """``os.chdir`` is process-wide: a library must not call it (ORT's shape tool wanted it)."""
    calls = []
    for path in sorted((ROOT / "graphopt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "chdir"
            ):
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls == []
