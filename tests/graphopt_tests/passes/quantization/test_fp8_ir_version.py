"""fp8 output declares an IR version that can hold FLOAT8E4M3FN tensors (IR >= 9)."""

from __future__ import annotations

import onnx

from graphopt import io
from graphopt.passes.quantization.fp8 import FP8_IR_VERSION
from graphopt_tests.passes.quantization.test_float_types import calib_file, quantize, small_model


def test_fp8_raises_an_ir_version_too_old_for_float8(tmp_path) -> None:
    """A model converted with --opset 19 kept IR version 7 while holding float8 initializers,
    which onnx.checker refuses ("... float8 ... IR version")."""
    model = small_model(19)
    model.ir_version = 7
    quantize(model, mode="fp8", calib=calib_file(tmp_path))
    assert model.ir_version == FP8_IR_VERSION
    onnx.checker.check_model(io.to_proto(model))


def test_fp8_keeps_a_newer_ir_version(tmp_path) -> None:
    model = small_model(19)
    model.ir_version = 10
    quantize(model, mode="fp8", calib=calib_file(tmp_path))
    assert model.ir_version == 10
