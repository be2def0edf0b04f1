"""Verification: error measures and dtypes ORT's Python API only takes as OrtValues."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

from graphopt.verify import Verifier, compare
from tests.helpers import make_model, tensor_info


def test_compare_measures_relative_to_largest_magnitude() -> None:
    ref = np.array([10.0, -20.0, 5.0], dtype=np.float32)
    got = np.array([10.0, -20.0, 5.2], dtype=np.float32)
    err = compare("y", ref, got)
    assert np.isclose(err.max_abs, 0.2, atol=1e-6)
    assert np.isclose(err.max_rel, 0.2 / 20.0, atol=1e-7)
    assert 0.999 < err.cosine <= 1.0


def test_compare_flags_shape_changes_and_nan_mismatch() -> None:
    assert not compare("y", np.zeros((2, 3)), np.zeros((3, 2))).shape_ok
    nan_ref = np.array([np.nan, 1.0])
    assert compare("y", nan_ref, np.array([np.nan, 1.0])).max_rel == 0.0
    assert compare("y", nan_ref, np.array([0.0, 1.0])).detail == "non-finite values differ"


def test_bfloat16_model_is_verified_not_skipped() -> None:
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [tensor_info("x", TensorProto.BFLOAT16, [2, 3])],
        [tensor_info("y", TensorProto.FLOAT, [2, 3])],
    )
    verifier = Verifier(model)
    assert verifier.feeds["x"].dtype == ml_dtypes.bfloat16
    assert verifier.check(model).ok
    broken = make_model(
        [
            helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
            helper.make_node("Neg", ["c"], ["y"]),
        ],
        [tensor_info("x", TensorProto.BFLOAT16, [2, 3])],
        [tensor_info("y", TensorProto.FLOAT, [2, 3])],
    )
    assert not verifier.check(broken).ok
