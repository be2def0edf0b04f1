"""EoRA on Conv layers: the Conv pair's numerics in ORT, grouped Convs refused, and the
paths sparsify and quantize add to CNNs (a synthetic one and the digits CNN)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphopt import models
from graphopt.api import OptimizeOptions, optimize
from graphopt.editing import NameTable
from graphopt.passes.compensation.conv import canonical, geometry
from graphopt.passes.compensation.eora import ChangedLayer, compensate


def _value(name: str, shape: list[int] | None = None) -> ir.Value:
    return ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(shape) if shape else None,
    )


def _const(name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array.astype(np.float32), name=name))
    value.type = ir.TensorType(ir.DataType.FLOAT)
    value.shape = ir.Shape(list(array.shape))
    return value


def _conv_model(weight: np.ndarray, bias: np.ndarray, attributes: dict) -> ir.Model:
    """x[2, Cin, 9, 9] → Conv(weight, bias, attributes) → Relu."""
    x = _value("x", [2, weight.shape[1], 9, 9])
    w, b = _const("w", weight), _const("b", bias)
    y, z = _value("y"), _value("z")
    conv = ir.node("Conv", [x, w, b], attributes=attributes, outputs=[y], name="layer")
    graph = ir.Graph(
        [x],
        [z],
        nodes=[conv, ir.node("Relu", [y], outputs=[z], name="act")],
        initializers=[w, b],
        opset_imports={"": 17},
    )
    return ir.Model(graph, ir_version=8)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


GEOMETRIES = [
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0]},
    {"kernel_shape": [3, 2], "dilations": [2, 1], "pads": [2, 0, 2, 1]},
]


@pytest.mark.parametrize("attributes", GEOMETRIES)
def test_low_rank_change_is_restored_exactly_by_the_conv_pair(attributes):
    """ΔW of rank 2 and a rank-2 path: the compensated Conv computes the original one."""
    rng = np.random.default_rng(0)
    kh, kw = attributes["kernel_shape"]
    cout, cin = 6, 4
    weight = rng.standard_normal((cout, cin, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    w = canonical(weight).astype(np.float64)
    delta = rng.standard_normal((cout, 2)) @ rng.standard_normal((2, w.shape[1]))
    # Stored layout from canonical (ky, kx, channel): the inverse of canonical().
    changed = np.moveaxis((w - delta).reshape(cout, kh, kw, cin), -1, 1)
    model = _conv_model(changed, bias, attributes)
    node = model.graph.node(0)
    conv, why = geometry(node, weight.shape)
    assert conv is not None and not why
    samples = rng.standard_normal((300, w.shape[1]))
    layer = ChangedLayer(
        "layer", node.inputs[0], node.outputs[0], w, delta, samples.T @ samples / 300, conv
    )
    record = compensate(model, [layer], 2, "test", input_shapes={"x": (2, cin, 9, 9)})
    assert [entry.rank for entry in record.layers] == [2]
    # Relative errors, not squared: 1e-6 is the square root of the squared bound 1e-12.
    assert record.layers[0].error_after < 1e-6 < record.layers[0].error_before
    ops = [n.op_type for n in model.graph if (n.name or "").startswith("eora")]
    assert ops == ["Conv", "Conv", "Add"]
    x = rng.standard_normal((2, cin, 9, 9)).astype(np.float32)
    original = _run(_conv_model(weight, bias, attributes), x)
    got = _run(model, x)
    assert got.shape == original.shape
    np.testing.assert_allclose(got, original, rtol=1e-4, atol=1e-4)
    # FLOPs: (2·r·(N + K) + N) per output position, B·OH·OW positions.
    positions = 2 * original.shape[2] * original.shape[3]
    assert record.flops_added == positions * (2 * 2 * (cout + w.shape[1]) + cout)


@pytest.mark.parametrize(("group", "cin", "kind"), [(2, 2, "grouped"), (4, 1, "depthwise")])
def test_grouped_and_depthwise_convs_get_no_path_and_say_why(group, cin, kind):
    node = ir.node(
        "Conv",
        [_value("x"), _value("w")],
        attributes={"group": group, "kernel_shape": [3, 3]},
        outputs=[_value("y")],
    )
    conv, why = geometry(node, (4, cin, 3, 3))
    assert conv is None and kind in why and f"group {group}" in why


def _cnn() -> ir.Model:
    """x[1, 8, 12, 12] → Conv 8→16 3×3 → Relu → Conv 16→16 3×3 → Relu → depthwise 3×3 →
    GlobalAveragePool → Flatten, seeded weights."""
    rng = np.random.default_rng(1)
    x = _value("x", ["batch", 8, 12, 12])
    weights = {
        "w1": rng.standard_normal((16, 8, 3, 3)) * 0.2,
        "w2": rng.standard_normal((16, 16, 3, 3)) * 0.15,
        "w3": rng.standard_normal((16, 1, 3, 3)) * 0.3,
    }
    consts = {name: _const(name, array) for name, array in weights.items()}
    values = [_value(f"v{i}") for i in range(7)]
    pad = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        ir.node("Conv", [x, consts["w1"]], attributes=pad, outputs=[values[0]], name="c1"),
        ir.node("Relu", [values[0]], outputs=[values[1]], name="r1"),
        ir.node("Conv", [values[1], consts["w2"]], attributes=pad, outputs=[values[2]], name="c2"),
        ir.node("Relu", [values[2]], outputs=[values[3]], name="r2"),
        ir.node(
            "Conv",
            [values[3], consts["w3"]],
            attributes={**pad, "group": 16},
            outputs=[values[4]],
            name="dw",
        ),
        ir.node("GlobalAveragePool", [values[4]], outputs=[values[5]], name="gap"),
        ir.node("Flatten", [values[5]], outputs=[values[6]], name="flat"),
    ]
    graph = ir.Graph(
        [x], [values[6]], nodes=nodes, initializers=list(consts.values()), opset_imports={"": 17}
    )
    return ir.Model(graph, ir_version=8)


def test_sparsify_compensates_the_convs_it_sparsified(tmp_path):
    source = tmp_path / "cnn.onnx"
    ir.save(_cnn(), source)
    options = OptimizeOptions(
        sparsity="2:4",
        sparsity_criterion="magnitude",
        sparsity_keep_last=False,
        calib="random",
        compensation="eora:4",
        input_shapes={"x": (1, 8, 12, 12)},
    )
    result = optimize(source, tmp_path / "out.onnx", options)
    comp = result.report.details["sparsify"].compensation
    assert {entry.node for entry in comp.layers} == {"c1", "c2"}
    assert all(entry.error_after < entry.error_before for entry in comp.layers)
    assert comp.flops_added > 0
    model = ir.load(tmp_path / "out.onnx")
    assert sum(n.op_type == "Conv" for n in model.graph) == 3 + 2 * 2


def test_quantize_int8_compensates_convs_and_skips_the_depthwise_one(tmp_path):
    source = tmp_path / "cnn.onnx"
    ir.save(_cnn(), source)
    options = OptimizeOptions(
        quantize="int8", calib="random", compensation="eora:4", input_shapes={"x": (1, 8, 12, 12)}
    )
    result = optimize(source, tmp_path / "out.onnx", options)
    comp = result.report.details["quantize"].compensation
    assert {entry.node for entry in comp.layers} == {"c1", "c2"}
    assert [name for name, why in comp.skipped if "depthwise" in why] == ["dw"]


def _cosine(values) -> float:
    return float(np.mean([f.mean_cosine for f in values]))


@pytest.mark.parametrize(
    ("flags", "least"),
    [({"sparsity": "2:4", "sparsity_criterion": "magnitude"}, 0.4), ({"quantize": "int8"}, None)],
)
def test_digits_cnn(tmp_path, flags, least):
    """The real-weight digits CNN: 2:4 magnitude's held-out gap shrinks by ≥ 40% at rank 8;
    int8 QDQ Conv weights are read back from their DequantizeLinear (a path per Conv)."""
    from graphopt.models import digits

    calib = digits.write_calib_npz(tmp_path / "calib.npz", "calib", 96)
    options = OptimizeOptions(calib=str(calib), compensation="eora:8", **flags)
    result = optimize(models.get("digits"), tmp_path / "out.onnx", options)
    details = result.report.details
    comp = (details.get("sparsify") or details.get("quantize")).compensation
    convs = [entry for entry in comp.layers if entry.node.startswith("node_Conv")]
    assert convs, comp.skipped
    if least is None:
        assert len(convs) == 3  # every Conv, its weight dequantized from int8
        return
    before = 1 - _cosine(comp.fidelity_before["held-out"])
    after = 1 - _cosine(comp.fidelity_after["held-out"])
    assert after < (1 - least) * before, (before, after)


def test_a_path_beside_a_factorized_conv_restores_the_layer():
    """factorization's Conv pair (surgery.factorize_layer) at rank 2 of a rank-5 kernel, and
    a rank-3 path built from :func:`factorized`: together they compute the original Conv."""
    from graphopt.passes.compensation.conv import factorized
    from graphopt.passes.factorization.surgery import factorize_layer
    from graphopt.passes.sparsity.layers import find_layers

    rng = np.random.default_rng(3)
    attributes = GEOMETRIES[1]
    weight = rng.standard_normal((6, 5)) @ rng.standard_normal((5, 4 * 9))  # canonical, rank 5
    stored = np.moveaxis(weight.reshape(6, 3, 3, 4), -1, 1).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    model = _conv_model(stored, bias, attributes)
    (layer,), _ = find_layers(model.graph)
    w = layer.canonical().astype(np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    x, y = layer.node.inputs[0], layer.node.outputs[0]
    done = factorize_layer(model.graph, layer, u[:, :2] * s[:2], vt[:2], NameTable(model.graph))
    conv, why = factorized(done.first, 6)
    assert conv is not None and not why and conv.kernel == (3, 3) and conv.channels == 4
    delta = w - (u[:, :2] * s[:2]) @ vt[:2]
    changed = ChangedLayer("layer", x, y, w, delta, np.eye(w.shape[1]), conv)
    assert done.second.outputs[0] is y
    compensate(model, [changed], 3, "factorize")
    inputs = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    expected = _run(_conv_model(stored, bias, attributes), inputs)
    np.testing.assert_allclose(_run(model, inputs), expected, rtol=1e-4, atol=1e-4)
