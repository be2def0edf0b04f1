"""Calibrated weight rounding keeps a sparsity pattern: a weight that is exactly 0 before
quantization (``--sparsity`` N:M or unstructured, or any other pass that zeroed it)
dequantizes to exactly 0 after GPTQ's error feedback (int8 static, int8-dynamic, int4-weight,
symmetric and asymmetric), so an N:M pattern still holds; dense weights round as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.passes.quantization import int8_rounding
from graphopt.passes.quantization.gptq import DAMPENING, gptq, output_error, rtn
from graphopt.passes.quantization.qdq import quantize_weight
from graphopt_tests.passes.pruning.graphs import cnn, correlated, mlp


def _two_four(w: np.ndarray) -> np.ndarray:
    """``w`` [K, N] with the 2 smallest of every 4 consecutive rows (per column) zeroed."""
    k, n = w.shape
    groups = w.reshape(k // 4, 4, n).copy()
    smallest = np.argsort(np.abs(groups), axis=1)[:, :2]
    np.put_along_axis(groups, smallest, 0.0, axis=1)
    return groups.reshape(k, n)


def _unstructured(w: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random(w.shape) < share, 0.0, w).astype(w.dtype)


def _gram(rng: np.random.Generator, k: int, rows: int = 512) -> np.ndarray:
    x = correlated(rng, (rows, k)).astype(np.float64)
    return x.T @ x / rows


def _nonzeros_per_group(w: np.ndarray) -> np.ndarray:
    """Non-zeros in each group of 4 consecutive rows of a [K, N] weight, per column."""
    return (w.reshape(w.shape[0] // 4, 4, -1) != 0).sum(axis=1)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_int8_codes_of_zero_weights_stay_zero(pattern):
    rng = np.random.default_rng(0)
    k, n, groups = 64, 24, 2
    dense = rng.standard_normal((groups, k, n))
    if pattern == "2:4":
        w = np.stack([_two_four(g) for g in dense])
    else:
        w = _unstructured(dense, 0.6, rng)
    h = np.stack([_gram(rng, k) for _ in range(groups)])
    scale = np.stack([quantize_weight(g, 1).scale for g in w]).astype(np.float64)
    codes = int8_rounding.round_codes(w, h, scale)
    zero = w == 0
    assert zero.any() and (codes[zero] == 0).all()
    if pattern == "2:4":
        assert all((_nonzeros_per_group(c) <= 2).all() for c in codes)
    # Still data-aware: the error feedback lands on the kept weights and beats rounding to
    # nearest on the layer's output.
    for g in range(groups):
        nearest = quantize_weight(w[g], 1).dequantized()
        ours = codes[g] * scale[g]
        assert output_error(w[g], ours, h[g]) < output_error(w[g], nearest, h[g])


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize(("asymmetric", "signed"), [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("act_order", [True, False])
def test_int4_gptq_zero_weights_dequantize_to_exact_zero(pattern, asymmetric, signed, act_order):
    rng = np.random.default_rng(1)
    k, n = 96, 40  # 3 blocks of 32, the last one not a GPTQ batch boundary
    dense = rng.standard_normal((k, n)).astype(np.float32)
    w = _two_four(dense) if pattern == "2:4" else _unstructured(dense, 0.6, rng)
    # A positive block: its asymmetric range still holds 0 (zero point 0).
    w[:32, :4] = np.abs(w[:32, :4])
    h = _gram(rng, k)
    qw = gptq(w, h, 32, asymmetric, act_order=act_order, signed=signed)
    approx = qw.dequantize()
    zero = w == 0
    assert zero.any() and (approx[zero] == 0).all()
    if asymmetric:
        points = np.repeat(qw.zero_points, 32, axis=0)[:k]
        assert (qw.q[zero] == points[zero]).all()
    else:
        assert (qw.q[zero] == 0).all()
    if pattern == "2:4":
        assert (_nonzeros_per_group(approx) <= 2).all()
    plain = rtn(w, 32, asymmetric, signed=signed).dequantize()
    assert output_error(w, approx, h) < output_error(w, plain, h)


def _reference_codes(w: np.ndarray, h: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Textbook GPTQ (act-order, one feature at a time, no batching) of one [K, N] group,
    rounding a weight that is exactly 0 to code 0 (SparseGPT's mask): what
    :func:`int8_rounding.round_codes` must give for K up to its batch."""
    k = w.shape[0]
    order = np.argsort(-np.diag(h), kind="stable")
    hessian = h[np.ix_(order, order)].copy()
    hessian[np.diag_indices(k)] += DAMPENING * np.mean(np.diag(hessian))
    upper = int8_rounding._upper_factors(hessian[None])[0]
    work = np.array(w[order], dtype=np.float64)
    held = work == 0
    codes = np.empty_like(work)
    for i in range(k):
        codes[i] = np.clip(np.rint(work[i] / scale), -127, 127)
        codes[i][held[i]] = 0.0
        work[i] = (work[i] - codes[i] * scale) / upper[i, i]
        work[i + 1 :] -= upper[i, i + 1 :, None] * work[i, None, :]
    restored = np.empty_like(codes)
    restored[order] = codes
    return restored.astype(np.int8)


