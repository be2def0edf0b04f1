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


def _padded_model() -> ir.Model:
    """logits[b, s, :] = x[b, s, :] @ W; the mask input is only there to mark padding."""
    w = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], w.astype(np.float32).ravel())],
    )
    return ir.serde.deserialize_model(helper.make_model(graph))


def test_padded_positions_are_left_out_of_mean_error_and_argmax_agreement():
    """Before, padded positions were zeroed in both outputs and then averaged with the real
    ones: each added an error of 0 and an argmax that "agreed", so a mostly padded batch
    reported near-perfect agreement (txt.onnx: 92.7% where its real tokens give 76.9%).
    Mean abs error and argmax agreement are now over the real tokens alone; the measures are
    taken on a small padded-sequence model's outputs, as a pass measures them."""
    from graphopt.passes.calibration.fidelity import padding_mask

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 4)).astype(np.float32)
    mask = np.zeros((2, 8), np.int64)
    mask[0, :3] = 1  # 3 + 2 real tokens, 11 padded positions
    mask[1, :2] = 1
    calib = CalibrationSet({"x": x, "attention_mask": mask}, "calib.npz")
    ref = outputs_on(_padded_model(), calib)[0]
    got = ref.copy()
    got[0, 0] = -got[0, 0]  # one real token moves (and flips its argmax) ...
    got[1, 5] += 100.0  # ... and one padded position moves a lot, which must not count
    keep = mask != 0
    (fid,) = measure(["logits"], [ref], [got], padding_mask(calib))
    want = np.abs(ref - got)[keep].mean()
    assert fid.mean_abs == pytest.approx(want)
    assert fid.argmax_agreement == pytest.approx(4 / 5)  # 4 of 5 real tokens agree
    # Max rel only ever saw the real tokens (a zeroed position adds nothing): unchanged.
    assert fid.max_rel == pytest.approx(np.abs(ref - got)[keep].max() / np.abs(ref[keep]).max())


def test_a_mask_with_no_real_tokens_measures_every_position():
    ref = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    (fid,) = measure(["y"], [ref], [ref + 1], np.zeros((1, 4), np.int64))
    assert fid.mean_abs == 0.0 and fid.argmax_agreement == 1.0


def test_summary_gives_the_numbers_of_one_output_and_names_it():
    """Before, a two-output summary printed the worst-cosine output's cosine and mean abs
    beside the largest max rel of any output (a decompose headline whose mean abs was aux's
    and max rel logits's). Every number is now the worst output's, named; a larger max rel
    elsewhere is named with its output."""
    from graphopt.passes.calibration.fidelity import Fidelity, summary

    logits = Fidelity("logits", max_rel=0.292, mean_abs=0.05, mean_cosine=0.99)
    aux = Fidelity("aux", max_rel=0.01, mean_abs=0.000221, mean_cosine=0.9599)
    assert summary([logits, aux]) == (
        "aux: cosine 0.9599, max rel 0.01, mean abs 0.000221 (logits: max rel 0.292)"
    )
    assert summary([aux]) == "cosine 0.9599, max rel 0.01, mean abs 0.000221"


def test_integer_outputs_get_real_measures_and_their_share_of_equal_values():
    """An ArgMax output with one id of four moved used to read "max rel 1, mean abs 0,
    cosine 0" (verification's pass/fail flag). Its values are measured as numbers now, as
    ``graphopt compare`` measures them: max|a-b|/max|a|, the mean of |a-b|, and the share of
    equal elements, which is what an integer output is judged by."""
    ref = np.array([[1], [2], [3], [4]], np.int64)
    got = np.array([[1], [2], [3], [9]], np.int64)
    (fid,) = measure(["am"], [ref], [got])
    assert fid.max_rel == pytest.approx(5 / 4)
    assert fid.mean_abs == pytest.approx(5 / 4)
    assert fid.equal_share == pytest.approx(0.75)
    assert fid.argmax_agreement is None  # an argmax over ids means nothing
    assert fid.to_json()["equal_share"] == pytest.approx(0.75)
    (same,) = measure(["am"], [ref], [ref.copy()])
    assert (same.max_rel, same.mean_abs, same.mean_cosine, same.equal_share) == (0, 0, 1, 1)
    (flags,) = measure(["b"], [np.array([True, False])], [np.array([True, True])])
    assert flags.equal_share == 0.5 and flags.max_rel == 1.0 and flags.mean_abs == 0.5
    (words,) = measure(["s"], [np.array(["a", "b"])], [np.array(["a", "c"])])
    assert words.equal_share == 0.5 and words.mean_cosine == 0.0


