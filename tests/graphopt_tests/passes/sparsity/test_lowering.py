"""The sparse-kernels pass: sparse MatMul/Gemm (and the int8 QDQ pattern) -> graphopt's ops.

Decisions are forced with ``decisions`` (a JSON file) so what is lowered does not depend on
this machine's timings; one test lets the crossover measure, with the cache in a tmp folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.registry import PassContext
from graphopt_tests.helpers import import_or_skip, make_model, run_pass, tensor_info


@pytest.fixture
def kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The built library (else a skip saying why); the crossover cache in a tmp folder."""
    import graphopt.kernels

    import_or_skip("onnxruntime", "the lowered models run in ONNX Runtime")
    if not graphopt.kernels.available(quiet=True):
        pytest.skip(graphopt.kernels.unavailable_reason())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from graphopt.passes.sparsity import lowering

    return lowering


def _block_sparse(rng: np.random.Generator, k: int, n: int, r: int, c: int, keep: float):
    """[k, n] float32 with (r outputs x c inputs) blocks zeroed, about ``1 - keep`` of them."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    mask = rng.random((k // c, n // r)) < keep
    return w * np.kron(mask, np.ones((c, r))).astype(np.float32)


def _two_four(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    w = rng.standard_normal((k, n)).astype(np.float32)
    for g in range(k // 4):
        for j in range(n):
            drop = rng.choice(4, size=2, replace=False)
            w[4 * g + drop, j] = 0.0
    return w


def mlp() -> ir.Model:
    """x[batch, 64] -> MatMul(block 4x1)+Add+Relu -> MatMul(2:4)+Add -> Gemm(transB, block 1x4)
    -> MatMul(dense) -> y."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": _block_sparse(rng, 64, 128, 4, 1, 0.2),
        "b1": rng.standard_normal(128).astype(np.float32),
        "w2": _two_four(rng, 128, 32),
        "b2": rng.standard_normal(32).astype(np.float32),
        "w3t": _block_sparse(rng, 32, 16, 1, 4, 0.25).T.copy(),  # Gemm's B is [N, K]
        "c3": rng.standard_normal(16).astype(np.float32),
        "w4": rng.standard_normal((16, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="fc1_relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["b2", "h2"], ["a2"], name="fc2_bias"),
        helper.make_node("Gemm", ["a2", "w3t", "c3"], ["h3"], name="fc3", transB=1),
        helper.make_node("MatMul", ["h3", "w4"], ["y"], name="fc4"),
    ]
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["batch", 64])],
        [tensor_info("y", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )


def forced(lowering, source: Path, folder: Path, lower: dict[str, bool] | None = None) -> Path:
    """A decisions file for ``source``: the layers the pass sees (named as after the exact
    passes, which may fuse MatMul+Add into Gemm), timed once and then lowered by format as
    ``lower`` says (None: all lowered)."""
    measured = folder / "measured.onnx"
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_min_speedup=1e9)
    optimize(source, measured, options)
    props = {p.key: p.value for p in onnx.load(str(measured)).metadata_props}
    record = json.loads(props[lowering.METADATA_KEY])
    for entry in record["layers"]:
        entry["lowered"] = True if lower is None else lower[entry["format"]]
    path = folder / "decisions.json"
    path.write_text(json.dumps(record))
    return path


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    from graphopt.backends.ort_custom_ops import own_session_options

    proto = onnx.load(str(path))
    uses = any(n.domain == "graphopt" for n in proto.graph.node)
    options = own_session_options() if uses else ort.SessionOptions()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_forced_decisions_lower_match_record_and_rerun(kernels, tmp_path: Path) -> None:
    model = mlp()
    source = tmp_path / "mlp.onnx"
    io.save(model, source)
    lower = {"bsr4x1": True, "2:4": True, "bsr1x4": False}  # fc1, fc2 lowered; fc3 not
    decided = forced(kernels, source, tmp_path, lower)
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_decisions=decided)
    out = tmp_path / "out.onnx"
    result = optimize(source, out, options)
    assert result.report.verified  # the exact verification ran the custom ops in ORT
    proto = onnx.load(str(out))
    ops = {(n.domain, n.op_type): n for n in proto.graph.node}
    assert set(ops) >= {("graphopt", "SparseMatMul"), ("graphopt", "SparseMatMul24")}
    assert ("", "Gemm") in ops and ("", "Relu") not in ops  # fc3 kept; Relu folded into fc1
    attrs = {
        a.name: helper.get_attribute_value(a) for a in ops["graphopt", "SparseMatMul"].attribute
    }
    assert attrs["activation"] == b"relu" and (attrs["block_r"], attrs["block_c"]) == (4, 1)
    assert {o.domain: o.version for o in proto.opset_import}["graphopt"] == 1
    # Only the domain: no path of the library anywhere in the file.
    data = out.read_bytes()
    assert b"libgraphopt" not in data and b"_build" not in data
    record = json.loads({p.key: p.value for p in proto.metadata_props}[kernels.METADATA_KEY])
    assert sorted((e["format"], e["lowered"]) for e in record["layers"]) == sorted(lower.items())
    for batch in (1, 8):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 64), np.float32)}
        (want,), (got,) = _run(source, feeds), _run(out, feeds)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # Same options: same bytes. Decisions replayed from the output: the same graph and record.
    again = tmp_path / "again.onnx"
    optimize(source, again, options)
    assert again.read_bytes() == data
    # Its own output is a fixed point (the verifier runs the lowered model as the original).
    fixed = tmp_path / "fixed.onnx"
    optimize(out, fixed, options)
    assert fixed.read_bytes() == data
    replay = tmp_path / "replay.onnx"
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_decisions=out)
    optimize(source, replay, options)
    replayed = onnx.load(str(replay))
    assert replayed.graph.SerializeToString() == proto.graph.SerializeToString()
    replayed_record = {p.key: p.value for p in replayed.metadata_props}[kernels.METADATA_KEY]
    assert json.loads(replayed_record) == record


