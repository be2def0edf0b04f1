"""``--quantize int4-weight``: block rounding, MatMulNBits / GatherBlockQuantized / blockwise
DequantizeLinear emission checked against a numpy dequantize-then-compute reference in ORT,
GPTQ and AWQ against RTN, asymmetric blocks, errors, determinism, and MiniLM end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.errors import UserInputError
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.gptq import gptq, output_error, rtn
from graphopt.passes.quantization.int4 import matmul_nbits_arrays, quantize_int4
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.registry import PassContext
from graphopt.verify import run_model
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _settings(**kw) -> QuantSettings:
    return QuantSettings(mode="int4-weight", **kw)


def _linear_model(k: int, n: int, opset: int, seed: int = 0, gemm: bool = False) -> ir.Model:
    """x[B, k] -> MatMul(W[k, n]) (or Gemm transB=1, alpha, bias) -> y."""
    rng = np.random.default_rng(seed)
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, alpha=0.5, beta=2.0)]
        inits = {
            "W": rng.normal(size=(n, k)).astype(np.float32),
            "C": rng.normal(size=(n,)).astype(np.float32),
        }
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
        inits = {"W": rng.normal(size=(k, n)).astype(np.float32)}
    return make_model(
        nodes,
        [tensor_info("x", F, ["B", k])],
        [tensor_info("y", F, ["B", n])],
        inits,
        opset=opset,
        ir_version=10,
    )


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}


def _unpack(packed: np.ndarray) -> np.ndarray:
    """Nibbles, low first, along the last axis (the test's own reading of the format)."""
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int16)


def _nbits_reference_weight(model: ir.Model) -> np.ndarray:
    """The [K, N] weight a MatMulNBits node stands for, decoded with numpy."""
    (node,) = [n for n in model.graph if n.op_type == "MatMulNBits"]
    k, n = (node.attributes[a].value for a in ("K", "N"))
    packed = node.inputs[1].const_value.numpy()
    codes = _unpack(packed)  # [N, blocks, block]
    blocks = codes.shape[1]
    scales = node.inputs[2].const_value.numpy().reshape(n, blocks, 1)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zeros = _unpack(node.inputs[3].const_value.numpy().reshape(n, -1))[:, :blocks, None]
    else:
        zeros = 8
    return ((codes - zeros) * scales).reshape(n, -1)[:, :k].T


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return run_model(model, {"x": x})[0]


def test_rtn_known_matrix_gives_hand_computed_codes_scales_and_bytes():
    # Column 0: multiples of 0.5 up to 7 * 0.5: scale 0.5 (the full range) is exact.
    # Column 1: multiples of 0.25 from -8 * 0.25: only the clipped range 2 * 7/8 is exact.
    col0 = np.array([0, 1, 2, 3, 4, 5, 6, 7, -1, -2, -3, -4, -5, -6, -7, 0]) * 0.5
    col1 = np.array([-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7]) * 0.25
    w = np.stack([col0, col1], axis=1).astype(np.float32)
    qw = rtn(w, 16)
    np.testing.assert_allclose(qw.scales, [[0.5, 0.25]], rtol=1e-6)
    np.testing.assert_array_equal(
        qw.q[:, 0], [0, 1, 2, 3, 4, 5, 6, 7, -1, -2, -3, -4, -5, -6, -7, 0]
    )
    np.testing.assert_array_equal(qw.q[:, 1], np.arange(-8, 8))
    np.testing.assert_allclose(qw.dequantize(), w, atol=1e-6)
    packed, scales, zeros = matmul_nbits_arrays(qw)
    assert packed.shape == (2, 1, 8) and zeros is None
    # Codes + 8, two per byte, low nibble first: (8, 9) -> 0x98, (10, 11) -> 0xBA, ...
    assert packed[0, 0].tolist() == [0x98, 0xBA, 0xDC, 0xFE, 0x67, 0x45, 0x23, 0x81]
    assert packed[1, 0].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    np.testing.assert_allclose(scales, [0.5, 0.25], rtol=1e-6)


