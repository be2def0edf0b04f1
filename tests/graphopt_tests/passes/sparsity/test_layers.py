"""Which layers sparsify finds and selects, and their canonical ``[N, K]`` form."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.models import build
from graphopt.passes.sparsity.layers import find_layers, select
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.pruning.graphs import cnn, mlp

F = TensorProto.FLOAT


def _gemm_conv() -> ir.Model:
    rng = np.random.default_rng(0)
    inits = {
        "cw": rng.standard_normal((16, 4, 3, 3)).astype(np.float32),
        "gw": rng.standard_normal((10, 16)).astype(np.float32),
        "mw": rng.standard_normal((16, 6)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "gw"], ["g"], name="head", transB=1),
        helper.make_node("MatMul", ["f", "mw"], ["m"]),
    ]
    outputs = [tensor_info("g", F, [1, 10]), tensor_info("m", F, [1, 6])]
    return make_model(nodes, [tensor_info("x", F, [1, 4, 5, 5])], outputs, inits)


def test_canonical_form_round_trips_and_orders_k():
    layers, refused = find_layers(_gemm_conv().graph)
    assert not refused
    by_op = {layer.op: layer for layer in layers}
    conv, gemm, matmul = by_op["Conv"], by_op["Gemm"], by_op["MatMul"]
    w = conv.canonical()
    stored = ir.convenience.get_const_tensor(conv.weight).numpy()
    assert w.shape == (16, 36)
    # K runs channel-fastest: K index (ky*3 + kx)*4 + c holds W[o, c, ky, kx].
    assert w[5, (1 * 3 + 2) * 4 + 3] == stored[5, 3, 1, 2]
    for layer in (conv, gemm, matmul):
        np.testing.assert_array_equal(
            layer.stored(layer.canonical()), ir.convenience.get_const_tensor(layer.weight).numpy()
        )
    assert gemm.canonical().shape == (10, 16) and matmul.canonical().shape == (6, 16)


def test_default_selection_leaves_the_classifier_and_tiny_layers_dense():
    layers, _ = find_layers(cnn().graph)
    chosen, left = select(layers, ("all",), keep_last=True)
    assert [layer.weight.name for layer in chosen] == ["c1.w", "c2.w", "c3.w"]
    assert [why for _, why in left] == ["the last layer (classifier): --sparsity-keep-last false"]
    chosen, _ = select(layers, ("all",), keep_last=False)
    assert "fc.w" in [layer.weight.name for layer in chosen]
    # The digits CNN's first conv reads 1 channel × 3×3: 9 weights per output.
    layers, _ = find_layers(io.load(build("digits")).model.graph)
    _, left = select(layers, ("all",), keep_last=True)
    assert "reduction size 9 < 16" in dict(left).values()


def test_an_ffn_pair_is_found_and_its_last_layer_is_not_a_classifier():
    layers, _ = find_layers(mlp(hidden=64, width=16).graph)
    assert [layer.kind for layer in layers] == ["ffn", "ffn"]
    chosen, _ = select(layers, ("ffn",), keep_last=True)
    assert len(chosen) == 2


def test_a_cnns_mlp_head_is_a_classifier():
    """VGG's and MobileNetV3's heads are Linear-activation-Linear on [N, features]: an FFN
    pair by shape of the graph, but its last layer is the final classifier that keep-last
    leaves dense (it was sparsified); the same pair on [batch, seq, width] rows is not."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.standard_normal((32, 64)).astype(np.float32),
        "w2": rng.standard_normal((10, 64)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("HardSwish", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2"], ["y"], name="fc2", transB=1),
    ]
    model = make_model(nodes, [tensor_info("x", F, [1, 32])], [tensor_info("y", F, [1, 10])], inits)
    model.graph.node(0).outputs[0].shape = ir.Shape([1, 64])
    model.graph.node(1).outputs[0].shape = ir.Shape([1, 64])
    layers, _ = find_layers(model.graph)
    assert [layer.kind for layer in layers] == ["ffn", "ffn"]
    chosen, left = select(layers, ("all",), keep_last=True)
    assert [layer.node.name for layer in chosen] == ["fc1"]
    assert left == [("fc2", "the last layer (classifier): --sparsity-keep-last false")]


@pytest.mark.parametrize("name", ["bert_tiny", "minilm"])
def test_transformer_layers_are_classified(name):
    path = build(name)
    layers, _ = find_layers(io.load(path).model.graph)
    kinds = [layer.kind for layer in layers]
    blocks = kinds.count("ffn") // 2
    assert blocks >= 2 and kinds.count("ffn") == 2 * blocks
    # q, k, v and the output projection per block.
    assert kinds.count("attention") == 4 * blocks
    ffn, _ = select(layers, ("ffn",), keep_last=True)
    assert all(layer.kind == "ffn" for layer in ffn) and len(ffn) == 2 * blocks
    for layer in ffn:  # [d, 4d] and [4d, d]
        assert max(layer.shape) == 4 * min(layer.shape)


def test_globs_pick_node_names():
    layers, _ = find_layers(_gemm_conv().graph)
    chosen, _ = select(layers, ("he*",), keep_last=False)
    assert [layer.op for layer in chosen] == ["Gemm"]
    chosen, left = select(layers, ("conv", "mw"), keep_last=False)  # node or weight names
    assert [layer.op for layer in chosen] == ["Conv", "MatMul"]
    assert "not in --sparsity-layers conv,mw" in dict(left).values()


def _weight_output(path) -> None:
    """x → MatMul(x, w1) → MatMul(·, wo) → y, with ``wo`` also a graph output."""
    import onnx

    rng = np.random.default_rng(0)
    inits = {n: (rng.standard_normal((64, 64)) * 0.1).astype(np.float32) for n in ("w1", "wo")}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "wo"], ["y"]),
    ]
    outputs = [tensor_info("y", F, ["n", 64]), tensor_info("wo", F, [64, 64])]
    model = make_model(nodes, [tensor_info("x", F, ["n", 64])], outputs, inits)
    onnx.save(io.to_proto(model), path)