def inferred(model: ir.Model) -> ir.Model:
    """``model`` with ONNX's inferred shapes (as the pipeline's passes leave it)."""
    return io.load(onnx.shape_inference.infer_shapes(io.to_proto(model))).model


def test_measured_crossover_is_cached(kernels, tmp_path: Path) -> None:
    model = inferred(mlp())
    context = PassContext(target="ort", input_shapes={"x": (32, 64)})
    first, _ = run_pass(model, kernels.SparseKernelsPass, context)
    record = json.loads(first.metadata_props[kernels.METADATA_KEY])
    assert [e["layer"] for e in record["layers"]] == ["fc1", "fc2", "fc3"]
    for entry in record["layers"]:
        assert entry["M"] == 32 and entry["dense_ms"] > 0 and entry["sparse_ms"] > 0
        fastest = min(entry["sparse_ms"], entry.get("separate_ms", float("inf")))
        assert entry["lowered"] == (entry["dense_ms"] / fastest >= 1.1)
        # Layers with an activation were also timed with it left to ORT; the faster is kept.
        assert ("separate_ms" in entry) == (entry["layer"] == "fc1")
    cache = tmp_path / "cache" / "graphopt" / "kernels"
    (path,) = cache.glob("crossover-*.json")
    assert len(json.loads(path.read_text())["entries"]) == 3
    context = PassContext(target="ort", input_shapes={"x": (32, 64)})
    second, _ = run_pass(model, kernels.SparseKernelsPass, context)
    assert second.metadata_props[kernels.METADATA_KEY] == first.metadata_props[kernels.METADATA_KEY]
    assert any("3 from the cache" in note for note in context.notes)


def test_min_speedup_decides(kernels) -> None:
    model = mlp()
    context = PassContext(target="ort", input_shapes={"x": (32, 64)})
    out, hits = run_pass(model, kernels.SparseKernelsPass, context, min_speedup=1e6)
    assert hits == 0
    assert not any(n.domain == "graphopt" for n in out.graph)
    context = PassContext(target="ort", input_shapes={"x": (32, 64)})
    out, hits = run_pass(model, kernels.SparseKernelsPass, context, min_speedup=1e-6)
    assert hits == 3 and sum(n.domain == "graphopt" for n in out.graph) == 3


