"""Fidelity measures: argmax agreement on the class axis; samples the model cannot take."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.errors import UserInputError
from graphopt.passes.calibration.fidelity import measure, outputs_on
from graphopt.passes.calibration.samples import CalibrationSet


def _agreement(ref: np.ndarray, got: np.ndarray) -> float | None:
    return measure(["y"], [ref], [got])[0].argmax_agreement


def test_argmax_agreement_on_the_last_axis():
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)
    got = ref.copy()
    got[0] = [0.9, 0.1]  # one of four rows flips
    assert _agreement(ref, got) == 0.75


def test_trailing_singleton_axes_are_not_the_class_axis():
    """[N, classes, 1, 1] (a classifier ending in a 1x1 Conv, as SqueezeNet does): the
    agreement is over the classes, not over an axis of one."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 10, 1, 1)).astype(np.float32)
    got = ref.copy()
    got[:2, :, 0, 0] = -got[:2, :, 0, 0]  # argmax of the negation differs
    assert _agreement(ref, got) == 0.75


def test_an_output_without_classes_has_no_agreement():
    ref = np.ones((4, 1), np.float32)
    assert _agreement(ref, ref) is None
    assert _agreement(np.ones(4, np.float32), np.ones(4, np.float32)) is None


def test_samples_the_model_cannot_take_are_a_one_line_user_error():
    """The load checks catch most mismatches; whatever reaches ORT as InvalidArgument (here
    a set built by hand, as the API allows) names the calibration data, in one line."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    wrong = CalibrationSet({"x": np.ones((2, 3), np.float32)}, "calib.npz")
    with pytest.raises(UserInputError, match=r"calibration data \(calib\.npz\) does not run") as e:
        outputs_on(model, wrong)
    assert "\n" not in str(e.value)
    right = CalibrationSet({"x": -np.ones((2, 4), np.float32)}, "calib.npz")
    np.testing.assert_array_equal(outputs_on(model, right)[0], np.zeros((2, 4), np.float32))


def test_a_reference_run_failing_on_the_samples_is_theirs_a_candidates_is_not():
    """ORT fails at run time on data a node cannot take (TopK's k past the axis): on the
    original that is the samples' fault, one line (was exit 3); on a rewritten model it
    stays an error of the rewrite."""
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, "k"]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [1, "k"]),
        ],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    samples = CalibrationSet(
        {"x": np.ones((2, 4), np.float32), "k": np.array([2, 8], np.int64)}, "random"
    )
    with pytest.raises(UserInputError, match=r"give real data with --calib FILE\.npz") as e:
        outputs_on(model, samples, reference=True)
    assert "\n" not in str(e.value)
    with pytest.raises(Exception, match="TopK") as e:
        outputs_on(model, samples)
    assert not isinstance(e.value, UserInputError)