def test_a_weight_that_is_a_graph_output_is_refused_by_name(tmp_path):
    """A weight the model also outputs keeps its value: find_layers (sparsify's, factorize's
    and EoRA's list of layers) refuses its layer, naming it by the weight when the node is
    unnamed (the record read "left dense: : ...")."""
    _weight_output(tmp_path / "m.onnx")
    layers, refused = find_layers(io.load(tmp_path / "m.onnx").model.graph)
    assert [layer.name for layer in layers] == ["first"]
    assert refused == [("wo", "weight is also a graph output")]


@pytest.mark.parametrize(
    "flags",
    [
        ["--sparsity", "2:4", "--sparsity-keep-last", "false"],
        [
            *("--factorize", "rank=8", "--calib", "random"),
            *("--factorize-keep-last", "false", "--factorize-speed-check", "off"),
        ],
    ],
)
def test_a_weight_output_keeps_its_value_end_to_end(tmp_path, flags, capsys):
    """Both passes deleted the initializer the output ``wo`` names: exit 3 ("In
    clone_graph"). Now the other layer changes, that one stays, and ``wo`` is the original
    weight, at two batch sizes."""
    import onnxruntime as ort

    from graphopt.cli import main

    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    _weight_output(source)
    assert main(["optimize", str(source), "-o", str(out), *flags]) == 0, capsys.readouterr()
    assert "wo: weight is also a graph output" in capsys.readouterr().out
    before = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for rows in (1, 3):
        x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
        want, got = before.run(["y", "wo"], {"x": x}), after.run(["y", "wo"], {"x": x})
        np.testing.assert_array_equal(got[1], want[1])
        assert not np.array_equal(got[0], want[0])  # the first layer did change


def test_replace_weight_keeps_a_graph_output_weight(tmp_path):
    """The same rule in replace_weight (which sparsify and EoRA's re-sparsifying call with
    their own lists): the new weight gets a new name, the output keeps the old tensor."""
    from graphopt.passes.sparsity.layers import Layer, replace_weight

    _weight_output(tmp_path / "m.onnx")
    graph = io.load(tmp_path / "m.onnx").model.graph
    node = list(graph)[1]
    old = graph.initializers["wo"]
    layer = Layer(node, "MatMul", old, (64, 64))
    replace_weight(graph, layer, np.zeros((64, 64), np.float32))
    assert graph.initializers.get("wo") is old and node.inputs[1] is not old
    assert node.inputs[1].name == "wo_sparse"
