"""Calibration samples: where an ``.npz`` holds its samples, for inputs declared every way
exporters declare them."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from graphopt.passes.calibration.samples import load_calibration, sample_axes
from graphopt_tests.helpers import make_model


def _conv_with_first_dim(first) -> object:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [first, 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "oh", "ow"])
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    return make_model(nodes, [x], [y], {"w": weight})


def test_a_first_dim_written_as_minus_one_is_the_batch(tmp_path):
    # Paddle2ONNX writes a dynamic dim as dim_value -1 (PP-OCR's classifier: [-1, 3, ?, ?]);
    # ONNX Runtime reads it as dynamic. Samples stacked along it were refused as a layout
    # that does not match "[N, -1, 3, ?, ?]".
    model = _conv_with_first_dim(-1)
    assert sample_axes(model) == {"x": 0}
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((5, 3, 8, 8), np.float32))
    calib = load_calibration(str(path), model)
    assert calib.count == 5


def test_a_fixed_first_dim_other_than_one_is_not_the_batch():
    assert sample_axes(_conv_with_first_dim(2)) == {"x": None}
    assert sample_axes(_conv_with_first_dim("N")) == {"x": 0}
