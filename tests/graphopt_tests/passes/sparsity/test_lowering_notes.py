"""``--sparse-kernels`` is never silently a no-op: its note counts every sparse layer and says
why those it did not lower stay dense (weight dtype, too dense, fused into Attention, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.registry import PassContext
from graphopt_tests.helpers import import_or_skip, run_pass, tensor_info


def _sparse(rng: np.random.Generator, k: int, n: int, zeros: float, dtype=np.float32):
    w = rng.standard_normal((k, n)).astype(dtype)
    w[rng.random((k, n)) < zeros] = 0
    return w


def _model(nodes, inits: dict[str, np.ndarray], k: int, n: int) -> ir.Model:
    """x[batch, k] -> nodes -> y[batch, n] (domains onnx and com.microsoft)."""
    dtype = helper.np_dtype_to_tensor_dtype(next(iter(inits.values())).dtype)
    graph = helper.make_graph(
        nodes,
        "notes",
        [tensor_info("x", dtype, ["batch", k])],
        [tensor_info("y", dtype, ["batch", n])],
        [onnx.numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return io.load(helper.make_model(graph, opset_imports=opsets, ir_version=8)).model


def _note(context: PassContext) -> str:
    (note,) = [n for n in context.notes if n.startswith("sparse-kernels:")]
    return note


def _pass():
    from graphopt.passes.sparsity import lowering

    return lowering.SparseKernelsPass


def _note_of_two_layers(inits: dict) -> str:
    """The pass's note on fc1 (x @ w1) then fc2 (@ w2), which it must leave unlowered."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
    ]
    context = PassContext(target="ort")
    _, hits = run_pass(_model(nodes, inits, 32, 16), _pass(), context)
    assert hits == 0
    return _note(context)


def test_float16_sparse_layers_say_why_they_stay_dense() -> None:
    rng = np.random.default_rng(0)
    inits = {
        "w1": _sparse(rng, 32, 32, 0.7, np.float16),
        "w2": _sparse(rng, 32, 16, 0.7, np.float16),
    }
    note = _note_of_two_layers(inits)
    assert "lowered 0 of 2 sparse layer(s)" in note
    assert "2 with float16 weights" in note and "float32" in note


def test_too_dense_layers_say_so() -> None:
    rng = np.random.default_rng(0)
    inits = {"w1": _sparse(rng, 32, 32, 0.1), "w2": _sparse(rng, 32, 16, 0.0)}
    note = _note_of_two_layers(inits)
    assert "nothing lowered: no sparse layer" in note
    assert "the 2 constant-weight layer(s) are under the 20% zeros" in note