def test_a_row_zero_on_one_side_only_has_a_cosine_of_zero():
    """Class id 3 turned to 0 (or a float row collapsed to zeros) used to count as a cosine
    of 1: a zero row has no direction, and one that is zero on one side only moved."""
    ref = np.array([[3], [0], [2]], np.int64)
    got = np.array([[0], [0], [2]], np.int64)
    assert measure(["am"], [ref], [got])[0].mean_cosine == pytest.approx(2 / 3)
    rows = np.array([[1.0, 2.0], [0.0, 0.0]], np.float32)
    assert measure(["y"], [rows], [np.zeros_like(rows)])[0].mean_cosine == 0.5


def test_integer_outputs_show_their_equal_share_not_a_cosine():
    """In the table an integer output's agreement column gives its share of equal values
    and its cosine column no number; the one-line summary names it beside the float one."""
    from rich.console import Console

    from graphopt.passes.calibration.fidelity import fidelity_table, summary

    logits = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    ids = np.array([1, 0], np.int64)
    fids = measure(["y", "am"], [logits, ids], [logits * 1.01, np.array([1, 1], np.int64)])
    console = Console(width=200, record=True)
    console.print(fidelity_table("t", {"generated": fids}))
    row = next(line for line in console.export_text().splitlines() if line.startswith(" am"))
    assert "50.0% equal" in row and "1.0000" not in row and "0.0000" not in row
    assert summary(fids).startswith("y: cosine 1.0000")
    assert summary(fids).endswith("; am: 50.0% equal")
    assert summary(fids[1:]) == "50.0% equal, max rel 1, mean abs 0.5"


def _vector_model(batch: bool) -> ir.Model:
    """x [32] -> y [16] (no batch axis: a single-sample export), or [B, 32] -> [B, 16]."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((32, 16)) * 0.3).astype(np.float32)
    lead = ["B"] if batch else []
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, 16])],
        [helper.make_tensor("w", TensorProto.FLOAT, [32, 16], w.ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.serde.deserialize_model(model)


def test_outputs_without_a_batch_axis_are_one_sample_per_run():
    """x [32] -> y [16], fed one sample a run: each run's y is one sample of the cosine.
    Laid end to end, each element was a "sample" and the mean cosine the share of elements
    of the same sign (0.9961 where every sample's cosine is 0.99996), so --min-cosine
    refused models that met it."""
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((12, 32)).astype(np.float32)
    calib = CalibrationSet({"x": xs}, "random", axes={"x": None})
    ref = outputs_on(_vector_model(batch=False), calib, optimize=False)[0]
    assert ref.shape == (12, 16)
    got = ref + 0.01 * rng.standard_normal(ref.shape) * np.abs(ref).max()
    got[got * ref < 0] *= -1  # close in direction, yet elements near 0 change sign
    got[0, 0] = -ref[0, 0] or 1.0
    got = got.astype(np.float32)
    (fidelity,) = measure(["y"], [ref], [got])
    a, b = ref.astype(np.float64), got.astype(np.float64)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert fidelity.mean_cosine == pytest.approx(cos.mean())
    # The same samples batched along a batch axis measure the same.
    batched = CalibrationSet({"x": xs}, "random", batch=8)
    again = outputs_on(_vector_model(batch=True), batched, optimize=False)[0]
    np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-6)
    assert measure(["y"], [again], [got])[0].mean_cosine == pytest.approx(cos.mean(), abs=1e-6)


def test_joined_keeps_batch_axes_and_stacks_outputs_without_one():
    from graphopt.passes.calibration.fidelity import _joined

    # Batch-first outputs (the last run smaller, or not) are laid end to end as before.
    pieces = [np.ones((8, 4)), np.ones((8, 4)), np.ones((3, 4))]
    assert _joined(pieces, [8, 8, 3]).shape == (19, 4)
    assert _joined(pieces[:2], [8, 8]).shape == (16, 4)
    assert _joined([np.ones((1, 4))] * 3, [1, 1, 1]).shape == (3, 4)
    # A [2, B, H] state: along its batch axis, as before.
    assert _joined([np.ones((2, 8, 4))] * 2, [8, 8]).shape == (4, 8, 4)
    # No batch axis: a [16] vector per run of one sample, a [16] reduction over a batch of 8,
    # a [16, 1] column per sample, a scalar per run: one row per run.
    assert _joined([np.ones(16)] * 3, [1, 1, 1]).shape == (3, 16)
    assert _joined([np.ones(16)] * 2, [8, 8]).shape == (2, 16)
    assert _joined([np.ones((16, 1))] * 3, [1, 1, 1]).shape == (3, 16, 1)
    assert _joined([np.ones(())] * 3, [1, 1, 1]).shape == (3,)
