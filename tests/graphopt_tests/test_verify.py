"""Verification: error measures and dtypes ORT's Python API only takes as OrtValues."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

from graphopt.verify import SIGMOID_RESOLUTION, Verifier, compare
from graphopt_tests.helpers import make_model, tensor_info


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


def test_compare_counts_only_the_difference_beyond_the_resolution() -> None:
    ref = np.array([0.0, 2.0**-25], dtype=np.float32)
    quanta = np.array([3 * 2.0**-25, 0.0], dtype=np.float32)
    assert compare("y", ref, quanta).max_rel > 1e-2  # scale floor 1e-6: 9e-8 is 9% of it
    within = compare("y", ref, quanta, SIGMOID_RESOLUTION)
    assert within.max_rel == 0.0
    assert np.isclose(within.max_abs, 3 * 2.0**-25)  # the raw difference is still reported
    beyond = compare("y", ref, np.array([1e-6, 0.0], dtype=np.float32), SIGMOID_RESOLUTION)
    assert np.isclose(beyond.max_rel, (1e-6 - SIGMOID_RESOLUTION) / 1e-6, rtol=1e-4)


def _saturated(final: str, shift: float = 0.0):
    """y = final(x - 17) (+ shift): a map of ~1e-7..1e-6 on standard-normal inputs.

    Softplus(t) ~ Sigmoid(t) for t << 0, but it is not Sigmoid: no rounding allowance.
    """
    nodes = [helper.make_node("Add", ["x", "bias"], ["logit"])]
    out = "y" if not shift else "s"
    nodes.append(helper.make_node(final, ["logit"], [out]))
    initializers = {"bias": np.array([-17.0], dtype=np.float32)}
    if shift:
        nodes.append(helper.make_node("Add", ["s", "shift"], ["y"]))
        initializers["shift"] = np.array([shift], dtype=np.float32)
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [4, 64])],
        [tensor_info("y", TensorProto.FLOAT, [4, 64])],
        initializers,
    )


def test_sigmoid_outputs_allow_ort_sigmoid_rounding_only() -> None:
    verifier = Verifier(_saturated("Sigmoid"))
    assert verifier.resolutions == [SIGMOID_RESOLUTION]
    # A few quanta of ORT's sigmoid on a map whose max is ~1e-6: rounding, not a change.
    assert verifier.check(_saturated("Sigmoid", shift=2.0**-23)).ok
    moved = verifier.check(_saturated("Sigmoid", shift=2e-6))
    assert not moved.ok and "off by" in moved.reason
    # An output not produced by Sigmoid keeps the plain relative measure.
    softplus = Verifier(_saturated("Softplus"))
    assert softplus.resolutions == [0.0]
    assert not softplus.check(_saturated("Softplus", shift=2.0**-23)).ok
