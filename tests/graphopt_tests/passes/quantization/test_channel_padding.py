"""Stem Convs padded to 4k input channels for ORT's direct int8 conv: exact, only where MLAS's
conditions hold and the Conv reads a graph input, ``--target ort`` only, not for layers kept
in float, and invisible to the quantization (same ranges, same int8 codes). The stems here have
symbolic height and width, so SpaceToDepth folding (which takes static, even ones first) leaves
them to the padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.passes.quantization import channel_padding
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import assert_same_outputs, op_types, random_calib, run_pass
from graphopt_tests.passes.quantization import stem_graphs


def stem(c_in: int = 3, c_out: int = 16, group: int = 1) -> ir.Model:
    """x [N, c_in, H, W] -> Conv 3x3 stride 2 (the stem) -> Relu -> Conv 1x1 -> y; symbolic
    height and width."""
    return stem_graphs.stem(size=("H", "W"), c_in=c_in, c_out=c_out, group=group)


def _feeds(c_in: int = 3, batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(5).standard_normal((batch, c_in, 12, 12), np.float32)}


def test_padding_is_exact_and_only_on_the_stem() -> None:
    model = stem()
    before = model.clone()
    padded = channel_padding.pad_stem_channels(model)
    assert [(p.node.name, p.channels) for p in padded] == [("stem", (3, 4))]
    conv = next(n for n in model.graph if n.name == "stem")
    assert conv.inputs[0].producer().op_type == "Pad"
    assert conv.inputs[1].const_value.numpy().shape == (16, 4, 3, 3)
    assert not conv.inputs[1].const_value.numpy()[:, 3].any()
    for batch in (1, 3):  # N is symbolic
        assert_same_outputs(before, model, _feeds(batch=batch), tolerance=0.0)
    assert "stem (3 -> 4)" in channel_padding.note(padded)


@pytest.mark.parametrize(
    ("c_in", "c_out", "group"),
    [(4, 16, 1), (3, 8, 1), (3, 18, 1), (6, 16, 2)],
    ids=["aligned already", "too few outputs", "outputs not 4k", "grouped"],
)
def test_convs_outside_the_kernel_conditions_are_left_alone(c_in, c_out, group) -> None:
    model = stem(c_in, c_out, group)
    assert channel_padding.pad_stem_channels(model) == []
    assert "Pad" not in op_types(model)


def _calib(tmp_path: Path) -> str:
    return random_calib(tmp_path, (16, 3, 12, 12))


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_static_int8_pads_the_stem_for_ort_only(tmp_path, target) -> None:
    context = PassContext(target=target)
    quantized, _ = run_pass(stem(), QuantizePass, context, mode="int8", calib=_calib(tmp_path))
    record = context.details["quantize"]
    padded = any("zero-padded" in note for note in record.notes)
    assert padded == (target == "ort")
    assert ("Pad" in op_types(quantized)) == (target == "ort")
    # Quantized either way, and the padding costs no fidelity (the padded channel is zero).
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(op_types(quantized))
    cosines = [f.mean_cosine for rows in record.fidelity.values() for f in rows]
    assert cosines and min(cosines) > 0.99


def test_a_stem_kept_in_float_is_not_padded(tmp_path) -> None:
    context = PassContext(target="ort")
    quantized, _ = run_pass(
        stem(), QuantizePass, context, mode="int8", calib=_calib(tmp_path), exclude="stem"
    )
    assert "Pad" not in op_types(quantized)
    assert not any("zero-padded" in note for note in context.details["quantize"].notes)


def test_the_quantized_model_is_the_same_with_and_without_padding(tmp_path, monkeypatch) -> None:
    feeds = _feeds(batch=4)
    outputs = {}
    for pad in (True, False):
        if not pad:
            monkeypatch.setattr(channel_padding, "pad_stem_channels", lambda model, keep: [])
        context = PassContext(target="ort")
        quantized, _ = run_pass(stem(), QuantizePass, context, mode="int8", calib=_calib(tmp_path))
        assert ("Pad" in op_types(quantized)) == pad
        outputs[pad] = quantized
    # The zero channel changes neither the input's range nor the weights' int8 codes.
    assert_same_outputs(outputs[False], outputs[True], feeds, tolerance=0.0)
