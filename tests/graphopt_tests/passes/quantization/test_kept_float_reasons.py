"""What the report says a layer kept float for, and what a changed tensor became: the same
words in every mode, and an overridable initializer kept float in fp16/bf16 as in int8."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.errors import UserInputError
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.passes.quantization.record import QuantRecord
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _quantize(model: ir.Model, **options) -> QuantRecord:
    context = PassContext()
    QuantizePass(context, **options)(model)
    return context.details["quantize"]


def _reasons(record: QuantRecord) -> dict[str, str]:
    return {x.node: x.reason for x in record.layers if x.precision == "float"}


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _overridable_weight() -> ir.Model:
    """mm1 reads w, an initializer that is also a graph input (the caller may feed it)."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        [tensor_info("x", F, ["B", 32]), tensor_info("w", F, [32, 32])],
        [tensor_info("y", F, ["B", 16])],
        {"w": _w(32, 32), "w2": _w(32, 16, seed=1) * 0.01},
    )


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_a_layer_reading_an_overridable_initializer_stays_float_in_16_bits(mode):
    """README: such an initializer is never rounded or stored in 16 bits, its layer stays float
    with the reason. fp16/bf16 ran the layer on Cast(w): the caller's w rounded at run time."""
    model = _overridable_weight()
    record = _quantize(model, mode=mode)
    assert "caller may override" in _reasons(record)["mm1"]
    mm1 = next(node for node in model.graph if node.name == "mm1")
    assert mm1.inputs[1].name == "w" and mm1.inputs[1].dtype == ir.DataType.FLOAT
    assert not any(n.op_type == "Cast" and n.inputs[0].name == "w" for n in model.graph)


def _weight_first() -> ir.Model:
    return make_model(
        [helper.make_node("MatMul", ["W", "x"], ["y"], name="wx")],
        [tensor_info("x", F, [32, "B"])],
        [tensor_info("y", F, [16, "B"])],
        {"W": _w(16, 32)},
        opset=19,
    )


def _tied_embedding() -> ir.Model:
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Transpose", ["emb"], ["embT"], perm=[1, 0], name="tr"),
            helper.make_node("MatMul", ["h", "embT"], ["y"], name="lm_head"),
        ],
        [tensor_info("x", F, ["B", 32])],
        [tensor_info("y", F, ["B", 40])],
        {"w1": _w(32, 16), "emb": _w(40, 16, seed=1)},
        opset=19,
    )


@pytest.mark.parametrize("mode", ["int8-dynamic", "fp8"])
def test_a_constant_first_input_is_said_as_int8_says_it(mode):
    options = {"calib": "random"} if mode == "fp8" else {}
    with pytest.raises(UserInputError, match="MatMul with a constant first input"):
        _quantize(_weight_first(), mode=mode, **options)
    with pytest.raises(UserInputError, match="MatMul with a constant first input"):
        _quantize(_weight_first(), mode="int8", calib="random")


@pytest.mark.parametrize("mode", ["int8-dynamic", "fp8"])
def test_a_weight_computed_from_a_constant_is_not_called_an_activation(mode):
    options = {"calib": "random"} if mode == "fp8" else {}
    record = _quantize(_tied_embedding(), mode=mode, **options)
    reason = _reasons(record)["lm_head"]
    assert reason == "weight embT is computed at run time (Transpose of emb), not a stored constant"


def test_a_weight_whose_float_copy_stays_says_so():
    """w feeds the quantized MatMul and a float Add: the file holds both, and the list of
    changed tensors said only ``w float->int8``."""
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
            helper.make_node("Add", ["a", "w"], ["y"], name="add"),
        ],
        [tensor_info("x", F, [32, 32])],
        [tensor_info("y", F, [32, 32])],
        {"w": _w(32, 32)},
    )
    for options in ({"mode": "int8", "calib": "random"}, {"mode": "int8-dynamic"}):
        record = _quantize(_copy(model), **options)
        changes = {c.tensor: c.after for c in record.type_changes}
        assert changes["w"] == "int8 (the float one stays too: read by add)"


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))
