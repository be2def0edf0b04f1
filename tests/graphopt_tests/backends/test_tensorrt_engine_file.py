"""``--engine PATH``: refused before any work when it cannot be written or would replace the
input model, the ONNX output or their weights (links included); written atomically, never
through a symbolic link; a failed write is one line (exit 2), not an internal error.

The CLI cases run with TensorRT forced absent (the checks come before any TensorRT call);
those that build a real engine are skipped, saying why, without tensorrt_rtx."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.tensorrt import engine_file
from graphopt.backends.tensorrt.build import build_engine, check_options
from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt_tests.backends.trt_models import external_add_file, relu_file


def _optimize(source: Path, output: Path | None, engine: str, *extra: str) -> list[str]:
    args = ["optimize", str(source), "--no-verify", "--engine", engine, *extra]
    return [*args, "-o", str(output)] if output is not None else args


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "internal error" not in err, err
    return err


def test_an_engine_path_that_is_the_input_or_the_output_is_refused_before_any_work(
    no_tensorrt, tmp_path: Path, capsys
) -> None:
    source = relu_file(tmp_path / "m.onnx")
    before = source.read_bytes()
    out = tmp_path / "o.onnx"
    os.link(source, tmp_path / "hard.plan")
    (tmp_path / "sub").mkdir()
    cases = {
        str(source): "is the input model",
        str(tmp_path / "sub" / ".." / "m.onnx"): "is the input model",
        str(tmp_path / "hard.plan"): "is the input model",  # a hard link to it
        str(out): "is the ONNX output",
        str(tmp_path / "o.onnx.data"): "is the ONNX output's data file",
    }
    for engine, reason in cases.items():
        assert main(_optimize(source, out, engine)) == 2, engine
        assert reason in _error(capsys)
        assert not out.exists()  # refused before the pipeline wrote anything
    assert source.read_bytes() == before
    # Without -o the output is m.opt.onnx; with --in-place it is the input.
    assert main(_optimize(source, None, str(tmp_path / "m.opt.onnx"))) == 2
    assert "is the ONNX output" in _error(capsys)
    assert main(_optimize(source, None, str(source), "--in-place")) == 2
    assert "is the input model" in _error(capsys)
    assert source.read_bytes() == before


def test_an_engine_path_that_is_the_inputs_external_data_is_refused(
    no_tensorrt, tmp_path: Path, capsys
) -> None:
    source = external_add_file(tmp_path)
    weights = (tmp_path / "w.bin").read_bytes()
    assert main(_optimize(source, tmp_path / "o.onnx", str(tmp_path / "w.bin"))) == 2
    assert "external-data file of the input model" in _error(capsys)
    assert (tmp_path / "w.bin").read_bytes() == weights


def test_unwritable_engine_paths_are_one_line_before_any_work(
    no_tensorrt, tmp_path: Path, capsys, monkeypatch
) -> None:
    source = relu_file(tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    (tmp_path / "adir").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "link.plan").symlink_to(victim)
    cases = {
        str(tmp_path / "nodir" / "x.plan"): "output folder",
        str(tmp_path / "adir"): "is a folder",
        str(tmp_path / "adir") + os.sep: "names a folder",
        "": "empty path",
        str(tmp_path / "link.plan"): "is a symbolic link",
    }
    for engine, reason in cases.items():
        assert main(_optimize(source, out, engine)) == 2, engine
        message = _error(capsys)
        assert message.startswith("graphopt: error: --engine") and reason in message, message
        assert not out.exists()
    assert victim.read_text() == "keep"
    # A folder no file can be created in (root may write anywhere, so the failure is
    # simulated where the check creates its probe file).
    real_mkstemp = tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path / "adir":
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    assert main(_optimize(source, out, str(tmp_path / "adir" / "x.plan"))) == 2
    assert "cannot write in" in _error(capsys)
    assert not out.exists()


def test_write_engine_is_atomic_and_keeps_the_old_plan_on_failure(
    tmp_path: Path, monkeypatch
) -> None:
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"old")
    os.link(plan, tmp_path / "other-name")  # an in-place rewrite would change this one too
    assert engine_file.write_engine(plan, memoryview(b"new plan"), []) == plan
    assert plan.read_bytes() == b"new plan"
    assert (tmp_path / "other-name").read_bytes() == b"old"  # replaced, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.plan", "other-name"]

    def fail(*_args):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(UserInputError, match=r"^--engine .*e\.plan: cannot be written") as caught:
        engine_file.write_engine(plan, b"newer", [])
    assert "Read-only file system" in str(caught.value) and "\n" not in str(caught.value)
    assert plan.read_bytes() == b"new plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.plan", "other-name"]  # no temp


def test_write_engine_checks_again_at_write_time(tmp_path: Path) -> None:
    # The pipeline runs minutes between the first check and the write.
    model = tmp_path / "o.onnx"
    model.write_bytes(b"onnx")
    with pytest.raises(UserInputError, match="is the ONNX output"):
        engine_file.write_engine(model, b"plan", engine_file.protected_files(None, model))
    assert model.read_bytes() == b"onnx"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "e.plan").symlink_to(victim)
    with pytest.raises(UserInputError, match="is a symbolic link"):
        engine_file.write_engine(tmp_path / "e.plan", b"plan", [])
    assert victim.read_bytes() == b"keep" and (tmp_path / "e.plan").is_symlink()


def test_check_options_without_known_paths_still_checks_the_engine_path(tmp_path: Path) -> None:
    # The API's EngineOptions need not name the input and output; the path is still checked.
    with pytest.raises(UserInputError, match="output folder"):
        check_options(EngineOptions(tmp_path / "missing" / "e.plan"))
    check_options(EngineOptions(tmp_path / "e.plan"))  # fine: nothing raised
    assert not (tmp_path / "e.plan").exists()


def test_build_engine_refuses_to_overwrite_the_model_it_builds_from(trt, tmp_path: Path) -> None:
    source = relu_file(tmp_path / "m.onnx")
    before = source.read_bytes()
    with pytest.raises(UserInputError, match="is the ONNX output"):
        build_engine(source, EngineOptions(source))
    assert source.read_bytes() == before


def test_an_engine_replaces_an_old_plan_and_the_onnx_output_is_intact(
    trt, tmp_path: Path, capsys
) -> None:
    source = relu_file(tmp_path / "m.onnx")
    out, plan = tmp_path / "o.onnx", tmp_path / "m.plan"
    plan.write_bytes(b"an old plan")
    os.link(plan, tmp_path / "old.plan")
    assert main(_optimize(source, out, str(plan))) == 0, capsys.readouterr().err
    assert onnx.load(out).graph.node[0].op_type == "Relu"
    assert plan.stat().st_size > 1000 and plan.read_bytes() != b"an old plan"
    assert (tmp_path / "old.plan").read_bytes() == b"an old plan"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_shapes_for_an_initializer_backed_input_are_refused_before_the_pipeline(
    trt, tmp_path: Path, capsys
) -> None:
    # An input that is also an initializer is a weight, not a network input: --shapes for it
    # is refused before the pipeline runs, as an unknown name is.
    weight = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [weight],
    )
    source = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    out = tmp_path / "o.onnx"
    shapes = "w:min=1x4,opt=1x4,max=1x4"
    assert main(_optimize(source, out, str(tmp_path / "e.plan"), "--shapes", shapes)) == 2
    assert "no input named 'w'" in _error(capsys) and not out.exists()
    good = "x:min=1x4,opt=2x4,max=8x4"
    assert main(_optimize(source, out, str(tmp_path / "e.plan"), "--shapes", good)) == 0
    assert "profile x: min=1x4, opt=2x4, max=8x4 (--shapes)" in capsys.readouterr().out


def test_the_python_api_gets_the_same_engine_checks(tmp_path: Path, no_tensorrt) -> None:
    from graphopt import api

    model = relu_file(tmp_path / "m.onnx")
    before = model.read_bytes()
    out = tmp_path / "o.onnx"
    for engine, message in ((model, "is the input model"), (out, "ONNX output")):
        options = api.OptimizeOptions(engine=EngineOptions(path=engine))
        with pytest.raises(UserInputError, match=message):
            api.optimize(model, out, options)
    assert model.read_bytes() == before and not out.exists()