def test_signed_scales_put_the_extreme_on_code_minus_8_whatever_its_sign():
    # -7 .. 8: scale -1 holds all 16 values exactly (8 is code -8); a positive scale has
    # only 15 levels within max|w| = 8 and cannot.
    w = np.arange(-7, 9, dtype=np.float32).reshape(16, 1)  # -7 .. 8
    positive = rtn(w, 16)
    signed = rtn(w, 16, signed=True)
    assert positive.scales[0, 0] > 0 and signed.scales[0, 0] == pytest.approx(-1.0)
    np.testing.assert_allclose(signed.dequantize(), w)
    assert np.abs(positive.dequantize() - w).max() > 0.1


def test_asymmetric_rtn_uses_zero_points_and_the_full_range():
    rng = np.random.default_rng(3)
    w = (rng.random((64, 8)) * 3.0 + 0.5).astype(np.float32)  # all positive: skewed blocks
    sym, asym = rtn(w, 32), rtn(w, 32, asymmetric=True)
    assert asym.zero_points is not None and asym.zero_points.dtype == np.uint8
    assert asym.q.min() >= 0 and asym.q.max() <= 15 and asym.zero_points.max() <= 15
    err_sym = np.abs(sym.dequantize() - w).mean()
    err_asym = np.abs(asym.dequantize() - w).mean()
    assert err_asym < err_sym


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("gemm", [False, True])
def test_matmul_nbits_equals_numpy_dequantize_then_matmul(asymmetric, gemm):
    k, n = 80, 24  # K not a multiple of the block: the last block is padded
    model = _linear_model(k, n, opset=17, gemm=gemm)
    original = model.clone()
    settings = _settings(target="ort", int4_asymmetric=asymmetric)
    record = quantize_int4(model, settings, None, PassContext(target="ort"))
    assert [node.op_type for node in model.graph] == ["MatMulNBits"]
    assert record.quantized == 1 and record.weight_bytes_after < record.weight_bytes_before / 4
    w_hat = _nbits_reference_weight(model)
    x = np.random.default_rng(1).normal(size=(5, k)).astype(np.float32)
    inits = _initializers(original)
    if gemm:
        # Gemm's alpha is folded into the block scales, beta * C is MatMulNBits' bias.
        reference = x @ w_hat + 2.0 * inits["C"]
        expected_w = 0.5 * rtn(inits["W"].T, 32, asymmetric, signed=True).dequantize()
    else:
        reference = x @ w_hat
        expected_w = rtn(inits["W"], 32, asymmetric, signed=True).dequantize()
    np.testing.assert_allclose(_run(model, x), reference, rtol=1e-4, atol=1e-4)
    # The decoded weight is the rounding of the original, not something else.
    np.testing.assert_allclose(w_hat, expected_w, atol=1e-6)
    assert record.fidelity_source.endswith("generated inputs (no --calib file)")
    assert record.fidelity["generated"][0].mean_cosine > 0.99


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("gemm", [False, True])
def test_portable_blockwise_dequantize_runs_in_ort_and_equals_reference(asymmetric, gemm):
    k, n = 80, 24
    model = _linear_model(k, n, opset=21, gemm=gemm)
    original = model.clone()
    settings = _settings(target="portable", int4_asymmetric=asymmetric)
    quantize_int4(model, settings, None, PassContext())
    ops = [node.op_type for node in model.graph]
    assert ops == ["DequantizeLinear", "Gemm" if gemm else "MatMul"]
    dq = model.graph.node(0)
    assert dq.attributes["block_size"].value == 32
    assert dq.inputs[0].dtype == (ir.DataType.UINT4 if asymmetric else ir.DataType.INT4)
    inits = _initializers(original)
    w = inits["W"].T if gemm else inits["W"]
    w_hat = rtn(w, 32, asymmetric).dequantize()
    x = np.random.default_rng(1).normal(size=(5, k)).astype(np.float32)
    reference = 0.5 * x @ w_hat + 2.0 * inits["C"] if gemm else x @ w_hat
    np.testing.assert_allclose(_run(model, x), reference, rtol=1e-4, atol=1e-4)
    # Scales stay positive in the portable form (TensorRT requires it).
    assert (dq.inputs[1].const_value.numpy() > 0).all()


