"""Shape inference at bound input shapes, on a clone."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.analysis.shapes import bind_input_shapes, infer_shapes, shape_text, static_shape
from graphopt.errors import UserInputError
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _model():
    return make_model(
        [
            helper.make_node("MatMul", ["tokens", "w"], ["h"]),
            helper.make_node("Relu", ["image"], ["r"]),
        ],
        [
            tensor_info("tokens", F, ["batch", "seq", 8]),
            tensor_info("image", F, ["n", 3, "h", "w"]),
        ],
        [tensor_info("h", F, ["batch", "seq", 4]), tensor_info("r", F, ["n", 3, "h", "w"])],
        {"w": np.ones((8, 4), np.float32)},
    )


def test_defaults_match_generated_inputs() -> None:
    # Batch 1; other symbolic dims 32 for rank-4 inputs, 16 otherwise (graphopt.inputs).
    assert bind_input_shapes(_model()) == {"tokens": (1, 16, 8), "image": (1, 3, 32, 32)}


def test_inferred_clone_and_untouched_original() -> None:
    model = _model()
    inferred, bound = infer_shapes(model, {"tokens": (2, 5, 8)})
    assert bound["tokens"] == (2, 5, 8)
    values = {n.outputs[0].name: n.outputs[0] for n in inferred.graph}
    assert static_shape(values["h"]) == (2, 5, 4)
    assert static_shape(values["r"]) == (1, 3, 32, 32)
    assert shape_text(model.graph.outputs[0].shape) == ["batch", "seq", 4]
    assert static_shape(model.graph.outputs[0]) is None
    # Tensors are shared, not copied.
    assert inferred.graph.initializers["w"].const_value is model.graph.initializers["w"].const_value


def test_bad_bindings() -> None:
    with pytest.raises(UserInputError, match="unknown input"):
        bind_input_shapes(_model(), {"nope": (1,)})
    with pytest.raises(UserInputError, match="rank 2 does not match"):
        bind_input_shapes(_model(), {"tokens": (1, 2)})


def test_input_without_shape_is_left_unbound() -> None:
    model = _model()
    model.graph.inputs[0].shape = None
    assert "tokens" not in bind_input_shapes(model)
    assert bind_input_shapes(model, {"tokens": (1, 2, 8)})["tokens"] == (1, 2, 8)
