"""Joint EoRA (:mod:`graphopt.passes.compensation.joint`): rounding again with the path in
view lowers the output error left after GPTQ and SparseGPT; sparsify and quantize keep the
pattern / the int4 format and report the pass's error as the one without."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.api import OptimizeOptions, optimize
from graphopt.passes.compensation import joint
from graphopt.passes.compensation.eora import _energy, eora_factors
from graphopt.passes.compensation.sparsified import nm_pattern
from graphopt.passes.quantization.gptq import gptq
from graphopt.passes.sparsity.reconstruct import sparsegpt
from graphopt.passes.sparsity.settings import Pattern


def _problem(seed: int, n: int = 48, k: int = 64):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    x = (rng.standard_normal((2000, k)) * np.geomspace(10.0, 0.1, k)) @ basis.T
    # Weights with a few strong directions (as trained layers have) over noise.
    w = rng.standard_normal((n, 3)) @ rng.standard_normal((3, k)) + 0.3 * rng.standard_normal(
        (n, k)
    )
    return w, x.T @ x / len(x)


def _gptq(h):
    def rounder(target):
        qw = gptq(np.ascontiguousarray(target.T, np.float32), h, 32, signed=True)
        return qw.dequantize().T.astype(np.float64), qw

    return rounder


def _sparsegpt(h):
    def rounder(target):
        return sparsegpt(target.astype(np.float32), h, Pattern.parse("2:4")), None

    return rounder


@pytest.mark.parametrize(("make", "init"), [(_gptq, "weight"), (_sparsegpt, "residual")])
def test_rounding_again_beats_plain_eora(make, init):
    w, h = _problem(0)
    rounder = make(h)
    first, _ = rounder(w)
    rank = 4
    refined = joint.refine(w, first, h, rank, rounder, init)
    assert refined is not None and 1 <= refined.rounds <= joint.ROUNDS
    a, b = eora_factors(w - first, h, rank)
    plain = _energy(w - first - b @ a, h) / _energy(w, h)
    assert refined.error_plain == pytest.approx(plain)
    assert refined.error_joint < 0.95 * plain
    # The new weight is one the rounding can produce (same format as the pass's).
    again, _ = rounder(refined.approx)
    np.testing.assert_allclose(again, refined.approx, atol=1e-5)


def test_nothing_better_keeps_the_pass_rounding():
    w, h = _problem(1)
    # A "rounding" that loses everything: no round can beat plain EoRA on the pass's W'.
    assert joint.refine(w, w * 0.99, h, 4, lambda t: (np.zeros_like(t), None), "weight") is None


def test_nm_pattern_is_read_back():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 32))
    two_four = sparsegpt(w.astype(np.float32), np.eye(32), Pattern.parse("2:4"))
    assert str(nm_pattern(two_four)) == str(Pattern.parse("2:4"))
    unstructured = np.where(rng.random((8, 32)) < 0.5, 0.0, w)
    assert nm_pattern(unstructured) is None


def _matmul_model(w: np.ndarray) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", 4, 64]))
    const = ir.Value(name="w", const_value=ir.tensor(w.astype(np.float32), name="w"))
    const.type, const.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(list(w.shape))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT))
    z = ir.Value(name="z", type=ir.TensorType(ir.DataType.FLOAT))
    nodes = [
        ir.node("MatMul", [x, const], outputs=[y], name="layer"),
        ir.node("Tanh", [y], outputs=[z], name="act"),
    ]
    graph = ir.Graph([x], [z], nodes=nodes, initializers=[const], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def _compensation(tmp_path, enabled: bool, **flags):
    source = tmp_path / "m.onnx"
    w, _ = _problem(3, 48, 64)
    ir.save(_matmul_model(w.T), source)
    joint.ENABLED = enabled
    try:
        options = OptimizeOptions(
            calib="random", compensation="eora:4", input_shapes={"x": (2, 4, 64)}, **flags
        )
        result = optimize(source, tmp_path / f"out_{enabled}.onnx", options)
    finally:
        joint.ENABLED = True
    details = result.report.details
    return (details.get("sparsify") or details.get("quantize")).compensation


@pytest.mark.parametrize(
    "flags",
    [
        {"sparsity": "2:4", "sparsity_keep_last": False},
        {"quantize": "int4-weight", "target": "ort", "int4_method": "gptq"},
    ],
)
def test_passes_round_again_and_report_the_pass_error_as_the_one_without(tmp_path, flags):
    plain = _compensation(tmp_path, False, **flags)
    both = _compensation(tmp_path, True, **flags)
    assert not any("joint" in note for note in plain.notes)
    assert any("joint EoRA: 1 of 1 layers" in note for note in both.notes)
    (p,), (j,) = plain.layers, both.layers
    assert j.error_before == pytest.approx(p.error_before, rel=1e-6)
    assert j.error_after < p.error_after
    model = ir.load(tmp_path / "out_True.onnx")
    if "sparsity" in flags:
        weight = next(node for node in model.graph if node.name == "layer").inputs[1]
        assert nm_pattern(weight.const_value.numpy().T) is not None  # still 2:4
    else:
        ops = [node.op_type for node in model.graph]
        assert "MatMulNBits" in ops and "MatMul" in ops  # int4 layer and the float path


def test_rtn_int4_keeps_plain_eora(tmp_path):
    """Re-rounding after RTN measured worse on MiniLM (see quantized._requantized): plain."""
    comp = _compensation(tmp_path, True, quantize="int4-weight", target="ort", int4_method="rtn")
    assert len(comp.layers) == 1 and not any("joint" in note for note in comp.notes)