def test_portable_below_opset_21_is_a_user_error():
    model = _linear_model(32, 8, opset=17)
    with pytest.raises(UserInputError, match="--opset 21") as info:
        quantize_int4(model, _settings(target="portable"), None, PassContext())
    assert "\n" not in str(info.value)


def test_calibration_methods_without_calibration_are_a_user_error():
    model = _linear_model(32, 8, opset=21)
    with pytest.raises(UserInputError, match="--calib"):
        quantize_int4(model, _settings(int4_method="gptq"), None, PassContext())


def _embedding_model(opset: int) -> ir.Model:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["y"])]
    return make_model(
        nodes,
        [tensor_info("ids", TensorProto.INT64, ["B", 3])],
        [tensor_info("y", F, ["B", 3, 64])],
        {"E": rng.normal(size=(50, 64)).astype(np.float32)},
        opset=opset,
        ir_version=10,
    )


@pytest.mark.parametrize("target", ["ort", "portable"])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_embedding_table_quantized_gathers_the_dequantized_rows(target, asymmetric):
    model = _embedding_model(17 if target == "ort" else 21)
    table = _initializers(model)["E"]
    settings = _settings(target=target, int4_asymmetric=asymmetric, quantize_embeddings=True)
    record = quantize_int4(model, settings, None, PassContext(target=target))
    expected_op = "GatherBlockQuantized" if target == "ort" else "Gather"
    assert [node.op_type for node in model.graph][-1] == expected_op
    assert record.weight_bytes_after < record.weight_bytes_before / 4
    ids = np.array([[0, 7, 49], [3, 3, 12]], dtype=np.int64)
    signed = target == "ort"  # ORT's kernels take negative scales
    reference = rtn(table.T, 32, asymmetric, signed=signed).dequantize().T[ids]
    got = run_model(model, {"ids": ids})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_embeddings_stay_float_unless_asked():
    """Unasked, the table is no candidate: the model would come back as given, refused."""
    model = _embedding_model(21)
    with pytest.raises(UserInputError, match="nothing to quantize: no layer it rewrites"):
        quantize_int4(model, _settings(), None, PassContext())
    assert [n.op_type for n in model.graph] == ["Gather"]


def _correlated_inputs(k: int, rows: int, seed: int, draw: int = 0) -> np.ndarray:
    """Inputs with strongly correlated channels and uneven magnitudes (like LLM activations):
    ``seed`` fixes the distribution, ``draw`` the rows drawn from it."""
    rng = np.random.default_rng(seed)
    mixing = (rng.normal(size=(k, k)) * 0.4 + np.eye(k)) * np.exp(rng.normal(size=k))
    x = np.random.default_rng([seed, draw]).normal(size=(rows, k)) @ mixing
    return x.astype(np.float32)


def test_gptq_beats_rtn_on_correlated_inputs():
    k, n = 128, 32
    x = _correlated_inputs(k, 1024, seed=0)
    w = np.random.default_rng(1).normal(size=(k, n)).astype(np.float32)
    h = x.T.astype(np.float64) @ x
    for asymmetric in (False, True):
        plain = output_error(w, rtn(w, 32, asymmetric).dequantize(), h)
        for act_order in (False, True):
            fed_back = gptq(w, h, 32, asymmetric, act_order=act_order)
            assert output_error(w, fed_back.dequantize(), h) < 0.7 * plain


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_beat_rtn_end_to_end_on_held_out_samples(method):
    k, n = 128, 32
    x = _correlated_inputs(k, 256, seed=0)
    calib = CalibrationSet({"x": x}, "calib.npz", batch=64)
    outputs = {}
    records = {}
    for name in ("rtn", method):
        model = _linear_model(k, n, opset=17, seed=2)
        settings = _settings(target="ort", int4_method=name)
        records[name] = quantize_int4(model, settings, calib, PassContext(target="ort"))
        outputs[name] = model
    held_out = _correlated_inputs(k, 64, seed=0, draw=1)  # same distribution, unseen rows
    reference = _run(_linear_model(k, n, opset=17, seed=2), held_out)
    errors = {name: np.square(_run(m, held_out) - reference).mean() for name, m in outputs.items()}
    assert errors[method] < 0.8 * errors["rtn"], errors
    assert records[method].layers[0].reason.startswith(method)
    # Calibration rows too, as every other mode reports (only held-out ones before).
    source = "64 calibration and 64 held-out samples of calib.npz"
    assert records[method].fidelity_source == source
    assert {"calibration", "held-out"} <= set(records[method].fidelity)


