"""``--quantize int8|int4-weight --compensation eora:R``: float32 low-rank paths beside the
rounded layers, the rounded weights read back right, and MiniLM end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt.editing import constant_array
from graphopt.passes.compensation.quantized import dequantized
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.pruning.graphs import correlated, mlp

F = TensorProto.FLOAT
MS = "com.microsoft"


def _gemm_model(seed: int = 0) -> ir.Model:
    """x[B, 32] -> Gemm(transB, alpha 0.5) -> Relu -> Gemm -> y[B, 8]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1, alpha=0.5),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="g2"),
    ]
    inits = {
        "w1": rng.standard_normal((48, 32)).astype(np.float32) / 4,
        "b1": rng.standard_normal(48).astype(np.float32) / 10,
        "w2": rng.standard_normal((48, 8)).astype(np.float32) / 6,
        "b2": np.zeros(8, np.float32),
    }
    return make_model(
        nodes, [tensor_info("x", F, ["B", 32])], [tensor_info("y", F, ["B", 8])], inits
    )


def _files(tmp_path, gemm: bool = False):
    path = tmp_path / "model.onnx"
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    if gemm:
        io.save(_gemm_model(), path)
        np.savez(calib, x=correlated(rng, (64, 32)).astype(np.float32))
    else:
        io.save(mlp(hidden=64, width=16), path)
        np.savez(calib, x=correlated(rng, (48, 4, 16)))
    return path, calib


def _worst_cosine(fidelity: dict, label: str) -> float:
    return min(f.mean_cosine for f in fidelity[label])


