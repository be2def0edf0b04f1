"""Verification at two input shapes: a rewrite that bakes one value of a symbolic dim fails.

The example from the issue: ``x[N, 4]``, a stale value_info that says an intermediate is
``[1, 4]``, then Shape → Gather → Concat → Reshape. Folding Shape from the declared shape
bakes N = 1; at the one generated shape (N = 1) the result is identical, at N = 2 it fails.
Shape folding itself no longer trusts value_info; ``test-trust-declared-shapes`` below does,
as shape folding did, so that the verification net is tested whatever the passes do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import editing, io
from graphopt.cli import main
from graphopt.registry import GraphPass
from graphopt.verify import Verifier, run_model
from graphopt_tests.helpers import make_model, register_for_test, tensor_info

F = TensorProto.FLOAT


class TrustDeclaredShapesPass(GraphPass):
    """Test only: fold Shape(v) to v's declared shape when it is static (stale or not)."""

    name = "test-trust-declared-shapes"
    exact = True
    ops = frozenset({"Shape"})

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for node in list(model.graph):
            declared = editing.static_shape(node.inputs[0]) if node.op_type == "Shape" else None
            if declared is None:
                continue
            folded = editing.add_initializer(model.graph, "shape", np.array(declared, np.int64))
            if editing.replace_value(node.outputs[0], folded):
                editing.remove_node(node)
                hits += 1
        return hits


