"""``--requantize symmetric`` on ORT quantize_dynamic's convolution form (DynamicQuantizeLinear
-> ConvInteger -> Cast -> Mul by the scales): Conv(x, DequantizeLinear(int8 weight)), as
MatMulInteger becomes a MatMul. Lint pointed at --requantize for it, which left it as it was."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from graphopt.api import OptimizeOptions, optimize
from graphopt.backends.tensorrt.findings import ERROR
from graphopt.backends.tensorrt.rules import static_findings
from graphopt_tests.passes.quantization.test_requantize import _convnet


def _ort_dynamic(tmp_path: Path, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = tmp_path / "dyn.onnx"
    quantize_dynamic(
        str(_convnet(tmp_path / "f.onnx")),
        str(target),
        weight_type=QuantType.QUInt8,
        per_channel=per_channel,
    )
    return target


@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize_converts_dynamic_conv_integer(tmp_path: Path, per_channel: bool) -> None:
    source = _ort_dynamic(tmp_path, per_channel)
    ops = {n.op_type for n in onnx.load(source).graph.node}
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= ops
    before = [f for f in static_findings(onnx.load(source)) if f.severity == ERROR]
    conv_fix = next(f.fix for f in before if f.op_type == "ConvInteger")
    assert "QOperator" not in conv_fix and "ConvInteger" in conv_fix
    out = tmp_path / "s8.onnx"
    result = optimize(
        source, out, OptimizeOptions(target="tensorrt", requantize="symmetric", calib="random")
    )
    model = onnx.load(out)
    ops = [n.op_type for n in model.graph.node]
    assert "ConvInteger" not in ops and "DynamicQuantizeLinear" not in ops
    assert ops.count("Conv") == 2
    assert not [f for f in static_findings(model) if f.severity == ERROR]
    record = result.report.details["requantize"]
    assert sorted(x.op_type for x in record.layers).count("ConvInteger") == 2
    # Counted as layers (2 Conv, 1 MatMul), not as "other ops lowered with them".
    headline = record.headline()
    assert ": 3 layers quantized, 0 kept in float;" in headline, headline
    fidelity = next(iter(record.fidelity.values()))
    assert max(f.max_rel for f in fidelity) < 0.05
    assert min(f.mean_cosine for f in fidelity) > 0.999


def test_requantized_dynamic_conv_builds(trt, tmp_path: Path) -> None:
    from graphopt.backends.tensorrt.build import build_engine
    from graphopt.backends.tensorrt.cli_options import EngineOptions

    out = tmp_path / "s8.onnx"
    optimize(
        _ort_dynamic(tmp_path, False),
        out,
        OptimizeOptions(target="tensorrt", requantize="symmetric", verify=False),
    )
    report = build_engine(out, EngineOptions(tmp_path / "s8.plan"))
    assert report.built and (tmp_path / "s8.plan").exists()
