"""The rewrite itself: at full rank the two-node form computes what the layer did, in ORT, for
MatMul, Gemm (transB, bias, alpha, beta), 1×1 and 3×3 Conv (strides, pads), at two input
shapes where the dims are symbolic."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.editing import NameTable
from graphopt.passes.factorization import lowrank
from graphopt.passes.factorization.surgery import factorize_layer, refusal
from graphopt.passes.sparsity.layers import find_layers
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    data = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _factorize_all(model: ir.Model, rank: int | None = None) -> list[str]:
    layers, refused = find_layers(model.graph)
    assert not refused
    names = NameTable(model.graph)
    for layer in layers:
        w = layer.canonical().astype(np.float64)
        full = min(w.shape) if rank is None else rank
        u, v = lowrank.spectrum(w, None, "svd").factors(full)
        factorize_layer(model.graph, layer, u, v, names)
    return [n.op_type for n in model.graph]


def _check(model: ir.Model, shapes: list[tuple[int, ...]], ops: list[str]) -> None:
    rng = np.random.default_rng(0)
    original = model.clone()
    assert _factorize_all(model) == ops
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        want, got = _run(original, x), _run(model, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def test_matmul():
    rng = np.random.default_rng(1)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor_info("x", F, ["batch", "seq", 40])],
        [tensor_info("y", F, ["batch", "seq", 36])],
        {"w": _w(rng, 40, 36)},
    )
    _check(model, [(1, 5, 40), (3, 7, 40)], ["MatMul", "MatMul"])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_keeps_alpha_beta_and_bias(trans_b):
    rng = np.random.default_rng(2)
    w = _w(rng, 36, 40) if trans_b else _w(rng, 40, 36)
    node = helper.make_node(
        "Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=0.7, beta=1.3, transB=trans_b
    )
    model = make_model(
        [node],
        [tensor_info("x", F, ["batch", 40])],
        [tensor_info("y", F, ["batch", 36])],
        {"w": w, "c": rng.standard_normal(36).astype(np.float32)},
    )
    _check(model, [(2, 40), (5, 40)], ["MatMul", "Gemm"])
    gemm = list(model.graph)[1]
    assert gemm.attributes["alpha"].value == pytest.approx(0.7)
    assert gemm.attributes["beta"].value == pytest.approx(1.3)


def test_gemm_with_trans_a_is_refused():
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)],
        [tensor_info("x", F, [40, "batch"])],
        [tensor_info("y", F, ["batch", 36])],
        {"w": np.ones((40, 36), np.float32)},
    )
    found, refused = find_layers(model.graph)
    assert not found and refused and "transA" in refused[0][1]


@pytest.mark.parametrize(
    ("kernel", "attrs"),
    [
        (1, {}),
        (1, {"strides": [2, 2]}),
        (3, {"pads": [1, 1, 1, 1]}),
        (3, {"strides": [2, 2], "pads": [1, 0, 1, 2], "dilations": [1, 2]}),
    ],
)
def test_conv(kernel, attrs):
    rng = np.random.default_rng(3)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    model = make_model(
        [node],
        [tensor_info("x", F, ["batch", 12, "h", "w"])],
        [tensor_info("y", F, ["batch", None, None, None])],
        {"w": _w(rng, 20, 12, kernel, kernel), "b": rng.standard_normal(20).astype(np.float32)},
    )
    _check(model, [(1, 12, 9, 11), (2, 12, 14, 8)], ["Conv", "Conv"])
    second = list(model.graph)[1]
    assert list(second.attributes["kernel_shape"].value) == [1, 1]
    assert "strides" not in second.attributes and "pads" not in second.attributes


def test_low_rank_moves_outputs_and_keeps_names():
    rng = np.random.default_rng(4)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor_info("x", F, ["batch", 64])],
        [tensor_info("y", F, ["batch", 48])],
        {"w": _w(rng, 64, 48)},
    )
    original = model.clone()
    _factorize_all(model, rank=8)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    want, got = _run(original, x), _run(model, x)
    assert not np.allclose(got, want, atol=1e-3)  # rank 8 of 48: an approximation
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert "w" not in model.graph.initializers  # the old weight is gone
    shapes = sorted(tuple(v.const_value.shape) for v in model.graph.initializers.values())
    assert shapes == [(8, 48), (64, 8)]


def test_grouped_conv_is_refused():
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=4)],
        [tensor_info("x", F, [1, 32, 8, 8])],
        [tensor_info("y", F, ["batch", None, None, None])],
        {"w": np.ones((32, 8, 3, 3), np.float32)},
    )
    layers, _ = find_layers(model.graph)
    assert "grouped Conv" in refusal(layers[0])


def test_a_weight_that_is_a_graph_output_keeps_its_initializer():
    """find_layers refuses such layers; a caller with its own list (or a later change of
    that rule) must still not delete the initializer the graph output names (exit 3)."""
    from graphopt.passes.sparsity.layers import Layer

    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor_info("x", F, ["n", 40])],
        [tensor_info("y", F, ["n", 24]), tensor_info("w", F, [40, 24])],
        {"w": _w(rng, 40, 24)},
    )
    node = next(iter(model.graph))
    weight = model.graph.initializers["w"]
    layer = Layer(node, "MatMul", weight, (40, 24))
    u, v = lowrank.spectrum(layer.canonical().astype(np.float64), None, "svd").factors(8)
    factorize_layer(model.graph, layer, u, v, NameTable(model.graph))
    assert model.graph.initializers.get("w") is weight
    assert model.graph.outputs[1] is weight
    ir.serde.serialize_model(model.clone())  # a dangling output made the copy fail
