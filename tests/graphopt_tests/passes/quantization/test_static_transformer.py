"""Static INT8 on transformer blocks: SmoothQuant on normalization-fed MatMuls, MatMul
outputs that only float ops read left float (fused as MatMulIntegerToFloat), the galloping
mixed-precision search; MiniLM end to end (slow)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.passes.quantization import mixed_precision as mp
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, run_pass, tensor_info

TOKENS, WIDTH, HIDDEN = 16, 32, 64


def block() -> ir.Model:
    """LayerNorm (two outlier channels in its scale, as trained transformers have) → MatMul
    → bias Add → Relu → MatMul → bias Add → residual Add → LayerNorm."""
    rng = np.random.default_rng(0)
    gamma = np.ones(WIDTH, np.float32)
    gamma[[3, 17]] = 40.0
    inits = {
        "gamma": gamma,
        "beta": (rng.standard_normal(WIDTH) * 0.1).astype(np.float32),
        "w1": (rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH)).astype(np.float32),
        "b1": (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN)).astype(np.float32),
        "b2": (rng.standard_normal(WIDTH) * 0.1).astype(np.float32),
        "gamma2": np.ones(WIDTH, np.float32),
        "beta2": np.zeros(WIDTH, np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["ob"], name="fc2_bias"),
        helper.make_node("Add", ["ob", "ln"], ["r"], name="residual"),
        helper.make_node(
            "LayerNormalization", ["r", "gamma2", "beta2"], ["y"], name="ln2", axis=-1
        ),
    ]
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", TOKENS, WIDTH])],
        [tensor_info("y", TensorProto.FLOAT, ["N", TOKENS, WIDTH])],
        inits,
        opset=17,
    )


def _inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, TOKENS, WIDTH)).astype(np.float32)


def _calib(tmp_path: Path) -> str:
    path = tmp_path / "calib.npz"
    np.savez(path, x=_inputs(32, seed=1))
    return str(path)


def _run(model: ir.Model, x: np.ndarray, optimized: Path | None = None) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    data = io.to_proto(model).SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1])
    return float(
        np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    )


def _quantize(model: ir.Model, tmp_path: Path, **options):
    context = PassContext(target="ort")
    result, _ = run_pass(
        model, QuantizePass, context, mode="int8", calib=_calib(tmp_path), **options
    )
    return result, context.details["quantize"]


def test_smoothquant_by_default_improves_static_int8_on_a_transformer_block(tmp_path):
    model = block()
    x = _inputs(16, seed=9)  # held out
    reference = _run(model, x)
    cosines, notes = {}, {}
    for alpha in (0.0, None):
        quantized, record = _quantize(model, tmp_path, smoothquant=alpha)
        cosines[alpha] = _cosine(reference, _run(quantized, x))
        notes[alpha] = [note for note in record.notes if note.startswith("SmoothQuant")]
    assert notes[0.0] == []
    # Default: only the LayerNorm-fed fc1 (its input also feeds the residual: a Mul).
    assert notes[None] == [
        "SmoothQuant: 1 inputs of 1 layers smoothed (0 into their normalization scale, "
        "1 by an inserted Mul), alpha 0.5"
    ]
    assert 1 - cosines[None] < (1 - cosines[0.0]) / 2, cosines
    assert cosines[None] > 0.999, cosines


def test_matmul_outputs_read_by_float_ops_stay_float_and_fuse(tmp_path):
    model = block()
    quantized, record = _quantize(model, tmp_path)
    reasons = {layer.node: layer.reason for layer in record.layers}
    assert reasons["fc1"].endswith("float output (read by float ops)")
    assert reasons["fc2"].endswith("float output (read by float ops)")
    # No QuantizeLinear reads a MatMul output (the bias Add reads the float product).
    matmul_outputs = {n.outputs[0].name for n in quantized.graph if n.op_type == "MatMul"}
    quantizes = [n for n in quantized.graph if n.op_type == "QuantizeLinear"]
    assert quantizes and not any(n.inputs[0].name in matmul_outputs for n in quantizes)
    optimized = tmp_path / "optimized.onnx"
    _run(quantized, _inputs(2, seed=3), optimized)
    fused = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert fused["MatMulIntegerToFloat"] == 2 and fused["MatMul"] == 0, fused


# A stand-in for a transformer: 24 layers, the few sensitive ones cost most of the cosine.
PENALTY = {f"layer{i:02d}": 0.0002 * (i % 5 + 1) for i in range(24)} | {
    "layer03": 0.01,
    "layer11": 0.008,
    "layer19": 0.006,
    "layer20": 0.004,
    "layer07": 0.003,
}


def _fake_build(kept: frozenset[str]) -> frozenset[str]:
    return frozenset(PENALTY) - kept


def _fake_evaluate(quantized: frozenset[str]) -> mp.Measured:
    loss = sum(PENALTY[name] for name in quantized)
    return mp.Measured(1.0 - loss, loss)


def test_galloping_search_finds_the_linear_answer_with_fewer_builds():
    target = mp.Target(min_cosine=0.985)
    found = {}
    for strategy in mp.STRATEGIES:
        kept, curve = mp.search(
            _fake_build, list(PENALTY), _fake_evaluate, target, strategy=strategy
        )
        found[strategy] = (kept, curve)
        assert target.met(mp.point_measure(curve[-1]))
        assert [p.kept_float for p in curve] == sorted(p.kept_float for p in curve)
    (linear, linear_curve), (gallop, gallop_curve) = found["linear"], found["gallop"]
    assert gallop == linear == {"layer03", "layer11", "layer19", "layer20"}
    assert [p.kept_float for p in linear_curve] == [0, 1, 2, 3, 4]
    # 1, 2, 4 (hit), then 3 (miss): the same answer.
    assert [p.kept_float for p in gallop_curve] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        mp.search(_fake_build, list(PENALTY), _fake_evaluate, target, strategy="random")


def test_galloping_search_needs_logarithmically_many_points():
    # 24 layers, the target needs 20 of them: linear walks 20 points, gallop ~9.
    target = mp.Target(min_cosine=1 - 0.0009)
    kept_l, linear = mp.search(
        _fake_build, list(PENALTY), _fake_evaluate, target, strategy="linear"
    )
    kept_g, gallop = mp.search(_fake_build, list(PENALTY), _fake_evaluate, target)
    assert kept_g == kept_l
    assert len(gallop) <= 11 < len(linear)  # +1: the walk up from float


@pytest.mark.slow
@pytest.mark.torch
def test_minilm_static_int8_keeps_its_sentence_embeddings(tmp_path):
    """Real weights, held-out sentences: all-int8 static cosine >= 0.99 (0.92-0.95 before
    SmoothQuant and float MatMul outputs)."""
    from graphopt_tests.models.cases import require

    require("minilm")
    from graphopt import api, models
    from graphopt.models import sentences

    source = models.get("minilm")
    calib = sentences.minilm_npz(tmp_path / "calib.npz", "calib", 64)
    out = tmp_path / "minilm_int8.onnx"
    options = api.OptimizeOptions(quantize="int8", calib=str(calib), target="ort", verify=False)
    result = api.optimize(source, out, options)
    record = result.report.details["quantize"]
    assert any(note.startswith("SmoothQuant: 12 inputs of 24 layers") for note in record.notes)
    cosine = sentences.fidelity(source, out, "eval", 100, threads=1)
    print(f"minilm int8 static (ort): held-out sentence cosine {cosine:.4f}")
    assert cosine >= 0.99


@pytest.mark.slow
@pytest.mark.torch
def test_minilm_min_cosine_keeps_few_layers_in_float(tmp_path):
    """``--min-cosine 0.995`` on held-out sentences: met with a few float layers (one on
    this calibration set), every curve point timed."""
    from graphopt_tests.models.cases import require

    require("minilm")
    from graphopt import api, models
    from graphopt.models import sentences

    source = models.get("minilm")
    calib = sentences.minilm_npz(tmp_path / "calib.npz", "calib", 64)
    out = tmp_path / "minilm_int8_mixed.onnx"
    options = api.OptimizeOptions(
        quantize="int8", calib=str(calib), target="ort", min_cosine=0.995, verify=False
    )
    record = api.optimize(source, out, options).report.details["quantize"]
    kept = [layer.node for layer in record.layers if "mixed precision" in layer.reason]
    assert 1 <= len(kept) <= 4 and record.curve[-1].kept_float == len(kept)
    # Judged on held-out and calibration samples, ORT's optimizations on and off.
    assert any("target mean cosine >= 0.995 met on 16 held-out and 48" in n for n in record.notes)
    assert all(point.speedup is not None and point.speedup > 1 for point in record.curve)
    cosine = sentences.fidelity(source, out, "eval", 100, threads=1)
    print(f"minilm int8 static --min-cosine 0.995: {len(kept)} float, cosine {cosine:.4f}")
    assert cosine >= 0.995