@pytest.mark.parametrize("sparse", [False, True])
def test_int8_codes_are_textbook_gptq_with_the_zero_mask(sparse):
    """Pins the rounding: a dense weight (no exact zero) rounds exactly as GPTQ always did;
    a sparse one as GPTQ with the zeros held."""
    rng = np.random.default_rng(2)
    k, n = 32, 12
    w = rng.standard_normal((k, n))
    if sparse:
        w = _two_four(w)
    else:
        assert (w != 0).all()
    h = _gram(rng, k)
    scale = quantize_weight(w, 1).scale.astype(np.float64)
    codes = int8_rounding.round_codes(w[None], h[None], scale[None])[0]
    np.testing.assert_array_equal(codes, _reference_codes(w, h, scale))
    # The error feedback did move codes away from the nearest ones.
    assert not np.array_equal(codes, quantize_weight(w, 1).values)


# End to end: --sparsity, then --quantize with GPTQ rounding from the same calibration file.


def _files(tmp_path: Path, name: str) -> tuple[Path, str]:
    if name == "mlp":
        model, shape = mlp(hidden=64, width=16), (48, 4, 16)
    else:
        model, shape = cnn(), (48, 3, 8, 8)
    path = tmp_path / f"{name}.onnx"
    io.save(model, path)
    calib = tmp_path / f"{name}.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), shape))
    return path, str(calib)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    """The float weights a quantized model's integer weights stand for, by the codes' name:
    those of the DequantizeLinear nodes reading initializers (per channel or blockwise), and
    the int8-dynamic lowering's symmetric ``*_weight_q`` codes times their column scales."""
    proto = onnx.load(str(path))
    inits = _initializers(path)
    found = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        codes = inits[node.input[0]].astype(np.float64)
        scale = inits[node.input[1]].astype(np.float64)
        point = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 else 0.0
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis = attrs.get("axis", 1)
        if "block_size" in attrs:
            block = attrs["block_size"]
            size = codes.shape[axis]
            scale = np.repeat(scale, block, axis=axis).take(range(size), axis=axis)
            if np.ndim(point):
                point = np.repeat(point, block, axis=axis).take(range(size), axis=axis)
        elif scale.ndim == 1 and codes.ndim > 1:
            shape = [-1 if i == axis else 1 for i in range(codes.ndim)]
            scale = scale.reshape(shape)
            point = np.reshape(point, shape) if np.ndim(point) else point
        found[node.input[0]] = (codes - point) * scale
    for name, codes in inits.items():
        if name.endswith("_weight_q"):
            scale = inits[name.removesuffix("_q") + "_scale"]
            found[name] = codes.astype(np.float64) * scale.astype(np.float64)
    return found


def _matching(weights: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The dequantized form of the float weight ``name``: its QDQ / int4 codes by name, else
    (int8-dynamic names them after the node) the one of its shape."""
    for suffix in ("_quantized", "_q4"):
        if name + suffix in weights:
            return weights[name + suffix]
    (match,) = [w for w in weights.values() if w.shape == shape]
    return match


QUANTIZE = {
    "int8": {"quantize": "int8"},
    "int8-dynamic": {"quantize": "int8-dynamic"},
    "int4-gptq": {"quantize": "int4-weight", "opset": 21, "int4_method": "gptq"},
    "int4-gptq-asymmetric": {
        "quantize": "int4-weight",
        "opset": 21,
        "int4_method": "gptq",
        "int4_asymmetric": True,
        "block_size": 16,
    },
}


@pytest.mark.parametrize(
    ("name", "sparsity", "mode"),
    [
        ("mlp", "2:4", "int8"),
        ("mlp", "2:4", "int8-dynamic"),
        ("mlp", "2:4", "int4-gptq"),
        ("mlp", "2:4", "int4-gptq-asymmetric"),
        ("mlp", "unstructured=0.6", "int8-dynamic"),
        ("mlp", "unstructured=0.6", "int4-gptq"),
        ("cnn", "2:4", "int8"),
        ("cnn", "unstructured=0.6", "int8"),
    ],
)
def test_sparsified_weights_stay_zero_through_calibrated_quantization(
    tmp_path, name, sparsity, mode
):
    model, calib = _files(tmp_path, name)
    common = {"sparsity": sparsity, "calib": calib, "verify": False}
    sparse_path, quantized_path = tmp_path / "sparse.onnx", tmp_path / "quantized.onnx"
    optimize(model, sparse_path, OptimizeOptions(**common))
    result = optimize(model, quantized_path, OptimizeOptions(**common, **QUANTIZE[mode]))
    notes = result.report.details["quantize"].notes
    if mode.startswith("int8"):
        assert any(note.startswith("int8 weights: gptq on") for note in notes), notes
    sparse = {k: v for k, v in _initializers(sparse_path).items() if (v == 0).mean() >= 0.4}
    assert len(sparse) >= 2
    dequantized = _dequantized_weights(quantized_path)
    for key, w in sparse.items():
        approx = _matching(dequantized, key, w.shape)
        zero = w == 0
        assert (approx[zero] == 0).all(), (key, float((approx[zero] != 0).mean()))
        if sparsity == "2:4":
            # Groups of 4 along the reduction axis: a MatMul's K, a Conv's input channels.
            if w.ndim == 4:
                groups = (np.moveaxis(approx, 1, -1).reshape(len(w), -1, 4) != 0).sum(-1)
            else:
                groups = _nonzeros_per_group(approx)
            assert (groups <= 2).all(), key