def test_awq_folds_its_scales_into_the_layer_norm():
    k, n = 64, 32
    rng = np.random.default_rng(4)
    gamma = np.exp(rng.normal(size=k) * 1.5).astype(np.float32)  # salient channels
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "W"], ["y"]),
    ]
    inits = {
        "g": gamma,
        "b": np.zeros(k, np.float32),
        "W": rng.normal(size=(k, n)).astype(np.float32),
    }
    model = make_model(
        nodes, [tensor_info("x", F, ["B", k])], [tensor_info("y", F, ["B", n])], inits, opset=17
    )
    x = rng.normal(size=(256, k)).astype(np.float32)
    quantize_int4(
        model,
        _settings(target="ort", int4_method="awq"),
        CalibrationSet({"x": x}, "c", 64),
        PassContext(),
    )
    assert [node.op_type for node in model.graph] == ["LayerNormalization", "MatMulNBits"]
    assert not np.allclose(model.graph.node(0).inputs[1].const_value.numpy(), gamma)


def test_output_bytes_are_deterministic():
    x = _correlated_inputs(64, 128, seed=0)
    blobs = []
    for _ in range(2):
        model = _linear_model(64, 16, opset=21)
        settings = _settings(int4_method="gptq", int4_asymmetric=True)
        quantize_int4(model, settings, CalibrationSet({"x": x}, "c", 32), PassContext())
        blobs.append(ir.to_proto(model).SerializeToString(deterministic=True))
    assert blobs[0] == blobs[1]
    assert onnx.load_from_string(blobs[0]).graph.node[0].op_type == "DequantizeLinear"


def test_optimize_api_runs_int4_weight_and_reports_it(tmp_path):
    model = _linear_model(64, 16, opset=17)
    source = tmp_path / "linear.onnx"
    io.save(model, source)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_correlated_inputs(64, 40, seed=1))
    from graphopt import api

    out = tmp_path / "int4.onnx"
    options = api.OptimizeOptions(quantize="int4-weight", target="ort", calib=str(calib))
    result = api.optimize(source, out, options)
    record = result.report.details["quantize"]
    assert record.layers[0].reason == "gptq, block 32, symmetric"
    assert "int4_method" in record.settings["defaulted"]
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMulNBits"]


@pytest.mark.slow
@pytest.mark.torch
def test_minilm_int4_ort_keeps_cosine_at_a_sixth_of_the_size(tmp_path):
    """Issue target: MiniLM, --target ort, embeddings quantized too: mean cosine >= 0.98 on the
    held-out sentences and a file <= 35% of fp32; side by side with ONNX Runtime's own
    MatMulNBitsQuantizer (RTN, block 32, embeddings left in fp32) on the same sentences."""
    from graphopt_tests.models.cases import require

    require("minilm")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from graphopt import api, models
    from graphopt.models import sentences

    source = models.get("minilm")
    calib = sentences.minilm_npz(tmp_path / "calib.npz", "calib", 160)
    out = tmp_path / "minilm_int4.onnx"
    options = api.OptimizeOptions(
        quantize="int4-weight", target="ort", calib=str(calib), quantize_embeddings=True
    )
    api.optimize(source, out, options)
    reference = sentences.embed(source, "eval", 100)
    cosine = sentences.mean_cosine(reference, sentences.embed(out, "eval", 100))
    size = out.stat().st_size / source.stat().st_size

    quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=32, is_symmetric=True)
    quantizer.process()
    ort_out = tmp_path / "minilm_ort_rtn.onnx"
    onnx.save(quantizer.model.model, ort_out)
    ort_cosine = sentences.mean_cosine(reference, sentences.embed(ort_out, "eval", 100))
    print(
        f"MiniLM int4: graphopt gptq {cosine:.4f} at {size:.3f} of fp32; ORT RTN block 32 "
        f"{ort_cosine:.4f} at {ort_out.stat().st_size / source.stat().st_size:.3f}"
    )
    assert cosine >= 0.98 and size <= 0.35
    assert cosine > ort_cosine


