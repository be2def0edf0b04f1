"""--target ort fusions write only nodes the model's opset defines (ort/_opset.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import api, io
from graphopt.passes.fusion.ort._opset import legalize
from graphopt.verify import run_model
from graphopt_tests.helpers import make_model, tensor_info

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
HIDDEN, HEADS = 8, 2


def keras_attention(opset: int):
    """tf2onnx/keras multi-head self-attention with a (1 - mask) * -10000 additive mask."""
    rng = np.random.default_rng(0)
    inits = {
        "scale": np.array(0.5, np.float32),
        "one": np.array(1.0, np.float32),
        "fill": np.array(-10000.0, np.float32),
        "split": np.array([0, 0, HEADS, HIDDEN // HEADS], np.int64),
        "merge": np.array([0, 0, HIDDEN], np.int64),
        "ax12": np.array([1, 2], np.int64),
    }
    nodes = []
    for p in "qkv":
        inits[f"w{p}"] = (rng.standard_normal((HIDDEN, HIDDEN)) * 0.4).astype(np.float32)
        inits[f"b{p}"] = rng.standard_normal(HIDDEN).astype(np.float32)
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}m"]),
            helper.make_node("Add", [f"{p}m", f"b{p}"], [f"{p}a"]),
            helper.make_node("Reshape", [f"{p}a", "split"], [f"{p}r"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["qr"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["vr"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Unsqueeze", ["mask", "ax12"], ["m4"]),
        helper.make_node("Cast", ["m4"], ["mf"], to=FLOAT),
        helper.make_node("Sub", ["one", "mf"], ["inv"]),
        helper.make_node("Mul", ["inv", "fill"], ["bias"]),
        helper.make_node("Add", ["scaled", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vt"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge"], ["y"]),
    ]
    inputs = [tensor_info("x", FLOAT, ["B", "S", HIDDEN]), tensor_info("mask", INT64, ["B", "S"])]
    return make_model(nodes, inputs, [tensor_info("y", FLOAT, ["B", "S", HIDDEN])], inits, opset)


@pytest.mark.parametrize("opset", [13, 14, 15])
def test_keras_attention_fuses_at_every_opset(opset):
    # The MHA rule builds its mask's shape with Shape(start, end), opset 15's: ORT refused
    # the opset-13 result (tf2onnx's default) and the fusion was rolled back every time.
    model = keras_attention(opset)
    result = api.optimize(model, None, api.OptimizeOptions(target="ort"))
    assert result.report.verification is not None and result.report.verification.ok
    assert not result.report.rolled_back
    fused = result.model
    ops = [(n.domain, n.op_type) for n in fused.graph]
    assert ("com.microsoft", "Attention") in ops and ("", "Softmax") not in ops
    # The mask became mask_index (its Shape → Slice spelling audited like Shape(start, end)).
    assert ("", "Expand") not in ops
    proto = io.to_proto(fused)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == opset
    rng = np.random.default_rng(1)
    for batch, length in ((1, 16), (3, 7)):
        mask = rng.integers(0, 2, (batch, length))
        mask[:, 0] = 1
        feeds = {"x": rng.standard_normal((batch, length, HIDDEN)).astype(np.float32)}
        feeds["mask"] = mask
        expected, got = run_model(model, feeds)[0], run_model(fused, feeds)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _graph(nodes, inputs, outputs, inits=None, opset=18, lowered=None) -> ir.Model:
    """A model checked at ``opset`` (written in its forms), then marked ``lowered``: what a
    fusion's newest-form nodes look like inside an older model."""
    model = make_model(nodes, inputs, outputs, inits or {}, opset)
    if lowered is not None:
        model.opset_imports[""] = lowered
    return model


@pytest.mark.parametrize(("start", "end"), [(1, 2), (-2, None), (0, 99), (-9, -1)])
def test_shape_bounds_become_a_slice_below_opset_15(start, end):
    bounds = {"start": start} | ({"end": end} if end is not None else {})
    node = helper.make_node("Shape", ["x"], ["y"], **bounds)
    reference = _graph(
        [node], [tensor_info("x", FLOAT, ["a", 3, 4])], [tensor_info("y", INT64, [None])], opset=15
    )
    model = reference.clone()
    model.opset_imports[""] = 13  # what a fusion leaves in an opset-13 model
    assert legalize(model)
    assert [n.op_type for n in model.graph] == ["Shape", "Slice"]
    onnx.checker.check_model(io.to_proto(model), full_check=True)
    feeds = {"x": np.zeros((5, 3, 4), np.float32)}
    np.testing.assert_array_equal(run_model(model, feeds)[0], run_model(reference, feeds)[0])


def test_axes_inputs_become_attributes_where_the_opset_wants_them():
    inits = {"ax": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
        helper.make_node("ReduceMean", ["u", "ax"], ["y"], keepdims=0),
    ]
    model = _graph(
        nodes,
        [tensor_info("x", FLOAT, [2, 3])],
        [tensor_info("y", FLOAT, [2, 3])],
        inits,
        lowered=11,
    )
    assert legalize(model)
    assert [list(n.attributes["axes"].value) for n in model.graph] == [[1], [1]]
    assert all(len(n.inputs) == 1 for n in model.graph)
    onnx.checker.check_model(io.to_proto(model), full_check=True)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_model(model, {"x": x})[0], x)


def test_forms_without_an_older_spelling_are_refused():
    # Run-time axes have no attribute form.
    runtime = _graph(
        [helper.make_node("Unsqueeze", ["x", "ax"], ["y"])],
        [tensor_info("x", FLOAT, [2]), tensor_info("ax", INT64, [1])],
        [tensor_info("y", FLOAT, [1, 2])],
        lowered=11,
    )
    assert not legalize(runtime)
    # Split's num_outputs (opset 18) may leave a shorter last chunk: no older spelling.
    split = _graph(
        [helper.make_node("Split", ["x"], ["a", "b"], axis=0, num_outputs=2)],
        [tensor_info("x", FLOAT, [4])],
        [tensor_info("a", FLOAT, [2]), tensor_info("b", FLOAT, [2])],
        lowered=13,
    )
    assert not legalize(split)
    # An attribute the op does not have (a rule's typo) is refused, not kept.
    typo = _graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        [tensor_info("x", FLOAT, [4])],
        [tensor_info("y", FLOAT, [4])],
    )
    node = next(iter(typo.graph))
    node.attributes["axis"] = ir.AttrInt64("axis", 0)
    assert not legalize(typo)
