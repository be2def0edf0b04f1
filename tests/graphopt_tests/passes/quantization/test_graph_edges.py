"""Quantizing graphs at their edges: an initializer the caller may override, a graph input
passed straight through to an output, one weight read at two axes, a Concat with a float
constant (QOperator), a float64 model, a model the mode would hand back unchanged, and what
the report says about each (kept-float reasons, type changes, --exclude)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.errors import UserInputError
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.passes.quantization.record import QuantRecord
from graphopt.registry import PassContext
from graphopt.sessions import make_session
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(np.float32)


def _quantize(model: ir.Model, target: str = "portable", **options) -> QuantRecord:
    context = PassContext(target=target)
    QuantizePass(context, **options)(model)
    return context.details["quantize"]


def _valid(model: ir.Model) -> None:
    """ONNX's full check, and ORT loads it (optimizations off and on)."""
    onnx.checker.check_model(io.to_proto(model), full_check=True)
    make_session(model)
    make_session(model, optimize=True)


def _layers(record: QuantRecord) -> dict[str, tuple[str, str]]:
    return {layer.node: (layer.precision, layer.reason) for layer in record.layers}


def _overridable_model(only: bool = False) -> ir.Model:
    """x -> MatMul(Wv) [-> Relu -> MatMul(W2)]: Wv is an initializer that is also a graph
    input (IR 4+: a default the caller may feed)."""
    nodes = [helper.make_node("MatMul", ["x", "Wv"], ["a"], name="overridden")]
    inits = {"Wv": _w(16, 16)}
    inputs = [tensor_info("x", F, ["N", 16]), tensor_info("Wv", F, [16, 16])]
    if only:
        return make_model(nodes, inputs, [tensor_info("a", F, ["N", 16])], inits)
    nodes += [
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fixed"),
    ]
    inits["W2"] = _w(16, 16, seed=1)
    return make_model(nodes, inputs, [tensor_info("y", F, ["N", 16])], inits)


OVERRIDE_REASON = "initializer the caller may override"


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("int8", {"calib": "random"}),
        ("int8", {"calib": "random", "quant_format": "qoperator", "target": "ort"}),
        ("fp8", {"calib": "random"}),
        ("int4-weight", {"target": "ort"}),
    ],
)
def test_an_overridable_weight_keeps_its_layer_float_with_the_reason(mode, options):
    """Quantizing it froze the stored default (int8 read None for it and crashed on a
    scalar); the caller's value must still reach the layer."""
    model = _overridable_model()
    if mode == "fp8":
        from graphopt.opset import raise_in_place

        raise_in_place(model, 19, "fp8")
    record = _quantize(model, **{"mode": mode, **options})
    precision, reason = _layers(record)["overridden"]
    assert precision == "float" and OVERRIDE_REASON in reason
    assert _layers(record)["fixed"][0] != "float"
    assert "Wv" in [v.name for v in model.graph.inputs]
    assert model.graph.initializers["Wv"].dtype == ir.DataType.FLOAT
    _valid(model)
    # The caller's value is what the layer reads.
    x = np.ones((2, 16), np.float32)
    session = make_session(model)
    zero = session.run(None, {"x": x, "Wv": np.zeros((16, 16), np.float32)})[0]
    assert np.allclose(zero, 0.0)
    assert any(note.startswith("kept in float: MatMul: Wv is an") for note in record.notes)


@pytest.mark.parametrize("mode", ["int8", "int4-weight", "fp16", "fp8"])
def test_a_model_whose_only_layer_reads_an_overridable_weight_is_refused(mode):
    model = _overridable_model(only=True)
    if mode == "fp8":
        from graphopt.opset import raise_in_place

        raise_in_place(model, 19, "fp8")
    options = {"calib": "random"} if mode in ("int8", "fp8") else {}
    target = "ort" if mode == "int4-weight" else "portable"
    match = "nothing to quantize: every candidate stays float"
    with pytest.raises(UserInputError, match=match) as caught:
        _quantize(model, target=target, mode=mode, **options)
    assert "\n" not in str(caught.value)
    if mode != "fp16":  # fp16 casts an input: the layer has no weight of its own to shrink
        assert OVERRIDE_REASON in str(caught.value)


def _passthrough_model() -> ir.Model:
    """x is a graph input and also a graph output; y = x @ W."""
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [tensor_info("x", F, ["N", 16])],
        [tensor_info("x", F, ["N", 16]), tensor_info("y", F, ["N", 16])],
        {"W": _w(16, 16)},
    )