def test_gemm_with_a_runtime_bias_adds_it_after_matmul_nbits():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(16, 64)).astype(np.float32)  # transB=1: stored [N, K]
    model = make_model(
        [helper.make_node("Gemm", ["x", "W", "c"], ["y"], transB=1, beta=0.5)],
        [tensor_info("x", F, [4, 64]), tensor_info("c", F, [4, 16])],
        [tensor_info("y", F, [4, 16])],
        {"W": w},
        opset=17,
    )
    quantize_int4(model, _settings(target="ort"), None, PassContext())
    assert [node.op_type for node in model.graph] == ["Mul", "MatMulNBits", "Add"]
    x = rng.normal(size=(4, 64)).astype(np.float32)
    c = rng.normal(size=(4, 16)).astype(np.float32)
    reference = x @ _nbits_reference_weight(model) + 0.5 * c
    got = run_model(model, {"x": x, "c": c})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def test_excluded_layers_stay_float_with_the_reason():
    model = _linear_model(32, 8, opset=21)
    model.graph.node(0).name = "head"
    # Its only layer excluded: nothing left to quantize, refused with the reason.
    with pytest.raises(UserInputError, match=r"every candidate stays float \(MatMul: --exclude\)"):
        quantize_int4(model, _settings(exclude=("head",)), None, PassContext())


def test_float_weights_are_dropped_and_their_external_data_released(tmp_path, monkeypatch):
    """Streaming: each float weight leaves the graph (and its memory map is closed) once its
    int4 form is in, so a large model is never held as float and int4 at once."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"]),
    ]
    inits = {f"W{i}": rng.normal(size=(128, 128)).astype(np.float32) for i in (1, 2)}
    proto = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [tensor_info("x", F, ["B", 128])],
            [tensor_info("y", F, ["B", 128])],
            [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
        ir_version=10,
    )
    path = tmp_path / "external.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="w.data", size_threshold=0)
    model = io.load(path).model
    tensors = [model.graph.initializers[k].const_value for k in ("W1", "W2")]
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors)
    from graphopt.passes.quantization import int4

    released = []
    measure = int4.measure_fidelity

    def fidelity_after_quantization(original, quantized, sets):
        # The state the quantization loop left behind; fidelity then maps the original again.
        released.extend(t.raw is None for t in tensors)
        return measure(original, quantized, sets)

    monkeypatch.setattr(int4, "measure_fidelity", fidelity_after_quantization)
    record = quantize_int4(model, _settings(target="ort"), None, PassContext())
    assert not {"W1", "W2"} & set(model.graph.initializers)
    assert released == [True, True]  # memory maps closed
    assert record.fidelity["generated"][0].mean_cosine > 0.99


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_a_weight_from_a_constant_node_is_quantized_too(target):
    w = np.random.default_rng(8).normal(size=(64, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "W"], ["y"]),
    ]
    model = make_model(
        nodes, [tensor_info("x", F, [2, 64])], [tensor_info("y", F, [2, 8])], opset=21
    )
    record = quantize_int4(model, _settings(target=target), None, PassContext())
    assert record.quantized == 1
    x = np.random.default_rng(9).normal(size=(2, 64)).astype(np.float32)
    reference = x @ rtn(w, 32, signed=target == "ort").dequantize()
    np.testing.assert_allclose(_run(model, x), reference, rtol=1e-4, atol=1e-4)