def _attention_model(rng: np.random.Generator, zeros: float, **attrs: int) -> tuple[ir.Model, int]:
    """Attention (packed Q/K/V weight [64, 192], bias, a [batch, seq] int32 key padding mask)
    -> MatMul [64, 64] -> y; the input is [batch, seq, 64]."""
    hidden = 64
    inits = {
        "qkv": _sparse(rng, hidden, 3 * hidden, zeros),
        "qkv_b": rng.standard_normal(3 * hidden).astype(np.float32),
        "wo": _sparse(rng, hidden, hidden, zeros),
    }
    nodes = [
        helper.make_node(
            "Attention",
            ["x", "qkv", "qkv_b", "mask"],
            ["a"],
            name="attn",
            domain="com.microsoft",
            num_heads=4,
            **attrs,
        ),
        helper.make_node("MatMul", ["a", "wo"], ["y"], name="out_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            tensor_info("x", TensorProto.FLOAT, ["batch", "seq", hidden]),
            tensor_info("mask", TensorProto.INT32, ["batch", "seq"]),
        ],
        [tensor_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [onnx.numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return io.load(helper.make_model(graph, opset_imports=opsets, ir_version=8)).model, hidden


@pytest.fixture
def kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.kernels

    import_or_skip("onnxruntime", "the lowered models run in ONNX Runtime")
    if not graphopt.kernels.available(quiet=True):
        pytest.skip(graphopt.kernels.unavailable_reason())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    from graphopt.backends.ort_custom_ops import own_session_options

    data = io.to_proto(model).SerializeToString()
    session = ort.InferenceSession(data, own_session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_sparse_qkv_of_attention_are_split_out_and_lowered(kernels) -> None:
    """All three faster sparse (forced): Attention -> three sparse ops + MultiHeadAttention,
    the same outputs, padding mask included; the note counts Q/K/V among the lowered."""
    model, hidden = _attention_model(np.random.default_rng(0), 0.8)
    context = PassContext(target="ort", input_shapes={"x": (1, 16, hidden), "mask": (1, 16)})
    out, hits = run_pass(model, _pass(), context, min_speedup=1e-6)
    assert hits == 4
    assert "lowered 4 of 4 sparse layer(s)" in _note(context)
    ops = sorted((n.domain, n.op_type) for n in out.graph)
    assert ops == [("com.microsoft", "MultiHeadAttention"), *[("graphopt", "SparseMatMul")] * 4]
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 16), (2, 5)):
        mask = np.ones((batch, seq), np.int32)
        mask[0, seq // 2 :] = 0
        feeds = {"x": rng.standard_normal((batch, seq, hidden)).astype(np.float32), "mask": mask}
        for ref, got in zip(_outputs(model, feeds), _outputs(out, feeds), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_qkv_not_all_faster_stay_fused_and_are_said_to_run_dense(kernels) -> None:
    model, hidden = _attention_model(np.random.default_rng(0), 0.8)
    context = PassContext(target="ort", input_shapes={"x": (1, 16, hidden), "mask": (1, 16)})
    out, hits = run_pass(model, _pass(), context, min_speedup=1e9)
    assert hits == 0
    assert any(n.op_type == "Attention" for n in out.graph)
    note = _note(context)
    assert "lowered 0 of 4 sparse layer(s)" in note
    assert "3 Q/K/V projection(s) left fused in com.microsoft Attention (dense)" in note
    assert "1 not faster than dense" in note


def test_attention_the_split_cannot_take_is_counted_and_said_to_run_dense() -> None:
    """A causal Attention (unidirectional) stays fused; with no other sparse layer the pass
    needs no library and its note still counts Q/K/V."""
    rng = np.random.default_rng(0)
    model, _ = _attention_model(rng, 0.8, unidirectional=1)
    wo = model.graph.initializers["wo"]
    wo.const_value = ir.tensor(rng.standard_normal((64, 64)).astype(np.float32), name="wo")
    context = PassContext(target="ort")
    _, hits = run_pass(model, _pass(), context)
    assert hits == 0
    note = _note(context)
    assert "lowered 0 of 3 sparse layer(s)" in note
    assert "3 Q/K/V projection(s) fused into com.microsoft Attention" in note
    assert "1 other layer(s) under the 20% zeros" in note


def test_replayed_decisions_split_attention_as_recorded(kernels, tmp_path: Path) -> None:
    """A replay lowers the Q/K/V its record lowered; a record without them (written by a
    graphopt that kept Attention fused) keeps it fused, without an error."""
    import json

    from graphopt.passes.sparsity.crossover import METADATA_KEY

    model, hidden = _attention_model(np.random.default_rng(0), 0.8)
    shapes = {"x": (1, 16, hidden), "mask": (1, 16)}
    first, _ = run_pass(model, _pass(), PassContext(target="ort", input_shapes=shapes))
    record = json.loads(first.metadata_props[METADATA_KEY])
    assert sorted(e["layer"] for e in record["layers"]) == [
        "attn_k",
        "attn_q",
        "attn_v",
        "out_proj",
    ]
    for entry in record["layers"]:
        entry["lowered"] = True
    path = tmp_path / "all.json"
    path.write_text(json.dumps(record))
    context = PassContext(target="ort", input_shapes=shapes)
    out, hits = run_pass(model, _pass(), context, decisions=str(path))
    assert hits == 4 and any(n.op_type == "MultiHeadAttention" for n in out.graph)
    record["layers"] = [e for e in record["layers"] if e["layer"] == "out_proj"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(record))
    context = PassContext(target="ort", input_shapes=shapes)
    out, hits = run_pass(model, _pass(), context, decisions=str(path))
    assert hits == 1 and any(n.op_type == "Attention" for n in out.graph)
    assert "3 Q/K/V projection(s) fused into com.microsoft Attention" in _note(context)