def test_format_choice(kernels) -> None:
    rng = np.random.default_rng(1)
    cases = {
        "2:4": _two_four(rng, 64, 16),
        "bsr4x1": _block_sparse(rng, 64, 64, 4, 1, 0.2),
        "bsr1x4": _block_sparse(rng, 64, 64, 1, 4, 0.2),
        "bsr16x1": _block_sparse(rng, 64, 64, 16, 1, 0.2),
    }
    for want, w in cases.items():
        layer = kernels.Layer("l", "MatMul", None, None, w, None, [], None, "none", 1)
        _, fmt = kernels.choose_format(layer)
        assert fmt == want


def qdq_model() -> tuple[ir.Model, np.ndarray]:
    """x -> QuantizeLinear(u8) -> DQ -> MatMul <- DQ(s8 block-sparse W, per column) -> +bias."""
    rng = np.random.default_rng(2)
    wf = _block_sparse(rng, 64, 32, 1, 4, 0.25)
    w_scale = (np.abs(wf).max(axis=0) / 127 + 1e-3).astype(np.float32)
    w = np.clip(np.round(wf / w_scale), -127, 127).astype(np.int8)
    inits = {
        "sx": np.array(0.02, np.float32),
        "zx": np.array(128, np.uint8),
        "w": w,
        "sw": w_scale,
        "bias": rng.standard_normal(32).astype(np.float32),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["h"], name="qfc"),
        helper.make_node("Add", ["h", "bias"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["batch", 64])],
        [tensor_info("y", TensorProto.FLOAT, ["batch", 32])],
        inits,
        opset=21,
        ir_version=10,
    )
    return model, w


def test_int8_qdq_pattern_lowers(kernels, tmp_path: Path) -> None:
    model, _ = qdq_model()
    source = tmp_path / "q.onnx"
    io.save(model, source)
    decided = forced(kernels, source, tmp_path, {"bsr1x4": True})
    out = tmp_path / "q.out.onnx"
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_decisions=decided)
    assert optimize(source, out, options).report.verified
    proto = onnx.load(str(out))
    types = [(n.domain, n.op_type) for n in proto.graph.node]
    assert ("graphopt", "SparseQMatMul") in types
    assert ("", "MatMul") not in types and ("", "Add") not in types  # bias folded
    for batch in (1, 8):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 64), np.float32)}
        (want,), (got,) = _run(source, feeds), _run(out, feeds)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_an_int8_layer_past_the_kernels_k_limit_stays_dense(kernels, monkeypatch) -> None:
    """SparseQMatMul sums u8*s8 products in int32 and refuses K > 65,793; the lowering leaves
    such a MatMul as it is (the limit lowered here to this model's K - 1)."""
    from graphopt.kernels import packing

    model, _ = qdq_model()
    layers, _ = kernels.find_layers(model, {"batch": 1})
    assert [layer.op for layer in layers] == ["QMatMul"]
    monkeypatch.setattr(packing, "S8_MAX_K", 63)
    layers, _ = kernels.find_layers(model, {"batch": 1})
    assert [layer.op for layer in layers if layer.op == "QMatMul"] == []


def test_cli_needs_target_ort(tmp_path: Path, capsys) -> None:
    source = tmp_path / "mlp.onnx"
    io.save(mlp(), source)
    code = main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--sparse-kernels"])
    assert code == 2
    assert "--sparse-kernels needs --target ort" in capsys.readouterr().err


