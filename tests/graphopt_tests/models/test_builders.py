"""Every catalog model: onnx.checker accepts it and ONNX Runtime runs it at its test shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt.models as gm
from graphopt.io import load
from graphopt_tests.models.cases import model_param, realistic_feeds, require


@pytest.mark.parametrize(
    "name", [model_param(n) for n in gm.names() if not gm.spec(n).extra.get("bench_only")]
)
def test_builds_checks_and_runs(name):
    require(name)
    path = gm.get(name)
    onnx.checker.check_model(str(path))
    info = gm.read_sidecar(path)
    for key in ("exporter", "opset", "inputs", "outputs", "versions", "test_shapes"):
        assert info.get(key), f"sidecar lacks {key}"
    shapes = gm.input_shapes(name)
    assert set(shapes) == {i["name"] for i in info["inputs"]}
    model = load(path).model
    feeds = realistic_feeds(model, shapes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in info["outputs"]]
    for out in outputs:
        assert out.size > 0
        if out.dtype.kind == "f":
            assert np.isfinite(out).all()


@pytest.mark.parametrize(
    "name", [model_param(n) for n in gm.names() if gm.spec(n).family == "torchvision"][:1]
)
def test_batch_axis_is_dynamic(name):
    require(name)
    path = gm.get(name)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = gm.input_shapes(name)["input"]
    for batch in (1, 3):
        x = np.zeros((batch, *shape[1:]), dtype=np.float32)
        assert session.run(None, {"input": x})[0].shape[0] == batch


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize(
    "name", ["bert_tiny", "llama_tiny", "bert_tiny_ts", "llama_tiny_ts", "minilm_ts"]
)
def test_text_models_take_other_sequence_lengths(name):
    require(name)
    session = ort.InferenceSession(str(gm.get(name)), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones((2, 7), dtype=np.int64) for i in session.get_inputs()}
    assert session.run(None, feeds)[0].shape[:2] == (2, 7)


@pytest.mark.slow
@pytest.mark.torch
def test_llama_uses_grouped_query_attention():
    require("llama_tiny")
    config = gm.read_sidecar(gm.get("llama_tiny"))["config"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
