"""The catalog and its cache: build once, sidecar contents, stale entries, the CLI."""

from __future__ import annotations

import json

import onnx
import pytest

import graphopt.io
import graphopt.models as gm
from graphopt.models.__main__ import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_get_builds_once_and_writes_sidecar(cache):
    path = gm.get("demo")
    assert path.parent == cache
    info = gm.read_sidecar(path)
    assert info["opset"] == 17
    assert info["inputs"] == [{"name": "input", "dtype": "float", "shape": ["N", 3, 32, 32]}]
    assert info["test_shapes"] == {"input": [1, 3, 32, 32]}
    assert {"onnx", "onnxruntime"} <= set(info["versions"])
    assert info["exporter"]
    stamp = path.stat().st_mtime_ns
    assert gm.get("demo") == path
    assert path.stat().st_mtime_ns == stamp  # served from the cache
    assert gm.input_shapes("demo") == {"input": (1, 3, 32, 32)}
    # No scratch folders or temp files left behind.
    leftovers = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert sorted(leftovers) == ["demo.onnx", "demo.onnx.json"]


def test_stale_or_truncated_cache_is_rebuilt(cache):
    path = gm.get("demo")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated: size no longer matches the sidecar
    assert gm.get("demo").read_bytes() == good
    side = gm.catalog.sidecar_path(path)
    info = json.loads(side.read_text())
    info["cache_format"] = -1
    side.write_text(json.dumps(info))
    gm.get("demo")
    assert gm.read_sidecar(path)["cache_format"] == gm.catalog.CACHE_FORMAT


def test_unknown_name_is_refused(cache, capsys):
    with pytest.raises(KeyError, match="unknown model"):
        gm.get("no_such_model")
    assert main(["build", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_cli_list_and_build(cache, tmp_path, capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert listed[0].startswith("demo ")
    names = {line.split()[0] for line in listed if line}
    required = {"demo", "resnet18", "resnet50", "mobilenet_v2", "vit_b_16", "swin_t",
                "bert_tiny", "gpt2_tiny", "vit_tiny", "llama_tiny", "minilm",
                "ppocr_det", "ppocr_rec", "ppocr_cls"}  # fmt: skip
    assert required <= names
    out = tmp_path / "demo.onnx"
    assert main(["build", "demo", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes() == gm.get("demo").read_bytes()
    assert gm.read_sidecar(out)["name"] == "demo"
    assert main(["info", "demo"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "demo"


def test_every_entry_declares_its_requirements():
    for name in gm.names():
        entry = gm.spec(name)
        if entry.family in ("torchvision", "transformers"):
            assert "torch" in entry.requires, name
        if entry.family == "demo":
            assert entry.requires == ()


def test_cli_reports_a_missing_output_folder(cache, tmp_path, capsys):
    assert main(["build", "demo", "-o", str(tmp_path / "no" / "such" / "demo.onnx")]) == 1
    assert "cannot build 'demo'" in capsys.readouterr().err


def _build_with_external_data(path):
    """A builder that, like the exporter past 2 GB, writes its weights beside the model."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(1024, dtype=np.float32).reshape(32, 32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["output"])],
        "external",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 32])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin",
                    size_threshold=0)  # fmt: skip
    return {"exporter": "test"}


@pytest.fixture
def external_entry(monkeypatch):
    spec = gm.catalog.ModelSpec("test:external", "demo", "external data", _build_with_external_data)
    monkeypatch.setitem(gm.catalog._CATALOG, spec.name, spec)
    return spec.name


def test_external_data_is_cached_in_one_named_file(cache, external_entry, tmp_path):
    import numpy as np
    import onnxruntime as ort

    path = gm.get(external_entry)
    data = path.with_name("test_external.onnx.data")
    info = gm.read_sidecar(path)
    assert info["external_data"] == data.name and info["external_size"] == data.stat().st_size
    leftovers = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert leftovers == ["test:external.onnx", "test:external.onnx.json", "test_external.onnx.data"]
    # graphopt's own loader accepts it (it refuses locations with a ':', as in the name).
    assert graphopt.io.load(path).uses_external_data
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((1, 32), np.float32)
    expected = x @ np.arange(1024, dtype=np.float32).reshape(32, 32)
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], expected)
    # A damaged data file makes the entry stale: it is rebuilt, not served.
    data.write_bytes(data.read_bytes()[:16])
    assert gm.get(external_entry) == path
    assert data.stat().st_size == info["external_size"]
    # A copy carries its data file, under the name the model records.
    copied = gm.build(external_entry, tmp_path / "copy.onnx")
    assert (tmp_path / "test_external.onnx.data").read_bytes() == data.read_bytes()
    session = ort.InferenceSession(str(copied), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], expected)