@pytest.mark.parametrize(
    ("target", "quant_format"), [("ort", "qdq"), ("ort", "qoperator"), ("portable", "qdq")]
)
def test_a_graph_input_passed_through_to_an_output_stays_itself(target, quant_format):
    """The Q/DQ emission renamed the value to put the output on the DQ: the graph input was
    renamed with it, and the model asked for an input nobody passes."""
    model = _passthrough_model()
    record = _quantize(model, target=target, mode="int8", calib="random", quant_format=quant_format)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["x", "y"]
    assert model.graph.outputs[0] is model.graph.inputs[0]  # passed through exactly
    _valid(model)
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    passed, _ = make_session(model).run(None, {"x": x})
    assert np.array_equal(passed, x)
    # The layer reads x through a Q/DQ (not weight-only under an "int8" label).
    matmul_reads = [n for n in model.graph if n.op_type in ("MatMul", "QLinearMatMul")]
    assert matmul_reads and matmul_reads[0].inputs[0] is not model.graph.inputs[0]
    assert not any("quantized too" in n and ": x" in n for n in record.notes)


def test_portable_quantizes_a_graph_output_for_its_int8_reader_and_leaves_it_float():
    """a = x @ W1 is a model output and the next layer's input: the reader gets it through a
    Q/DQ, the output stays the float a (portable keeps model outputs float)."""
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["a"], name="first"),
            helper.make_node("MatMul", ["a", "W2"], ["y"], name="second"),
        ],
        [tensor_info("x", F, ["N", 16])],
        [tensor_info("a", F, ["N", 16]), tensor_info("y", F, ["N", 16])],
        {"W1": _w(16, 16), "W2": _w(16, 16, seed=1)},
    )
    _quantize(model, mode="int8", calib="random")
    second = next(n for n in model.graph if n.name == "second")
    assert second.inputs[0].producer().op_type == "DequantizeLinear"
    assert model.graph.outputs[0].name == "a"
    assert model.graph.outputs[0].producer().name == "first"
    _valid(model)


def _shared_transposed_model(opset: int = 17) -> ir.Model:
    """One weight read by MatMul (x @ W, axis 1) and by Gemm transB=1 (r @ W^T, axis 0)."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "Ws"], ["a"], name="mm"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "Ws"], ["y"], name="gemm", transB=1),
        ],
        [tensor_info("x", F, ["N", 16])],
        [tensor_info("y", F, ["N", 16])],
        {"Ws": _w(16, 16)},
        opset=opset,
    )


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_weight_read_at_two_axes_gets_unique_node_names_and_one_type_change(mode):
    """fp8 named both DequantizeLinear nodes Ws_DequantizeLinear (a value-name helper made
    the names): ORT refused the model. The type-change list named Ws twice."""
    model = _shared_transposed_model(19 if mode == "fp8" else 17)
    record = _quantize(model, mode=mode, calib="random")
    names = [node.name for node in model.graph]
    assert len(names) == len(set(names)), collections.Counter(names).most_common(2)
    assert [c.tensor for c in record.type_changes if c.tensor.startswith("Ws")] == ["Ws"]
    _valid(model)


def test_int4_names_its_dequantize_node_apart_from_existing_ones():
    """A node already named like the one a mode adds keeps its name; the new one another."""
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["x1"], name="W_DequantizeLinear"),
            helper.make_node("MatMul", ["x1", "W"], ["y"], name="mm"),
        ],
        [tensor_info("x", F, ["N", 32])],
        [tensor_info("y", F, ["N", 8])],
        {"W": _w(32, 8)},
        opset=21,
        ir_version=10,
    )
    _quantize(model, mode="int4-weight")
    names = [node.name for node in model.graph]
    assert len(names) == len(set(names))
    _valid(model)


@pytest.mark.parametrize("activation_type", ["u8", "s8"])
def test_qoperator_concat_with_a_float_constant_runs_on_int8(activation_type):
    """The constant stayed float beside int8 inputs: ORT refused the Concat ("bound to
    different types"). It is quantized with the shared scale, as the QDQ form's Q rounds it."""
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
            helper.make_node("Concat", ["a", "cst"], ["cc"], name="concat", axis=1),
            helper.make_node("Conv", ["cc", "Wc"], ["y"], name="conv_c"),
        ],
        [tensor_info("x", F, [1, 4, 8, 8])],
        [tensor_info("y", F, [1, 16, 8, 8])],
        {
            "Wa": (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32),
            "cst": (rng.standard_normal((1, 4, 8, 8)) * 0.3).astype(np.float32),
            "Wc": (rng.standard_normal((16, 12, 1, 1)) * 0.3).astype(np.float32),
        },
    )
    original = model.clone()
    record = _quantize(
        model,
        target="ort",
        mode="int8",
        calib="random",
        quant_format="qoperator",
        activation_type=activation_type,
    )
    _valid(model)
    concat = next(n for n in model.graph if n.op_type == "Concat")
    integer = ir.DataType.UINT8 if activation_type == "u8" else ir.DataType.INT8
    assert {v.dtype for v in concat.inputs} == {integer}
    assert "cst" in {c.tensor for c in record.type_changes}
    x = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    want = make_session(original).run(None, {"x": x})[0].reshape(-1)
    got = make_session(model).run(None, {"x": x})[0].reshape(-1)
    assert float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got))) > 0.99


