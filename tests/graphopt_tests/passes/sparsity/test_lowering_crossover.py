"""The crossover's bookkeeping: shape classes, the per-user cache, the decisions file, and the
``--sparse-kernels`` switch in the pipeline (none of it needs the kernel library)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import io
from graphopt.api import OptimizeOptions
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.passes.sparsity import crossover, lowering
from graphopt.passes.sparsity.crossover import CrossoverCache, Timing
from graphopt.registry import PassContext
from graphopt_tests.helpers import run_pass


def test_bucket_rounds_up_to_three_significant_bits() -> None:
    assert [crossover.bucket(v) for v in (1, 7, 8, 9, 384, 1000, 1536, 3072)] == [
        1,
        7,
        8,
        10,
        384,
        1024,
        1536,
        3072,
    ]


def test_shape_class_separates_what_timing_depends_on() -> None:
    key = crossover.shape_class("f32", 384, 1536, 128, "bsr1x4", 0.8, 1, "abc")
    assert key == crossover.shape_class("f32", 384, 1536, 120, "bsr1x4", 0.81, 1, "abc")
    for other in (
        crossover.shape_class("s8", 384, 1536, 128, "bsr1x4", 0.8, 1, "abc"),
        crossover.shape_class("f32", 384, 1536, 128, "bsr4x1", 0.8, 1, "abc"),
        crossover.shape_class("f32", 384, 1536, 128, "bsr1x4", 0.5, 1, "abc"),
        crossover.shape_class("f32", 384, 1536, 128, "bsr1x4", 0.8, 2, "abc"),
        crossover.shape_class("f32", 384, 1536, 128, "bsr1x4", 0.8, 1, "new-build"),
        crossover.shape_class("f32", 384, 1536, 1024, "bsr1x4", 0.8, 1, "abc"),
    ):
        assert other != key
    assert key.startswith(crossover.cpu_signature())


def test_cache_round_trip_is_atomic_and_tolerates_garbage(tmp_path: Path) -> None:
    path = tmp_path / "kernels" / "crossover-x.json"
    cache = CrossoverCache(path)
    assert cache.get("k") is None
    cache.put("k", Timing(1.5, 0.5))
    assert CrossoverCache(path).get("k") == Timing(1.5, 0.5)
    assert Timing(1.5, 0.5).speedup == 3.0
    # Only the cache file: the temporary file was renamed over it.
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    path.write_text("{not json")
    assert CrossoverCache(path).get("k") is None  # a broken cache only costs a measurement


def test_cache_path_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = crossover.cache_path()
    assert path.parent == tmp_path / "graphopt" / "kernels"
    assert path.name == f"crossover-{crossover.cpu_signature()}.json"


def test_decisions_file_errors_are_one_line(tmp_path: Path) -> None:
    assert lowering.load_decisions("") == {}
    bad = tmp_path / "d.json"
    bad.write_text("[")
    with pytest.raises(UserInputError, match="cannot read sparse-kernel decisions"):
        lowering.load_decisions(str(bad))
    good = tmp_path / "g.json"
    entry = {"layer": "fc1", "K": 64, "N": 128, "format": "bsr1x4", "lowered": True}
    good.write_text(json.dumps({"layers": [entry]}))
    assert lowering.load_decisions(str(good)) == {"fc1": entry}


_ENTRY = {"layer": "a", "K": 64, "N": 32, "format": "bsr1x4", "lowered": True}


def _with(**fields: object) -> list[dict]:
    """One decision: ``_ENTRY`` with ``fields`` changed (None: left out)."""
    entry = {**_ENTRY, **fields}
    return [{k: v for k, v in entry.items() if v is not None}]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(lowered="false"), "layer 'a': lowered must be true or false (got 'false')"),
        (_with(lowered=1), "layer 'a': lowered must be true or false (got 1)"),
        (_with(K=True), "layer 'a': K must be a whole number >= 0 (got True)"),
        (_with(K=0), "layer 'a': K must be a whole number >= 1 (got 0)"),
        (_with(N=32.0), "layer 'a': N must be a whole number >= 0 (got 32.0)"),
        (_with(M=-1), "layer 'a': M must be a whole number >= 0 (got -1)"),
        (_with(format="csr"), "layer 'a': format must be '2:4' or 'bsrRxC' (got 'csr')"),
        (_with(format=None), "layer 'a': no format"),
        (_with(dense_ms="1.0"), "layer 'a': dense_ms must be a finite number >= 0"),
        (_with(sparse_ms=float("nan")), "layer 'a': sparse_ms must be a finite number >= 0"),
        (_with(speedup=-2), "layer 'a': speedup must be a finite number >= 0"),
        (_with(sparsity=1.5), "layer 'a': sparsity must be a number from 0 to 1"),
        (_with(op="Conv"), "layer 'a': op must be 'MatMul' or 'Gemm' or 'QMatMul'"),
        (_with(epilogue="both"), "layer 'a': epilogue must be 'fused' or 'separate'"),
        (_with(key=3), "layer 'a': key must be a string (got 3)"),
        (_with(lowerd=True), "layer 'a': unknown field 'lowerd'"),
        (_with(lowered=None), "layer 'a': needs lowered, or dense_ms and sparse_ms"),
        (_with(lowered=None, dense_ms=1, sparse_ms=0), "layer 'a': sparse_ms must be above 0"),
        (_with() + _with(), "layer 'a' is decided twice"),
        ([{"layer": ""}], "layers[0]: layer must be a non-empty string (got '')"),
        ([{"K": 64}], "layers[0]: layer must be a non-empty string (got nothing)"),
        ([["a"]], "layers[0] must be an object (got ['a'])"),
        ({"layers": {"a": _ENTRY}}, "layers must be a list of layer decisions (got dict)"),
        ("fc1", "layers must be a list of layer decisions (got str)"),
        ({}, 'no "layers"'),
        ({"layers": [], "notes": ""}, "unknown key 'notes'"),
        ({"domain": "com.microsoft", "layers": []}, "domain must be 'graphopt'"),
        ({"version": "1", "layers": []}, "version must be 1"),
    ],
)
def test_malformed_decisions_are_one_line_errors_naming_the_field(
    tmp_path: Path, data: object, message: str
) -> None:
    """A crafted or hand-edited file is refused field by field, never lowered from ("false" is
    a true string) or copied into the output's metadata."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserInputError) as info:
        lowering.load_decisions(str(path))
    text = str(info.value)
    assert text.startswith(f"--sparse-kernels-decisions {path}: ") and "\n" not in text
    assert message in text