@pytest.mark.parametrize(
    ("mode", "target", "gemm"),
    [
        # int8 on these models: the paths do not lower the held-out error, and are dropped
        # (tests/graphopt_tests/passes/compensation/test_quantized.py).
        ("int4-weight", "ort", False),
        ("int4-weight", "ort", True),
    ],
)
def test_paths_reduce_the_output_error(tmp_path, mode, target, gemm):
    model, calib = _files(tmp_path, gemm)
    out = tmp_path / "out.onnx"
    options = OptimizeOptions(
        quantize=mode, target=target, calib=str(calib), compensation="eora:4", block_size=16
    )
    result = optimize(model, out, options)
    record = result.report.details["quantize"]
    comp = record.compensation
    rounded = [layer.node for layer in record.layers if layer.precision != "float"]
    # int8 keeps a Gemm with alpha in float (no path: nothing to compensate); int4 folds it.
    assert rounded == (["g2"] if gemm and mode == "int8" else ["g1", "g2"] if gemm else rounded)
    assert [layer.node for layer in comp.layers] == rounded and not comp.skipped
    assert all(layer.error_after < layer.error_before for layer in comp.layers)
    # EoRA corrects the weight error only; where int8's activation rounding dominates (g2's
    # weight error is 2e-5 of its output), the paths may move the cosine by noise.
    slack = 1e-4 if gemm and mode == "int8" else 0.0
    for label in ("calibration", "held-out"):
        before = _worst_cosine(comp.fidelity_before, label)
        assert _worst_cosine(comp.fidelity_after, label) >= before - slack
    assert record.fidelity == comp.fidelity_after
    assert record.float_model is None  # the reference is dropped once used
    assert "compensation" in record.to_json() and record.settings["compensation"] == 4
    saved = onnx.load(str(out))
    assert [o.name for o in saved.graph.output] == ["y"]
    # Per layer a float32 Aᵀ [K, 4] and Bᵀ [4, N], read by the path's MatMuls (a later exact
    # pass may fuse the second MatMul with the Add into a Gemm).
    factors = {t.name: t for t in saved.graph.initializer if t.name.startswith("eora_")}
    assert sorted(factors) == sorted(f"eora_{n}_{ab}" for n in rounded for ab in "AB")
    assert all(t.data_type == F and 4 in t.dims for t in factors.values())
    read = {i for n in saved.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    assert set(factors) <= read


def test_matmul_nbits_is_read_back_as_ort_computes_it(tmp_path):
    model, _ = _files(tmp_path)
    out = tmp_path / "q4.onnx"
    options = OptimizeOptions(quantize="int4-weight", target="ort", int4_method="rtn")
    optimize(model, out, options)
    quantized = ir.load(str(out))
    node = next(n for n in quantized.graph if n.op_type == "MatMulNBits")
    w, why = dequantized(node)
    assert why == "" and w.shape == (64, 16)
    # Run that node alone in ORT on random inputs: x·W'ᵀ must match.
    names = [v.name for v in node.inputs[1:] if v is not None]
    attrs = {k: a.value for k, a in node.attributes.items()}
    probe = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMulNBits", ["x", *names], ["y"], domain=MS, **attrs)],
            "probe",
            [tensor_info("x", F, [3, 16])],
            [tensor_info("y", F, [3, 64])],
            [
                onnx.numpy_helper.from_array(constant_array(quantized.graph.initializers[n]), n)
                for n in names
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
        ir_version=8,
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    got = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)


def test_without_the_flag_nothing_changes(tmp_path):
    model, calib = _files(tmp_path)
    options = OptimizeOptions(quantize="int8", calib=str(calib))
    result = optimize(model, tmp_path / "o.onnx", options)
    record = result.report.details["quantize"]
    assert record.compensation is None and record.float_model is None
    assert not any((n.name or "").startswith("eora") for n in result.model.graph)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "int8", "--compensation", "eora:8"], "needs calibration data"),
        (["--quantize", "fp16", "--compensation", "eora:8", "--calib", "CALIB"], "int8 and int4"),
        (["--quantize", "int4-weight", "--compensation", "rank8"], "expected none or eora:RANK"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, extra, message):
    model, calib = _files(tmp_path)
    extra = [str(calib) if e == "CALIB" else e for e in extra]
    assert main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_minilm_int4_eora_beats_plain_int4(tmp_path):
    from graphopt import models
    from graphopt.models import sentences
    from graphopt_tests.models.cases import require

    require("minilm")
    source = models.get("minilm")
    calib = sentences.minilm_npz(tmp_path / "calib.npz", "calib", 48, seq_len=32)
    cosines = {}
    for rank in (0, 16):
        out = tmp_path / f"q{rank}.onnx"
        options = OptimizeOptions(
            quantize="int4-weight", target="ort", calib=str(calib), int4_method="rtn"
        )
        if rank:
            options.compensation = f"eora:{rank}"
        result = optimize(source, out, options)
        if rank:
            comp = result.report.details["quantize"].compensation
            assert len(comp.layers) == 36 and comp.flops_added > 0
        cosines[rank] = sentences.fidelity(source, out, "eval", 64, seq_len=32)
    assert cosines[16] > cosines[0]
    assert 1 - cosines[16] < 0.8 * (1 - cosines[0])  # a real share of the gap closed


def test_same_input_same_bytes(tmp_path):
    model, calib = _files(tmp_path)
    options = OptimizeOptions(quantize="int8", calib=str(calib), compensation="eora:4")
    optimize(model, tmp_path / "a.onnx", options)
    optimize(model, tmp_path / "b.onnx", options)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_the_size_headline_counts_the_paths_written(tmp_path):
    """ "weights A -> B" used to be taken before the EoRA paths were added: B left out the
    float32 paths the file holds (llama_tiny int4 eora:8: 0.74 MiB said, 0.90 MiB written)."""
    model, calib = _files(tmp_path)
    out = tmp_path / "out.onnx"
    options = OptimizeOptions(
        quantize="int4-weight", target="ort", calib=str(calib), compensation="eora:4", block_size=16
    )
    record = optimize(model, out, options).report.details["quantize"]
    written = onnx.load(str(out)).graph.initializer
    paths = [t for t in written if "eora" in t.name]
    assert paths and not record.compensation.dropped
    assert record.weight_bytes_after == sum(onnx.numpy_helper.to_array(t).nbytes for t in written)
    assert record.path_bytes == sum(onnx.numpy_helper.to_array(t).nbytes for t in paths)
    assert f"EoRA paths {record.path_bytes / 2**20:.2f} MiB of it" in record.headline()