def _specialisable(symbolic: bool = True) -> onnx.ModelProto:
    """y = Reshape(x, [N, 2, 2]) with N read from Shape(Relu(x)), whose value_info is stale."""
    batch = "N" if symbolic else 3
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Shape", ["r"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Concat", ["n", "tail"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        "specialisable",
        [helper.make_tensor_value_info("x", F, [batch, 4])],
        [helper.make_tensor_value_info("y", F, [batch, 2, 2])],
        [
            onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
            onnx.numpy_helper.from_array(np.array([2, 2], np.int64), "tail"),
        ],
        # Stale: r has x's shape [N, 4]; this claims N is 1.
        value_info=[helper.make_tensor_value_info("r", F, [1, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return proto


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def _runs_at_batch_2(source: Path, target: Path) -> None:
    """The written model gives the original's output at N = 2 (ORT as verification runs it)."""
    batch2 = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    (expected,) = run_model(io.load(source).model, batch2)
    (got,) = run_model(io.load(target).model, batch2)
    assert got.shape == (2, 2, 2)
    np.testing.assert_array_equal(got, expected)


def test_a_pass_that_bakes_the_batch_is_rolled_back(tmp_path: Path, capsys, monkeypatch) -> None:
    register_for_test(monkeypatch, TrustDeclaredShapesPass)
    source, target = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save_model(_specialisable(), source)
    passes = "test-trust-declared-shapes,dead-code"
    code = main(["optimize", str(source), "-o", str(target), "--passes", passes])
    out = capsys.readouterr().out
    assert code == 0, out
    # At N = 1 alone the baked model is identical; N = 2 fails, so the pass is undone.
    assert "rolled back: test-trust-declared-shapes" in out
    assert "verification passed" in out
    # The report says which shapes were checked: the default (N=1) and a second one (N=2).
    assert "checked at 2 input shapes: N=1: x 1x4 | N=2: x 2x4" in out
    _runs_at_batch_2(source, target)


def test_default_pipeline_output_runs_at_another_batch(tmp_path: Path, capsys) -> None:
    source, target = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save_model(_specialisable(), source)
    code = main(["optimize", str(source), "-o", str(target)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "checked at 2 input shapes" in out
    _runs_at_batch_2(source, target)


def test_verifier_checks_a_second_shape_and_says_which() -> None:
    model = io.load(_specialisable()).model
    verifier = Verifier(model)
    assert [{k: a.shape for k, a in f.items()} for f in verifier.input_sets] == [
        {"x": (1, 4)},
        {"x": (2, 4)},
    ]
    result = verifier.check(model)
    assert result.ok and result.shapes == ["N=1: x 1x4", "N=2: x 2x4"]
    # A candidate with N baked to 1 passes at N=1 and fails at N=2, and the reason says where.
    baked = make_model(
        [helper.make_node("Reshape", ["x", "target"], ["y"])],
        [tensor_info("x", F, ["N", 4])],
        [tensor_info("y", F, ["N", 2, 2])],
        {"target": np.array([1, 2, 2], np.int64)},
    )
    result = verifier.check(baked)
    assert not result.ok
    assert "N=2" in result.reason and "fails in ONNX Runtime" in result.reason


def test_fixed_shapes_are_checked_once() -> None:
    model = io.load(_specialisable(symbolic=False)).model
    verifier = Verifier(model)
    assert len(verifier.input_sets) == 1
    result = verifier.check(model)
    assert result.shapes == ["x 3x4"] and "no symbolic dims" in result.shape_note


def test_a_second_shape_tiled_from_one_given_row_says_its_rows_are_identical() -> None:
    # --verify-inputs at batch 1: the second shape repeats the row, so a rewrite that mixes
    # rows passes there; "checked at 2 input shapes" said nothing of it.
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", F, ["N", 8])],
        [tensor_info("y", F, ["N", 8])],
    )
    one = {"x": np.random.default_rng(5).standard_normal((1, 8)).astype(np.float32)}
    verifier = Verifier(model, feeds=one)
    assert verifier.shapes[1] == "N=2: x 2x8 (your data repeated)"
    assert "x axis 0: 1 row repeated 2x (rows identical)" in verifier.shape_note
    # Generated inputs: nothing to say; several rows: repeated, not identical.
    assert "repeated" not in Verifier(model).shape_note + "".join(Verifier(model).shapes)
    four = {"x": np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)}
    tiled = Verifier(model, feeds=four)
    assert "x axis 0: 4 -> 8, repeated" in tiled.shape_note
    assert "identical" not in tiled.shape_note


def test_outputs_and_shapes_that_compare_nothing_are_named() -> None:
    # y = x[5:6] * k is empty at N=1 and N=2; z = Relu(x) is not. y's row read "0 0 1.0".
    from onnx import numpy_helper

    def build(k: float) -> ir.Model:
        return make_model(
            [
                helper.make_node("Slice", ["x", "s", "e", "ax"], ["t"]),
                helper.make_node("Mul", ["t", "k"], ["y"]),
                helper.make_node("Relu", ["x"], ["z"]),
            ],
            [tensor_info("x", F, ["N", 4])],
            [tensor_info("y", F, ["M", 4]), tensor_info("z", F, ["N", 4])],
            [
                numpy_helper.from_array(np.array([5], np.int64), "s"),
                numpy_helper.from_array(np.array([6], np.int64), "e"),
                numpy_helper.from_array(np.array([0], np.int64), "ax"),
                numpy_helper.from_array(np.array([1.0], np.float32), "k"),
            ],
        )

    result = Verifier(build(1.0)).check(build(1.0))
    assert result.ok
    assert result.outputs[0].not_compared == "empty at every shape"
    assert not result.outputs[1].not_compared
    assert "not compared: 'y' (empty at every shape checked)" in result.shape_note

    # y = x[40:64] at N=64 (the second shape: N=32) is empty there: the second shape
    # compared nothing, and the shapes line says so.
    tail = make_model(
        [helper.make_node("Slice", ["x", "s", "e", "ax"], ["y"])],
        [tensor_info("x", F, ["N", 4])],
        [tensor_info("y", F, ["M", 4])],
        [
            numpy_helper.from_array(np.array([40], np.int64), "s"),
            numpy_helper.from_array(np.array([64], np.int64), "e"),
            numpy_helper.from_array(np.array([0], np.int64), "ax"),
        ],
    )
    verifier = Verifier(tail, input_shapes={"x": (64, 4)})
    assert verifier.shapes == [
        "N=64: x 64x4",
        "N=32: x 32x4 (every output empty: compared nothing)",
    ]
    assert "compared nothing" not in "".join(Verifier(build(1.0)).shapes)


def test_a_second_shape_the_original_rejects_is_explained_with_ort_s_reason() -> None:
    # The note quoted the first 300 characters of ORT's message: its source location, cut
    # mid-word before the shapes that say why.
    from onnx import numpy_helper

    model = make_model(
        [helper.make_node("Reshape", ["x", "shp"], ["y"])],
        [tensor_info("x", F, ["N", 4])],
        [tensor_info("y", F, [1, 4])],
        [numpy_helper.from_array(np.array([1, 4], np.int64), "shp")],
    )
    note = Verifier(model).shape_note
    assert note.startswith("one shape only: N kept at one value")
    assert "Input shape:{2,4}, requested shape:{1,4}" in note
    assert "onnxruntime_src" not in note
