"""Opset conversions from the command line: --opset and the raise --quantize does itself."""

from __future__ import annotations

import re

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt import io, opset
from graphopt.cli import main


def _segmenter_10(path) -> None:
    """Conv -> Relu -> linear Resize 10 (how old exporters wrote upsampling) -> Conv."""
    rng = np.random.default_rng(0)

    def const(name, shape, scale):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Resize", ["r1", "sc"], ["u"], mode="linear"),
        helper.make_node("Conv", ["u", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [
        const("w1", (8, 3, 3, 3), 0.3),
        const("b1", (8,), 0.1),
        const("w2", (4, 8, 3, 3), 0.3),
        const("b2", (4,), 0.1),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"),
    ]
    graph = helper.make_graph(
        nodes,
        "seg10",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 32, 32])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 5
    io.save(io.load(model).model, path)


def test_int8_on_an_opset_10_resize_reports_quantization_error_only(tmp_path, capsys) -> None:
    """--quantize int8 raised opset 10 -> 13 through onnx's converter, which moved the linear
    Resize to half_pixel: exit 0 with "max rel error 0.452" reported as quantization error
    (the conversion alone was off by 0.46, int8 by 0.02)."""
    source, out = tmp_path / "seg10.onnx", tmp_path / "q.onnx"
    _segmenter_10(source)
    code = main(
        ["optimize", str(source), "-o", str(out), "--quantize", "int8", "--calib", "random"]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "converted default-domain opset 10 -> 13" in text
    errors = [float(e) for e in re.findall(r"max rel error ([0-9.e-]+)", text)]
    assert errors and max(errors) < 0.1, text


def test_a_conversion_that_changes_the_model_exits_2_even_without_verify(
    tmp_path, capsys, monkeypatch
) -> None:
    """With --no-verify a changed model was written (exit 0); with verification the failure
    did not point at the conversion. The Resize fix is switched off to stand for an adapter
    graphopt does not know."""
    monkeypatch.setattr(opset, "_keep_resize_10_semantics", lambda *args: None, raising=False)
    source, out = tmp_path / "seg10.onnx", tmp_path / "o.onnx"
    _segmenter_10(source)
    code = main(["optimize", str(source), "-o", str(out), "--opset", "13", "--no-verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "converting opset 10 -> 13 changes what the model computes" in err[0]
    assert "give the model at opset 13 from its exporter" in err[0]


def test_int8_refuses_a_raise_that_changes_the_model(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(opset, "_keep_resize_10_semantics", lambda *args: None, raising=False)
    source, out = tmp_path / "seg10.onnx", tmp_path / "q.onnx"
    _segmenter_10(source)
    code = main(
        ["optimize", str(source), "-o", str(out), "--quantize", "int8", "--calib", "random"]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "per-channel DequantizeLinear needs opset 13, so graphopt raises it: converting" in err
