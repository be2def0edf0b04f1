"""``graphopt lint`` with TensorRT's real parser reads a model's external data from the model's
own folder, whatever the current directory holds; locations leaving that folder are refused.
Skipped, saying why, without tensorrt_rtx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from graphopt.cli import main
from graphopt_tests.backends.trt_models import external_add_file


def test_lint_reads_external_data_beside_the_model(
    trt, tmp_path: Path, monkeypatch, capsys
) -> None:
    model = external_add_file(tmp_path / "models")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # No w.bin here: the parser must not look in the current directory.
    assert main(["lint", str(model)]) == 0
    assert "accepted by TensorRT-RTX" in capsys.readouterr().out
    # A w.bin here that is too short for W: read from here, the parser would reject W.
    (elsewhere / "w.bin").write_bytes(b"abcd")
    assert main(["lint", str(model)]) == 0
    out = capsys.readouterr().out
    assert "accepted by TensorRT-RTX" in out and "Failed to import initializer" not in out
    # The same from a relative path.
    monkeypatch.chdir(tmp_path)
    assert main(["lint", "models/ext.onnx"]) == 0
    assert "0 error(s)" in capsys.readouterr().out


def test_lint_refuses_external_data_outside_the_models_folder(
    trt, tmp_path: Path, monkeypatch, capsys
) -> None:
    model = external_add_file(tmp_path / "models", "../secret.bin", write=False)
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    monkeypatch.chdir(tmp_path / "models")
    assert main(["lint", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert "leaves the model's folder" in err and "\n" not in err


def test_lint_tensorrt_without_a_path_keeps_reading_in_memory_models(trt) -> None:
    # lint_tensorrt on a self-contained ModelProto (no file): unchanged.
    from graphopt.backends.tensorrt.lint import lint_tensorrt

    weight = helper.make_tensor("W", TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    result = lint_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert result.checker.endswith("parser") and result.errors == []
