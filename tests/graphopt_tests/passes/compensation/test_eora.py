"""EoRA numerics, the flag's parser and the path inserted into a graph (run in ORT)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphopt.errors import UserInputError
from graphopt.passes.compensation.eora import (
    ChangedLayer,
    compensate,
    eora_factors,
    output_error,
    parse_compensation,
    require_calibration,
)


def _anisotropic(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Inputs whose energy sits in a few directions, not aligned with the axes."""
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    scales = np.geomspace(30.0, 0.01, k)
    return (rng.standard_normal((rows, k)) * scales) @ basis.T


def _svd_truncation(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize(("n", "k"), [(16, 24), (24, 16)])
def test_full_rank_cancels_the_error_on_the_data(n, k):
    rng = np.random.default_rng(0)
    x = _anisotropic(rng, 400, k)
    w = rng.standard_normal((n, k))
    delta = rng.standard_normal((n, k)) * 0.1
    gram = x.T @ x / len(x)
    a, b = eora_factors(delta, gram, min(n, k))
    assert a.shape == (min(n, k), k) and b.shape == (n, min(n, k))
    assert output_error(w, delta, gram) > 1e-3
    assert output_error(w, delta - b @ a, gram) < 1e-18
    residual = x @ (delta - b @ a).T
    assert np.abs(residual).max() < 1e-9 * np.abs(x @ delta.T).max()


def test_rank_is_capped_by_the_matrix():
    rng = np.random.default_rng(1)
    a, b = eora_factors(rng.standard_normal((6, 10)), np.eye(10), 32)
    assert a.shape == (6, 10) and b.shape == (6, 6)


def test_beats_plain_svd_on_anisotropic_inputs_at_the_same_rank():
    rng = np.random.default_rng(2)
    x = _anisotropic(rng, 2000, 64)
    gram = x.T @ x / len(x)
    for n, rank in itertools.product((48, 96), (4, 8, 16)):
        w = rng.standard_normal((n, 64))
        delta = rng.standard_normal((n, 64)) * 0.05
        a, b = eora_factors(delta, gram, rank)
        eora = output_error(w, delta - b @ a, gram)
        plain = output_error(w, delta - _svd_truncation(delta, rank), gram)
        assert eora < 0.5 * plain, (n, rank, eora, plain)


def test_isotropic_inputs_reduce_to_plain_svd():
    rng = np.random.default_rng(3)
    delta = rng.standard_normal((12, 20))
    a, b = eora_factors(delta, np.eye(20) * 3.0, 5)
    np.testing.assert_allclose(b @ a, _svd_truncation(delta, 5), atol=1e-10)


def test_factors_are_deterministic():
    rng = np.random.default_rng(4)
    x = _anisotropic(rng, 300, 16)
    delta = rng.standard_normal((8, 16))
    first = eora_factors(delta, x.T @ x, 4)
    second = eora_factors(delta.copy(), (x.T @ x).copy(), 4)
    for p, q in zip(first, second, strict=True):
        assert p.tobytes() == q.tobytes()


@pytest.mark.parametrize(
    ("text", "rank"), [(None, 0), ("none", 0), ("eora:8", 8), (" EoRA:32 ", 32)]
)
def test_parse(text, rank):
    assert parse_compensation(text, "sparsify") == (rank, "")


@pytest.mark.parametrize("text", ["bias", "lsq"])
def test_pruning_values_are_off_with_a_note(text):
    rank, note = parse_compensation(text, "quantize")
    assert rank == 0 and "pruning" in note and text in note


@pytest.mark.parametrize("text", ["eora", "eora:0", "eora:-2", "eora:x", "svd:8", "8"])
def test_bad_values_are_one_line_errors(text):
    with pytest.raises(UserInputError) as info:
        parse_compensation(text, "sparsify")
    assert "\n" not in str(info.value) and "eora:RANK" in str(info.value)


def test_calibration_is_required():
    require_calibration(0, "", "sparsify")
    with pytest.raises(UserInputError, match="--calib"):
        require_calibration(8, "", "sparsify")


def _layer_model(w_sparse: np.ndarray, output_is_graph_output: bool) -> ir.Model:
    """x[2, 5, K] · W'[K, N] (+ Relu unless the MatMul's output is the graph output)."""
    k, n = w_sparse.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, k]))
    weight = ir.Value(name="w", const_value=ir.tensor(w_sparse.astype(np.float32), name="w"))
    weight.type = ir.TensorType(ir.DataType.FLOAT)
    weight.shape = ir.Shape([k, n])
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, n]))
    nodes = [ir.node("MatMul", [x, weight], outputs=[y], name="layer")]
    outputs = [y]
    if not output_is_graph_output:
        z = ir.Value(name="z", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, n]))
        nodes.append(ir.node("Relu", [y], outputs=[z], name="act"))
        outputs = [z]
    graph = ir.Graph([x], outputs, nodes=nodes, initializers=[weight], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def _run(model: ir.Model, x: np.ndarray) -> tuple[list[str], np.ndarray]:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return names, session.run(None, {"x": x})[0]


@pytest.mark.parametrize("output_is_graph_output", [True, False])
def test_the_path_computes_x_w_plus_x_a_b_and_keeps_output_names(output_is_graph_output):
    rng = np.random.default_rng(5)
    k, n = 12, 7
    w = rng.standard_normal((n, k))
    sparse = np.where(rng.random((n, k)) < 0.5, 0.0, w)
    samples = _anisotropic(rng, 200, k)
    model = _layer_model(sparse.T, output_is_graph_output)
    graph = model.graph
    layer = ChangedLayer(
        "layer", graph.inputs[0], graph.node(0).outputs[0], w, (w - sparse), samples.T @ samples
    )
    record = compensate(model, [layer], 3, "test")
    assert [entry.rank for entry in record.layers] == [3]
    assert record.layers[0].error_after < record.layers[0].error_before
    assert record.flops_added == 2 * 10 * (3 * (k + n)) + 10 * n  # 2 MatMuls and an Add
    a_t = graph.initializers["eora_layer_A"].const_value.numpy()
    b_t = graph.initializers["eora_layer_B"].const_value.numpy()
    assert a_t.shape == (k, 3) and b_t.shape == (3, n)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    names, got = _run(model, x)
    expected = x @ sparse.T.astype(np.float32) + (x @ a_t) @ b_t
    if not output_is_graph_output:
        expected = np.maximum(expected, 0)
    assert names == (["y"] if output_is_graph_output else ["z"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_full_rank_path_restores_the_dense_layer_in_ort():
    rng = np.random.default_rng(6)
    k, n = 10, 6
    w = rng.standard_normal((n, k))
    sparse = np.where(rng.random((n, k)) < 0.5, 0.0, w)
    samples = _anisotropic(rng, 100, k)
    model = _layer_model(sparse.T, True)
    graph = model.graph
    layer = ChangedLayer(
        "layer", graph.inputs[0], graph.node(0).outputs[0], w, w - sparse, samples.T @ samples
    )
    compensate(model, [layer], n, "test")
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    _, got = _run(model, x)
    np.testing.assert_allclose(got, x @ w.T.astype(np.float32), rtol=1e-4, atol=1e-4)
