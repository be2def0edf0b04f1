"""Mixed precision for int4-weight: --max-error/--min-cosine keep its most sensitive layers
float (they used to be noted as having no effect, and the run ended in exit 0)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.errors import UserInputError
from graphopt_tests.passes.pruning.graphs import correlated, mlp


def _files(tmp_path):
    model, calib = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    io.save(mlp(hidden=64, width=16), model)
    np.savez(calib, x=correlated(np.random.default_rng(0), (48, 4, 16)))
    return model, calib


def _options(calib, **target) -> OptimizeOptions:
    return OptimizeOptions(
        quantize="int4-weight", target="ort", calib=str(calib), block_size=16, **target
    )


def _max_rel(model, out, x) -> float:
    got = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for p in (model, out)
    ]
    return float(np.abs(got[1] - got[0]).max() / np.abs(got[0]).max())


def test_int4_keeps_layers_float_until_the_target_holds(tmp_path):
    model, calib = _files(tmp_path)
    out = tmp_path / "q.onnx"
    x = np.load(calib)["x"]
    everything = optimize(model, tmp_path / "all.onnx", _options(calib))
    error = _max_rel(model, tmp_path / "all.onnx", x)
    assert error > 0.03  # all int4: the target below is missed
    record = optimize(model, out, _options(calib, max_error=0.03)).report.details["quantize"]
    kept = [layer.node for layer in record.layers if layer.reason == "mixed precision: sensitive"]
    assert len(kept) == 1 and record.quantized == 1 and not record.target_missed
    assert record.curve[0].kept_float == 0 and record.curve[-1].kept_float == 1
    assert any("met on" in note and "1 of 2 layers kept in float" in note for note in record.notes)
    # The model written meets it in ORT, on every sample of the file.
    assert _max_rel(model, out, x) <= 0.03
    ops = [n.op_type for n in io.load(out).model.graph]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 1
    assert everything.report.details["quantize"].quantized == 2


def test_int4_refuses_when_only_float_meets_the_target(tmp_path):
    model, calib = _files(tmp_path)
    with pytest.raises(UserInputError, match="none of the 2 set\\(s\\) with a layer quantized"):
        optimize(model, tmp_path / "q.onnx", _options(calib, max_error=1e-6))
    assert not (tmp_path / "q.onnx").exists()
