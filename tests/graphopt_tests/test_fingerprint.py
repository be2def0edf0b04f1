"""Model fingerprints: equal exactly when nothing a pass can see has changed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt.fingerprint import fingerprint
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def small_model() -> ir.Model:
    return make_model(
        [
            helper.make_node("Add", ["x", "b"], ["s"]),
            helper.make_node("Transpose", ["s"], ["y"], perm=[1, 0]),
        ],
        [tensor_info("x", F, [2, 3])],
        [tensor_info("y", F, [3, 2])],
        {"b": np.ones((2, 3), np.float32)},
    )


def test_unchanged_model_keeps_its_fingerprint() -> None:
    model = small_model()
    assert fingerprint(model) == fingerprint(model)
    assert fingerprint(model).op_types == frozenset({"Add", "Transpose"})


def test_a_clone_is_another_state() -> None:
    # Objects are compared by identity: a clone is equal in content but not the same model.
    model = small_model()
    assert fingerprint(model) != fingerprint(model.clone())


def test_every_kind_of_edit_changes_it() -> None:
    def changed(edit) -> bool:
        model = small_model()
        before = fingerprint(model)
        edit(model)
        return fingerprint(model) != before

    add = lambda m: m.graph.node(0)  # noqa: E731
    assert changed(lambda m: setattr(add(m), "name", "renamed"))
    assert changed(lambda m: setattr(add(m).outputs[0], "name", "s2"))
    assert changed(lambda m: setattr(add(m).outputs[0], "shape", ir.Shape([2, 3])))
    assert changed(lambda m: setattr(add(m).outputs[0], "dtype", ir.DataType.FLOAT))
    assert changed(lambda m: setattr(add(m), "op_type", "Sub"))
    assert changed(
        lambda m: m.graph.node(1).attributes.__setitem__("perm", ir.AttrInt64s("perm", [0, 1]))
    )
    assert changed(lambda m: add(m).replace_input_with(1, m.graph.inputs[0]))
    assert changed(
        lambda m: setattr(m.graph.initializers["b"], "const_value", ir.tensor(np.zeros((2, 3))))
    )
    assert changed(lambda m: m.graph.append(ir.node("Neg", [m.graph.inputs[0]])))
    assert changed(lambda m: m.graph.remove(m.graph.node(1), safe=False))
    assert changed(lambda m: m.graph.opset_imports.__setitem__("", 18))
    assert changed(lambda m: setattr(m, "ir_version", 9))


def test_shape_edited_in_place_is_seen() -> None:
    model = small_model()
    value = model.graph.node(0).outputs[0]
    value.shape = ir.Shape([2, "n"])
    before = fingerprint(model)
    value.shape[1] = 3  # Shape objects are mutable: the fingerprint holds a copy of the dims
    assert fingerprint(model) != before