def test_missing_library_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the library, lowering refuses in one line naming the domain, the expected
    path and the build command (nothing is built or loaded)."""
    from graphopt.backends import ort_custom_ops
    from graphopt.passes.sparsity import lowering

    monkeypatch.setattr(ort_custom_ops, "build_dir", lambda: tmp_path / "nowhere")
    context = PassContext(target="ort")
    with pytest.raises(UserInputError) as info:
        run_pass(mlp(), lowering.SparseKernelsPass, context, min_speedup=1e-6)
    message = str(info.value)
    assert "\n" not in message and "'graphopt'" in message
    assert "python -m graphopt.kernels build" in message and "library_path()" in message


def _assert_mlp_outputs_match(model, out, tmp_path: Path) -> None:
    """The lowered mlp() gives the original's output in ONNX Runtime (saved, then run)."""
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 64), np.float32)}
    source, lowered = tmp_path / "s.onnx", tmp_path / "l.onnx"
    io.save(model, source)
    io.save(out, lowered)
    (want,), (got,) = _run(source, feeds), _run(lowered, feeds)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_activation_left_to_ort_when_faster(kernels, tmp_path: Path) -> None:
    """A decision with ``epilogue: separate`` keeps the activation an ORT node."""
    model = inferred(mlp())
    context = PassContext(target="ort")
    measured, _ = run_pass(model, kernels.SparseKernelsPass, context, min_speedup=1e9)
    record = json.loads(measured.metadata_props[kernels.METADATA_KEY])
    for entry in record["layers"]:
        entry["lowered"] = entry["layer"] == "fc1"
        if entry["layer"] == "fc1":  # the one with an activation to leave out
            entry["epilogue"] = "separate"
    path = tmp_path / "d.json"
    path.write_text(json.dumps(record))
    context = PassContext(target="ort")
    out, hits = run_pass(model, kernels.SparseKernelsPass, context, decisions=path)
    assert hits == 1
    (node,) = [n for n in out.graph if n.domain == "graphopt"]
    assert node.attributes["activation"].value == "none"
    relu = [n for n in out.graph if n.op_type == "Relu"]
    assert len(relu) == 1 and relu[0].inputs[0] is node.outputs[0]
    _assert_mlp_outputs_match(model, out, tmp_path)


def _unused_initializers(path: Path) -> list[str]:
    proto = onnx.load(str(path))
    read = {name for node in proto.graph.node for name in node.input}
    read |= {value.name for value in proto.graph.output}
    return [t.name for t in proto.graph.initializer if t.name not in read]


def test_int8_lowering_leaves_no_dead_weights(kernels, tmp_path: Path) -> None:
    """The int8 weight, its scales and zero points go with the DequantizeLinear they fed: they
    were left as dead initializers (ORT warned "Removing initializer"; BERT-tiny's output was
    26% larger than the same model optimized again), so the output was no fixed point."""
    model, _ = qdq_model()
    source = tmp_path / "q.onnx"
    io.save(model, source)
    decided = forced(kernels, source, tmp_path)
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_decisions=decided)
    out = tmp_path / "q.out.onnx"
    assert optimize(source, out, options).report.verified
    names = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert _unused_initializers(out) == []
    assert not names & {"w", "sw"}  # the weight and its scale, packed into the op
    again = tmp_path / "again.onnx"
    optimize(out, again, options)
    assert again.read_bytes() == out.read_bytes()


def test_layers_of_one_name_lower_to_ops_of_distinct_names(kernels, tmp_path: Path) -> None:
    """A node named ``y`` and an unnamed one writing ``y`` (a valid model): both layers were
    called ``y``, so the output had two ops named ``y`` (ORT refused it and the pass was rolled
    back) and the record one decision, which a replay then applied to the wrong layer."""
    from graphopt_tests.passes.sparsity.test_lowering_crossover import _two_layers

    proto = _two_layers("")
    proto.graph.node[0].name = "y"
    source = tmp_path / "b.onnx"
    onnx.save(proto, source)
    decided = forced(kernels, source, tmp_path)
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_decisions=decided)
    out = tmp_path / "b.out.onnx"
    result = optimize(source, out, options)
    assert result.report.verified and not result.report.rolled_back
    lowered = onnx.load(str(out))
    assert [(n.name, n.domain) for n in lowered.graph.node] == [
        ("y", "graphopt"),
        ("y_1", "graphopt"),
    ]
    record = json.loads({p.key: p.value for p in lowered.metadata_props}[kernels.METADATA_KEY])
    assert [(e["layer"], e["K"], e["lowered"]) for e in record["layers"]] == [
        ("y", 64, True),
        ("y_1", 128, True),
    ]
    # Replayed from the output: the same graph; and the output is a fixed point.
    replay = tmp_path / "replay.onnx"
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_decisions=out)
    optimize(source, replay, options)
    assert onnx.load(str(replay)).graph.SerializeToString() == lowered.graph.SerializeToString()
    fixed = tmp_path / "fixed.onnx"
    optimize(out, fixed, options)
    assert onnx.load(str(fixed)).graph.SerializeToString() == lowered.graph.SerializeToString()