def _float64_model() -> ir.Model:
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
            helper.make_node("Relu", ["a"], ["y"], name="relu"),
        ],
        [tensor_info("x", TensorProto.DOUBLE, ["N", 16])],
        [tensor_info("y", TensorProto.DOUBLE, ["N", 16])],
        {"W": np.random.default_rng(0).standard_normal((16, 16))},
        opset=19,
    )


@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8", "int8-dynamic", "int4-weight", "fp8"])
def test_a_float64_model_is_refused_naming_float64(mode):
    """It came back unchanged with exit 0 ("0 layers quantized, 0 kept in float")."""
    options = {"calib": "random"} if mode in ("int8", "fp8") else {}
    with pytest.raises(UserInputError, match=r"computes in float64 \(1 Conv/Gemm/MatMul"):
        _quantize(_float64_model(), target="ort", mode=mode, **options)


def test_a_float64_model_without_weighted_ops_is_refused_for_fp16():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [tensor_info("x", TensorProto.DOUBLE, ["N", 16])],
        [tensor_info("y", TensorProto.DOUBLE, ["N", 16])],
    )
    with pytest.raises(UserInputError, match="computes in float64"):
        _quantize(model, mode="fp16")


def _mlp() -> ir.Model:
    return make_model(
        [
            helper.make_node("MatMul", ["x", "Wa"], ["a"], name="first"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "Wb"], ["y"], name="second"),
        ],
        [tensor_info("x", F, ["N", 64])],
        [tensor_info("y", F, ["N", 64])],
        {"Wa": _w(64, 64), "Wb": _w(64, 64, seed=1)},
    )


def test_an_exclude_name_matching_no_node_is_refused_an_absent_op_type_noted():
    with pytest.raises(UserInputError, match="--exclude 'frist' matches no node"):
        _quantize(_mlp(), mode="fp16", exclude="frist")
    record = _quantize(_mlp(), mode="fp16", exclude="Softmax,first")
    assert "--exclude Softmax: the model has no Softmax node" in record.notes
    assert _layers(record)["first"] == ("float", "--exclude")
    # Unnamed nodes match by the name the report gives them (OpType_index).
    unnamed = _mlp()
    for node in unnamed.graph:
        node.name = ""
    record = _quantize(unnamed, mode="int8", calib="random", exclude="MatMul_0")
    assert _layers(record)["MatMul_0"] == ("float", "kept in float (--exclude)")


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("int8", {"calib": "random"}),
        ("int8-dynamic", {}),
        ("int4-weight", {"target": "ort"}),
        ("fp16", {}),
        ("bf16", {}),
    ],
)
def test_every_mode_notes_its_kept_float_layers_with_the_reason(mode, options):
    """Only static int8 said why layers stayed float; the README promises it for all."""
    record = _quantize(_mlp(), mode=mode, exclude="second", **options)
    note = next(n for n in record.notes if n.startswith("kept in float: "))
    assert "MatMul: " in note and "--exclude" in note


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("int8", {"calib": "random"}),
        ("int8-dynamic", {}),
        ("int4-weight", {"target": "ort"}),
        ("fp16", {}),
        ("fp8", {"calib": "random"}),
    ],
)
def test_a_run_that_would_quantize_nothing_is_refused_in_one_line(mode, options):
    """Every layer excluded: the model would come back as given (exit 0 and "0 layers
    quantized" before)."""
    model = _mlp()
    if mode == "fp8":
        from graphopt.opset import raise_in_place

        raise_in_place(model, 19, "fp8")
    with pytest.raises(UserInputError, match="nothing to quantize") as caught:
        _quantize(model, mode=mode, exclude="MatMul", **options)
    assert "\n" not in str(caught.value) and "--exclude" in str(caught.value)


def test_the_fidelity_title_has_one_pair_of_parentheses():
    from rich.console import Console

    record = _quantize(_mlp(), target="ort", mode="int4-weight", calib="random")
    assert record.fidelity_source == "32 generated inputs (--calib random)"
    console = Console(width=200, record=True)
    record.render(console)
    text = console.export_text()
    assert "float original: 32 generated inputs (--calib random)" in text
    assert "))" not in text
