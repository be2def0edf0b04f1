"""The Python API: ``graphopt.optimize`` sources, outputs, options and failures."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt import io
from graphopt.api import OptimizeOptions, default_output_path
from graphopt.errors import CheckFailedError, UserInputError
from graphopt.pipeline import PassSpec
from graphopt_tests.helpers import (
    AddToSubPass,
    SilentAddToSubPass,
    make_model,
    op_types,
    register_for_test,
    tensor_info,
)
from graphopt_tests.test_cli import model_file


def test_optimize_in_memory_writes_nothing(tmp_path: Path) -> None:
    path = model_file(tmp_path)
    proto = onnx.load(str(path))
    for source in (proto, path.read_bytes(), io.load(proto).model):
        result = graphopt.optimize(source)
        assert result.output_path is None
        assert "Neg" not in op_types(result.model)
        assert result.report.verification is not None and result.report.verification.ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_optimize_path_writes_default_output(tmp_path: Path) -> None:
    path = model_file(tmp_path)
    result = graphopt.optimize(path, default_output_path(path))
    assert result.output_path == tmp_path / "m.opt.onnx"
    onnx.checker.check_model(str(result.output_path))
    assert result.report.nodes_after < result.report.nodes_before


def test_options(tmp_path: Path) -> None:
    path = model_file(tmp_path)
    options = OptimizeOptions(
        passes=[PassSpec("dead-code")], verify=False, input_shapes={"x": (2, 4)}
    )
    result = graphopt.optimize(path, options=options)
    assert [s.name for s in result.report.stats] == ["dead-code"]
    assert result.report.verification is None
    assert result.report.verification_skipped == "--no-verify"


def test_in_place_needs_a_path() -> None:
    with pytest.raises(UserInputError, match="needs a model file"):
        graphopt.optimize(b"", in_place=True)


def test_broken_pass_is_rolled_back(tmp_path: Path, monkeypatch) -> None:
    register_for_test(monkeypatch, AddToSubPass)
    result = graphopt.optimize(model_file(tmp_path))
    assert result.report.rolled_back == ["test-add-to-sub"]
    assert result.report.verification.ok


def test_verification_failure_raises(tmp_path: Path, monkeypatch) -> None:
    register_for_test(monkeypatch, SilentAddToSubPass)
    path = model_file(tmp_path)
    options = OptimizeOptions(passes=[PassSpec("test-silent-add-to-sub")])
    with pytest.raises(CheckFailedError, match="verification failed"):
        graphopt.optimize(path, tmp_path / "out.onnx", options)
    assert not (tmp_path / "out.onnx").exists()


def test_unrunnable_original_is_written_but_not_verified(tmp_path: Path) -> None:
    # A custom-domain op ORT does not know: the model cannot be run, so nothing is compared,
    # and the report says so (never a silent "nothing to report").
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], domain="custom")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
        ir_version=8,
    )
    result = graphopt.optimize(proto, tmp_path / "out.onnx")
    assert result.report.verification is None and result.report.verified is False
    assert "cannot run the original model" in result.report.verification_skipped
    assert "--custom-ops" in result.report.verification_skipped  # the domain needs a library
    assert (tmp_path / "out.onnx").is_file()


def test_report_says_whether_the_result_was_verified(tmp_path: Path) -> None:
    path = model_file(tmp_path)
    assert graphopt.optimize(path).report.verified is True
    assert graphopt.optimize(path, options=OptimizeOptions(verify=False)).report.verified is False


@pytest.mark.parametrize("verify", [True, False])
def test_bad_input_shapes_raise_with_or_without_verification(tmp_path: Path, verify) -> None:
    path = model_file(tmp_path)  # x: [batch, 4]
    for shape in ((1, 4, 1), (2, 5), (0, 4)):
        options = OptimizeOptions(verify=verify, input_shapes={"x": shape})
        with pytest.raises(UserInputError, match="--input-shape x:"):
            graphopt.optimize(path, tmp_path / "out.onnx", options)
    assert not (tmp_path / "out.onnx").exists()


def test_the_callers_ir_model_is_left_as_it_was(tmp_path: Path) -> None:
    caller = io.load(onnx.load(str(model_file(tmp_path)))).model
    before = io.to_proto(caller).SerializeToString(deterministic=True)
    result = graphopt.optimize(caller)
    assert "Neg" not in op_types(result.model)
    assert "Neg" in op_types(caller)
    assert io.to_proto(caller).SerializeToString(deterministic=True) == before


def test_a_bad_prune_compensation_lists_prunings_own_refits() -> None:
    """The message listed "none or eora:RANK" (the other passes' words) for prune, which
    also takes bias and lsq."""
    from graphopt_tests.passes.pruning.graphs import cnn

    options = OptimizeOptions(prune="flops=0.3", compensation="eora:x")
    with pytest.raises(UserInputError, match=r"expected none, bias, lsq or eora:RANK with RANK"):
        graphopt.optimize(cnn(), None, options)


@pytest.mark.parametrize("value", ["lsq", "bias"])
def test_prunings_compensation_with_quantize_alone_is_refused(tmp_path, value) -> None:
    """Before: accepted (exit 0) with a note that quantize ran without it, while --round-to
    with --quantize alone was exit 2; with --prune in the run it still goes to pruning."""
    from graphopt.cli import main
    from graphopt_tests.passes.pruning.graphs import cnn

    options = OptimizeOptions(quantize="int8", compensation=value, calib="random")
    with pytest.raises(UserInputError, match=rf"^--compensation {value} only applies with --prune"):
        graphopt.optimize(cnn(), None, options)
    source = tmp_path / "cnn.onnx"
    io.save(cnn(), source)
    args = ["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--calib", "random"]
    assert main([*args, "--quantize", "int8", "--compensation", value]) == 2
    assert not (tmp_path / "o.onnx").exists()
    options = OptimizeOptions(
        prune="flops=0.3", quantize="fp16", compensation=value, calib="random", verify=False
    )
    assert graphopt.optimize(cnn(), None, options).report.details["prune"].units_removed


def test_the_widened_tolerance_note_says_why_for_fp16() -> None:
    """fp16 widens the exact passes' tolerance too (every op rounds its output); the note
    said only "the quantized model rounds at run time", int8's reason, and README listed
    int8/int8-dynamic/fp8 alone."""
    from graphopt_tests.passes.pruning.graphs import cnn

    result = graphopt.optimize(cnn(), None, OptimizeOptions(quantize="fp16"))
    (note,) = [n for n in result.report.notes if "the exact passes after quantize" in n]
    assert "for fp16/bf16, in every op" in note and "change where it rounds" in note


def test_each_output_is_verified_at_its_own_error_after_quantization() -> None:
    """A detector's boxes, reordered by near-tied scores, moved by 0.9 after fp16/int8 and
    set the tolerance of every output, its scores (moved by 0.003) included: an exact pass
    that corrupted the scores by 90% would have passed. Each float output now keeps its own
    quantization error as its tolerance."""
    from graphopt.pipeline import _widen_for_rounding
    from graphopt.registry import PassContext
    from graphopt.verify import Verifier

    outputs = [tensor_info(name, TensorProto.FLOAT, [2, 4]) for name in ("boxes", "scores")]
    model = make_model(
        [helper.make_node("Relu", ["x"], ["boxes"]), helper.make_node("Neg", ["x"], ["scores"])],
        [tensor_info("x", TensorProto.FLOAT, [2, 4])],
        outputs,
    )
    verifier = Verifier(model)
    context = PassContext()
    context.details["quantize"] = SimpleNamespace(
        exact_tolerance_after=0.9, exact_tolerances_after={"boxes": 0.9, "scores": 0.003}
    )
    _widen_for_rounding(verifier, context, "quantize")
    assert verifier.tolerances(verifier.tolerance) == [0.9, 0.003]
    assert "'boxes' 0.9, 'scores' 0.003" in context.notes[0]
    # A pass stating one number only widens every output to it, as before.
    verifier, context = Verifier(model), PassContext()
    context.details["quantize"] = SimpleNamespace(exact_tolerance_after=0.9)
    _widen_for_rounding(verifier, context, "quantize")
    assert verifier.tolerances(verifier.tolerance) == [0.9, 0.9]