_MLP_LAYERS = [
    {"layer": "fc1", "op": "MatMul", "K": 64, "N": 128, "format": "bsr4x1", "lowered": False},
    {"layer": "fc2", "op": "MatMul", "K": 128, "N": 32, "format": "2:4", "lowered": False},
    {"layer": "fc3", "op": "Gemm", "K": 32, "N": 16, "format": "bsr1x4", "lowered": False},
]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop(), "no decision for layer 'fc3' (Gemm K 32 N 16 bsr1x4"),
        (lambda d: d.append({**d[0], "layer": "fc9"}), "layer 'fc9' is not a sparse MatMul/Gemm"),
        (lambda d: d[0].update(K=65), "layer 'fc1' has K 64, the decisions say 65"),
        (lambda d: d[1].update(format="bsr1x4"), "layer 'fc2' has format '2:4', the decisions"),
        (lambda d: d[2].update(op="MatMul"), "layer 'fc3' has op 'Gemm', the decisions say"),
        (lambda d: d[1].update(epilogue="separate"), "layer 'fc2': epilogue 'separate' leaves"),
    ],
)
def test_decisions_that_do_not_fit_the_model_are_refused(
    kernels, tmp_path: Path, change, message: str
) -> None:
    """A replay writes the model the decisions describe or says why not: a layer they miss is
    not measured instead, one they name that the model lacks is not ignored."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"layers": _MLP_LAYERS}))
    context = PassContext(target="ort")
    _, hits = run_pass(mlp(), kernels.SparseKernelsPass, context, decisions=path)
    assert hits == 0  # the decisions as written fit: nothing lowered, nothing measured
    layers = [dict(entry) for entry in _MLP_LAYERS]
    change(layers)
    path.write_text(json.dumps(layers))
    with pytest.raises(UserInputError) as info:
        run_pass(mlp(), kernels.SparseKernelsPass, PassContext(target="ort"), decisions=path)
    assert str(info.value).startswith(f"--sparse-kernels-decisions {path}: ")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_int8_model_lowers_in_a_run_of_its_own(kernels, tmp_path: Path) -> None:
    """Lowering a model quantized by an earlier run: SparseQMatMul sums in int32 as ORT's
    fused kernels do, the unoptimized reference in float, and a later QuantizeLinear rounds
    them a step apart. Verified within what ORT's own optimizations move the output (stated),
    it is kept; it was rolled back ("off by 0.0185")."""
    from graphopt_tests.test_verify import requantized_qdq_model

    source = tmp_path / "q.onnx"
    io.save(requantized_qdq_model(), source)
    decided = forced(kernels, source, tmp_path)
    options = OptimizeOptions(target="ort", sparse_kernels=True, sparse_kernels_decisions=decided)
    out = tmp_path / "q.out.onnx"
    report = optimize(source, out, options).report
    assert report.verified and not report.rolled_back
    assert report.verification is not None and report.verification.worst_rel > 1e-3
    assert "optimizations already move its outputs" in report.verification.shape_note
    types = [(n.domain, n.op_type) for n in onnx.load(str(out)).graph.node]
    assert ("graphopt", "SparseQMatMul") in types and ("", "MatMul") not in types


def test_a_layer_reading_a_fused_activation_reads_the_op_that_took_it_in(
    kernels, tmp_path: Path
) -> None:
    """fc1's Relu fused into its sparse op, then fc2 lowered: fc2 was found before any
    lowering and read the Relu's old output, a node no longer in the graph (the graph could
    not be cloned or saved; BERT's FFN hit it when timings chose the fused Gelu)."""
    model = inferred(mlp())
    context = PassContext(target="ort")
    measured, _ = run_pass(model, kernels.SparseKernelsPass, context, min_speedup=1e9)
    record = json.loads(measured.metadata_props[kernels.METADATA_KEY])
    for entry in record["layers"]:
        entry["lowered"] = True
        if "epilogue" in entry:
            entry["epilogue"] = "fused"
    path = tmp_path / "d.json"
    path.write_text(json.dumps(record))
    out, hits = run_pass(
        model, kernels.SparseKernelsPass, PassContext(target="ort"), decisions=path
    )
    assert hits == len(record["layers"]) >= 2
    nodes = list(out.graph)
    for node in nodes:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            assert producer is None or producer in nodes, f"{node.name} reads a removed node"
    _assert_mlp_outputs_match(model, out, tmp_path)
