"""Calibration samples: where an ``.npz`` holds its samples, for inputs declared every way
exporters declare them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.errors import UserInputError
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


def _two_inputs_sharing_sequence() -> object:
    ids = helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "sequence"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])
    return make_model([helper.make_node("Mul", ["ids", "mask"], ["y"])], [ids, mask], [y])


def test_an_array_that_is_no_model_input_is_refused(tmp_path):
    # A misspelled extra name (beside the right one) or a labels array went unread, exit 0;
    # --verify-inputs refused the same file.
    path = tmp_path / "calib.npz"
    x = np.zeros((5, 3, 8, 8), np.float32)
    np.savez(path, x=x, inptu=x, labels=np.zeros(5, np.int64))
    with pytest.raises(UserInputError, match=r"array\(s\) inptu, labels are not model inputs"):
        load_calibration(str(path), _conv_with_first_dim("N"))


def test_arrays_disagreeing_on_a_named_dim_are_refused(tmp_path):
    # ids 16 long, mask 8: no run takes both; pruning's analysis read "shapes unknown".
    path = tmp_path / "calib.npz"
    np.savez(path, ids=np.ones((4, 16), np.float32), mask=np.ones((4, 8), np.float32))
    with pytest.raises(UserInputError, match="dim 'sequence' is 16 in input 'ids' but 8"):
        load_calibration(str(path), _two_inputs_sharing_sequence())
    np.savez(path, ids=np.ones((4, 16), np.float32), mask=np.ones((4, 16), np.float32))
    assert load_calibration(str(path), _two_inputs_sharing_sequence()).count == 4


def test_arrays_contradicting_a_fixed_dim_are_refused(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((5, 2, 8, 8), np.float32))  # the Conv takes 3 channels
    with pytest.raises(UserInputError, match="has size 2 on axis 1; the model fixes it at 3"):
        load_calibration(str(path), _conv_with_first_dim("N"))


def test_anonymous_dims_of_different_sizes_are_not_one_dim(tmp_path):
    # paddle2onnx writes unknown dims as "?": PP-OCR's images are 48 high, 192 wide.
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((2, 3, 48, 192), np.float32))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "?"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", 3, "?", "?"])
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    assert load_calibration(str(path), model).count == 2


def test_samples_with_nothing_to_measure_are_refused(tmp_path):
    # Sequences of length 0 or all-0 masks: ranges fell back to defaults and the fidelity,
    # measured on no position, read as perfect (cosine 1, error 0) while real text lost 0.29.
    path = tmp_path / "calib.npz"
    model = _two_inputs_sharing_sequence()
    np.savez(path, ids=np.ones((4, 0), np.float32), mask=np.ones((4, 0), np.float32))
    with pytest.raises(UserInputError, match=r"every input is empty \(ids 4x0, mask 4x0\)"):
        load_calibration(str(path), model)
    mask = np.ones((4, 6), np.float32)
    mask[1:3] = 0
    np.savez(path, ids=np.ones((4, 6), np.float32), mask=mask)
    with pytest.raises(UserInputError, match="2 of 4 samples have 'mask' all 0"):
        load_calibration(str(path), model)
    mask[1:3, 0] = 1  # padded, but each sample has a position
    np.savez(path, ids=np.ones((4, 6), np.float32), mask=mask)
    assert load_calibration(str(path), model).count == 4


def _embedding_model() -> ir.Model:
    """ids[batch, seq] and one id per sample, cls[batch], both index a 300-row embedding."""
    rng = np.random.default_rng(0)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    cls = helper.make_tensor_value_info("cls", TensorProto.INT64, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["y"]),
        helper.make_node("Gather", ["emb", "cls"], ["z"]),
    ]
    table = rng.standard_normal((300, 4)).astype(np.float32)
    return make_model(nodes, [ids, cls], [y, z], {"emb": table})


def test_random_calibration_ids_span_the_embedding():
    """``--calib random`` reads the whole vocabulary, not rows 0-9: token ids from [0, 300),
    per-sample ids from [1, 300) (counted from 1, as integers per sample are)."""
    from graphopt.passes.calibration.samples import random_calibration

    calib = random_calibration(_embedding_model(), {})
    ids, cls = calib.arrays["ids"], calib.arrays["cls"]
    assert ids.min() >= 0 and 250 <= ids.max() < 300
    assert cls.min() >= 1 and 200 <= cls.max() < 300


def _decoder_step(seq: str | int = "seq") -> ir.Model:
    """ids [batch, seq] embedded and projected: a decoder's shape in small."""
    rng = np.random.default_rng(0)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, 4])
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    weights = {
        "emb": rng.standard_normal((50, 8)).astype(np.float32),
        "w": rng.standard_normal((8, 4)).astype(np.float32),
    }
    return make_model(nodes, [ids], [y], weights)


def test_random_calibration_says_it_covers_one_size_of_each_symbolic_dim():
    """A decoder bound to its decode step (``--input-shape input_ids:1x1``) was calibrated
    and its fidelity reported at sequence 1 alone, silently; its prefill came out 15-20x
    worse. The report now says which sizes the samples hold (the batch left out)."""
    from graphopt.passes.calibration.samples import random_calibration

    calib = random_calibration(_decoder_step(), {"input_ids": (1, 1)})
    assert calib.arrays["input_ids"].shape[1] == 1
    assert calib.note.startswith("--calib random: fitted and measured at seq=1 only")
    assert "batch=" not in calib.note
    # Nothing to say where the batch is the only symbolic dim.
    assert random_calibration(_decoder_step(seq=6), {}).note == ""
