"""Stride-2 stem Convs folded by SpaceToDepth for ORT's direct int8 conv: exact for every kernel
size and padding (checked in ORT against the unfolded Conv), only where the conditions hold
(static even height and width, few input channels, stride 2, one group), ``--target ort`` only,
not for a stem kept in float, and invisible to the quantization: the int8 model's outputs are
bit-identical with and without folding as ORT deploys it (integer kernels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.ortrun import run_session
from graphopt.passes.quantization import stem_space_to_depth
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt.sessions import make_session
from graphopt_tests.helpers import assert_same_outputs, op_types, random_calib, run_pass
from graphopt_tests.passes.quantization.stem_graphs import stem


def _feeds(size=(12, 12), c_in: int = 3, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"x": rng.standard_normal((batch, c_in, *size), np.float32)}


@pytest.mark.parametrize(
    ("kernel", "pads", "size"),
    [
        ((7, 7), (3, 3, 3, 3), (16, 16)),  # ResNet's stem
        ((3, 3), (1, 1, 1, 1), (12, 12)),  # MobileNet's / EfficientNet's
        ((3, 3), (0, 0, 0, 0), (12, 10)),
        ((3, 3), (0, 0, 1, 1), (12, 12)),  # TF "SAME" at stride 2: padded at the end only
        ((5, 5), (2, 1, 2, 1), (14, 10)),
        ((4, 4), (1, 1, 1, 1), (8, 8)),
        ((2, 2), (0, 0, 0, 0), (8, 8)),
        ((1, 1), (0, 0, 0, 0), (8, 6)),
        ((6, 3), (2, 1, 3, 0), (10, 12)),
    ],
)
def test_folding_is_exact_for_every_kernel_and_padding(kernel, pads, size) -> None:
    model = stem(kernel, pads, size)
    before = model.clone()
    folded = stem_space_to_depth.fold_stems(model)
    assert [f.node.name for f in folded] == ["stem"]
    conv = next(n for n in model.graph if n.name == "stem")
    assert conv.inputs[0].producer().op_type == "SpaceToDepth"
    assert list(conv.attributes["strides"].value) == [1, 1]
    assert conv.inputs[1].const_value.numpy().shape[1] == 12
    for batch in (1, 3):  # N is symbolic
        assert_same_outputs(before, model, _feeds(size, batch=batch), tolerance=1e-5)
    assert "stem (" in stem_space_to_depth.note(folded)


def test_every_weight_lands_on_exactly_one_tap() -> None:
    model = stem((7, 7), (3, 3, 3, 3), (16, 16))
    weight = model.graph.initializers["w1"].const_value.numpy()
    (folded,) = stem_space_to_depth.fold_stems(model)
    new = model.graph.initializers[folded.new_weight].const_value.numpy()
    assert new.shape == (16, 12, 4, 4)
    # The same numbers plus zeros: what keeps the per-channel int8 scales and codes equal.
    np.testing.assert_array_equal(np.sort(new[new != 0]), np.sort(weight[weight != 0]))
    assert np.count_nonzero(new) == np.count_nonzero(weight)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": (13, 12)},
        {"size": ("H", "W")},
        {"strides": (1, 1)},
        {"strides": (2, 1)},
        {"c_in": 8},
        {"c_out": 8},
        {"c_out": 18},
        {"c_in": 4, "group": 2},
        {"dilations": (2, 2), "pads": (2, 2, 2, 2)},
    ],
    ids=[
        "odd height",
        "symbolic size",
        "stride 1",
        "stride 2x1",
        "8 input channels",
        "too few outputs",
        "outputs not 4k",
        "grouped",
        "dilated",
    ],
)
def test_convs_outside_the_conditions_are_left_alone(kwargs) -> None:
    model = stem(**kwargs)
    assert stem_space_to_depth.fold_stems(model) == []
    assert "SpaceToDepth" not in op_types(model)


def _strided(x: np.ndarray, w: np.ndarray, p0: int, p1: int) -> np.ndarray:
    """A 1-D stride-2 convolution (cross-correlation, as ONNX's Conv) with zero padding."""
    padded = np.concatenate([np.zeros(p0), x, np.zeros(p1)])
    count = (len(padded) - len(w)) // 2 + 1
    return np.array([padded[2 * p : 2 * p + len(w)] @ w for p in range(count)])


def _folded(x: np.ndarray, w: np.ndarray, axis: stem_space_to_depth.AxisMap) -> np.ndarray:
    """The same through the fold: phases side by side, a stride-1 convolution over them."""
    phases = x.reshape(-1, 2)  # SpaceToDepth along one axis: [i, a] = x[2i + a]
    taps = np.zeros((axis.size, 2))
    for s, a, u in axis.taps:
        taps[s, a] = w[u]
    padded = np.concatenate([np.zeros((axis.pads[0], 2)), phases, np.zeros((axis.pads[1], 2))])
    count = len(padded) - axis.size + 1
    return np.array([np.sum(padded[p : p + axis.size] * taps) for p in range(count)])


def test_fold_axis_matches_the_strided_convolution_everywhere() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for kernel in range(1, 8):
        for p0 in range(4):
            for p1 in range(4):
                for length in (6, 8, 10):
                    if length + p0 + p1 < kernel:
                        continue
                    axis = stem_space_to_depth.fold_axis(kernel, p0, p1, length)
                    assert axis is not None  # ONNX pads are >= 0: a fold never needs to crop
                    # Every original tap is read exactly once.
                    assert sorted(u for _, _, u in axis.taps) == list(range(kernel))
                    x, w = rng.standard_normal(length), rng.standard_normal(kernel)
                    np.testing.assert_allclose(
                        _folded(x, w, axis), _strided(x, w, p0, p1), rtol=1e-12, atol=1e-12
                    )
                    checked += 1
    assert checked > 300


def _calib(tmp_path: Path, size=(16, 16)) -> str:
    return random_calib(tmp_path, (16, 3, *size))


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_static_int8_folds_the_stem_for_ort_only(tmp_path, target) -> None:
    context = PassContext(target=target)
    model = stem((7, 7), (3, 3, 3, 3), (16, 16))
    quantized, _ = run_pass(model, QuantizePass, context, mode="int8", calib=_calib(tmp_path))
    record = context.details["quantize"]
    assert any("SpaceToDepth" in note for note in record.notes) == (target == "ort")
    assert ("SpaceToDepth" in op_types(quantized)) == (target == "ort")
    # Folded, it needs no channel padding: 12 input channels are a multiple of 4 already.
    assert "Pad" not in op_types(quantized)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(op_types(quantized))


def test_a_stem_kept_in_float_is_not_folded(tmp_path) -> None:
    context = PassContext(target="ort")
    model = stem((7, 7), (3, 3, 3, 3), (16, 16))
    quantized, _ = run_pass(
        model, QuantizePass, context, mode="int8", calib=_calib(tmp_path), exclude="stem"
    )
    assert "SpaceToDepth" not in op_types(quantized)


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_the_int8_model_is_bit_identical_with_and_without_folding(
    tmp_path, monkeypatch, weights
) -> None:
    feeds = _feeds((16, 16), batch=4)
    outputs = {}
    for fold in (True, False):
        if not fold:
            monkeypatch.setattr(stem_space_to_depth, "fold_stems", lambda model, keep: [])
        context = PassContext(target="ort")
        quantized, _ = run_pass(
            stem((7, 7), (3, 3, 3, 3), (16, 16)),
            QuantizePass,
            context,
            mode="int8",
            calib=_calib(tmp_path),
            int8_weights=weights,
        )
        assert ("SpaceToDepth" in op_types(quantized)) == fold
        outputs[fold] = quantized
    # Same input range, same weights plus zeros: the same codes, the same integer sums, as ORT
    # deploys it (optimizations on: integer kernels). With them off, the float Conv between
    # DequantizeLinear and QuantizeLinear sums in another order, so only float tolerance.
    deployed = [
        run_session(make_session(outputs[fold], optimize=True), ["y"], feeds)[0]
        for fold in (False, True)
    ]
    np.testing.assert_array_equal(deployed[0], deployed[1])
    assert_same_outputs(outputs[False], outputs[True], feeds, tolerance=0.02)


@pytest.mark.parametrize("c_in", [1, 2, 4])
def test_folding_is_exact_for_one_to_four_channels(c_in) -> None:
    model = stem((7, 7), (3, 3, 3, 3), (16, 16), c_in=c_in)
    before = model.clone()
    (folded,) = stem_space_to_depth.fold_stems(model)
    assert folded.node.inputs[1].const_value.numpy().shape == (16, 4 * c_in, 4, 4)
    assert_same_outputs(before, model, _feeds((16, 16), c_in=c_in, batch=2), tolerance=1e-5)


def test_auto_pad_and_convs_deeper_in_the_graph_are_left_alone() -> None:
    model = stem()
    conv = next(n for n in model.graph if n.name == "stem")
    conv.attributes["auto_pad"] = ir.AttrString("auto_pad", "SAME_UPPER")
    del conv.attributes["pads"]
    assert stem_space_to_depth.fold_stems(model) == []
    # A stride-2 Conv that reads another node's output, not a graph input: not a stem.
    deeper = stem()
    head = next(n for n in deeper.graph if n.name == "head")
    head.attributes["strides"] = ir.AttrInt64s("strides", [2, 2])
    assert [f.node.name for f in stem_space_to_depth.fold_stems(deeper)] == ["stem"]