def _two_layers(second: str = "") -> onnx.ModelProto:
    """x[b, 64] -> MatMul "fc1" -> MatMul (named ``second``) -> y, both weights 80% zeros."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 128)), rng.standard_normal((128, 32))
    inits = [
        numpy_helper.from_array((w * (rng.random(w.shape) < 0.2)).astype(np.float32), name)
        for name, w in (("w1", w1), ("w2", w2))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name=second),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_cli_refuses_a_crafted_decisions_file(tmp_path: Path, capsys) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(_two_layers("fc2"), source)
    decisions = tmp_path / "d.json"
    entry = {"K": 64, "N": 128, "format": "bsr1x4", "lowered": "false"}
    decisions.write_text(json.dumps([{"layer": "fc1", **entry}]))
    args = ["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--target", "ort"]
    args += ["--sparse-kernels", "--sparse-kernels-decisions", str(decisions)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"{decisions}: layer 'fc1': lowered must be true or false (got 'false')" in err
    assert not (tmp_path / "o.onnx").exists()


def test_a_malformed_record_in_the_model_is_refused() -> None:
    """The record a model already carries is extended by the pass: checked like a file."""
    model = io.load(_two_layers("fc2")).model
    entry = {"layer": "fc1", "K": 64, "N": 128, "format": "bsr1x4", "lowered": "no"}
    model.metadata_props[crossover.METADATA_KEY] = json.dumps({"layers": [entry]})
    pattern = r"the model's metadata graphopt\.sparse_kernels: layer 'fc1': lowered must"
    with pytest.raises(UserInputError, match=pattern):
        run_pass(model, lowering.SparseKernelsPass, PassContext(target="ort"))
    model.metadata_props[crossover.METADATA_KEY] = "{not json"
    with pytest.raises(UserInputError, match=r"graphopt\.sparse_kernels: not JSON"):
        run_pass(model, lowering.SparseKernelsPass, PassContext(target="ort"))


def test_layers_get_unique_names_named_nodes_first() -> None:
    """A node's name, else its output's, made unique: two layers called ``y`` (a node named
    ``y`` and an unnamed one writing ``y``) were two ops of one name, which ORT refuses, and
    one decision for both. Names of other nodes are taken; named nodes keep theirs first."""
    proto = _two_layers("")
    proto.graph.node[0].name = "y"
    model = io.load(proto).model
    layers, _ = lowering.find_layers(model, {})
    assert [layer.name for layer in layers] == ["y", "y_1"]
    # The unnamed layer first, writing the name a later node has: the named one keeps it.
    proto = _two_layers("h")
    proto.graph.node[0].name = ""
    proto.graph.node.append(helper.make_node("Identity", ["y"], ["z"], name="h_1"))
    proto.graph.output[0].name = "z"
    layers, _ = lowering.find_layers(io.load(proto).model, {})
    assert [layer.name for layer in layers] == ["h_2", "h"]


def test_switch_runs_last_and_only_for_target_ort() -> None:
    steps, _ = OptimizeOptions(target="ort", sparse_kernels=True).pipeline()
    assert [spec.name for spec in steps[-1].passes] == ["sparse-kernels"]
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_min_speedup=2)
    assert steps[-1].passes[0].options == {}
    assert options.pipeline()[0][-1].passes[0].options == {"min_speedup": 2}
    with pytest.raises(UserInputError, match="--sparse-kernels needs --target ort"):
        OptimizeOptions(sparse_kernels=True).pipeline()
    with pytest.raises(UserInputError, match="is a switch"):
        OptimizeOptions(target="ort", sparse_kernels="maybe").pipeline()
    with pytest.raises(UserInputError, match="only applies with --sparse-kernels"):
        OptimizeOptions(target="ort", sparse_kernels_min_speedup=2).pipeline()
