"""Static rules for what TensorRT's parser accepts and its builder refuses (rule "builder"):
a rank-0 quantized constant behind a DequantizeLinear, a Q/DQ zero point that is not a
constant, a Cast to or from FP8/FP4/INT4. ``graphopt lint`` reports them with the real
parser too (it builds no engine); each is checked against a real build where TensorRT-RTX
imports (the builder runs without a GPU)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.tensorrt.findings import ERROR
from graphopt.backends.tensorrt.lint import lint_tensorrt
from graphopt.backends.tensorrt.rules import static_findings


def _model(nodes, inputs, outputs, initializers=(), opset=19) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _info(name, elem=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _scalar_dq(quantized: np.ndarray) -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["c"]),
            helper.make_node("Mul", ["x", "c"], ["y"]),
        ],
        [_info("x")],
        [_info("y")],
        [
            numpy_helper.from_array(quantized, "q"),
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.zeros((), np.int8), "z"),
        ],
    )


def _zero_point_input() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s"], ["y"]),
        ],
        [_info("x"), _info("z", TensorProto.INT8, ())],
        [_info("y")],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s")],
    )


def _zero_point_constant() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        [_info("x")],
        [_info("y")],
        [
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.zeros((), np.int8), "z"),
        ],
    )


def _cast(source: int, target: int) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Cast", ["x"], ["y"], to=target)],
        [_info("x", source)],
        [_info("y", target)],
    )


CASES = {
    "scalar int8 DequantizeLinear": (_scalar_dq(np.array(5, np.int8)), True),
    "vector int8 DequantizeLinear": (_scalar_dq(np.array([5, 6, 7, 8], np.int8)), False),
    "zero point a network input": (_zero_point_input(), True),
    "zero point an initializer": (_zero_point_constant(), False),
    "Cast float to float8": (_cast(TensorProto.FLOAT, TensorProto.FLOAT8E4M3FN), True),
    "Cast float8 to float": (_cast(TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT), True),
    "Cast int4 to float16": (_cast(TensorProto.INT4, TensorProto.FLOAT16), True),
    "Cast float to float16": (_cast(TensorProto.FLOAT, TensorProto.FLOAT16), False),
}


def _builder_errors(findings) -> list[str]:
    return [f.reason for f in findings if f.severity == ERROR and f.rule == "builder"]


@pytest.mark.parametrize("case", list(CASES))
def test_static_builder_rules(case: str) -> None:
    model, rejected = CASES[case]
    errors = _builder_errors(static_findings(model))
    assert bool(errors) == rejected, errors
    for reason in errors:
        assert "the engine build rejects it (TensorRT's parser accepts it)" in reason
    if rejected:
        fix = next(f.fix for f in static_findings(model) if f.rule == "builder")
        assert fix and "requantize symmetric leaves" not in fix


def test_scalar_dequantize_fix_names_requantize() -> None:
    finding = next(
        f for f in static_findings(_scalar_dq(np.array(5, np.int8))) if f.rule == "builder"
    )
    assert "--requantize symmetric stores it in float" in finding.fix


@pytest.mark.parametrize("case", list(CASES))
def test_builder_rules_agree_with_a_real_build_and_lint_reports_them(trt, case: str) -> None:
    """The parser takes each model; a build fails exactly where the rule says so; and lint
    with the real parser (which builds nothing) still reports the rule's error."""
    import tensorrt_rtx as rt

    model, rejected = CASES[case]
    logger = rt.Logger(rt.Logger.ERROR)
    builder = rt.Builder(logger)
    flag = 1 << int(rt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = rt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString())
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(rt.ComputeCapability.SM89, 0)
    built = builder.build_serialized_network(network, config)
    assert (built is None) == rejected
    result = lint_tensorrt(model)
    assert "parser" in result.checker
    assert bool(_builder_errors(result.findings)) == rejected
    # The summary line says where those errors come from (the checker is the parser).
    assert ("from the static builder rules" in result.note) == rejected


def test_a_failed_build_names_the_cause_and_fix(trt, tmp_path) -> None:
    """The builder's message names a layer ("Tensor output has datatype FP8 ..."); the
    error adds the node the builder rules found and their fix."""
    from graphopt.backends.tensorrt.build import build_engine
    from graphopt.backends.tensorrt.cli_options import EngineOptions
    from graphopt.errors import CheckFailedError

    model, _ = CASES["Cast float to float8"]
    with pytest.raises(CheckFailedError) as failed:
        build_engine(model, EngineOptions(tmp_path / "c.plan"))
    message = str(failed.value)
    assert "TensorRT's builder failed" in message
    assert "cause: node 0 (Cast): Cast from FLOAT to FLOAT8E4M3FN" in message
    assert "; fix: cast to or from FP8/FP4/INT4 with QuantizeLinear" in message
    assert not (tmp_path / "c.plan").exists()


def test_float16_rnn_with_sequence_lens_is_rejected_with_a_fix() -> None:
    """TensorRT's importer masks the steps past each length with a Select of float16 and
    float32 (measured: RNN, GRU, LSTM); float32, or float16 without sequence_lens, imports."""
    rng = np.random.default_rng(0)

    def rnn(elem: int, lens: bool) -> onnx.ModelProto:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        weights = [
            numpy_helper.from_array(rng.random((1, 12, 4)).astype(dtype), "W"),
            numpy_helper.from_array(rng.random((1, 12, 3)).astype(dtype), "R"),
        ]
        inputs = [_info("X", elem, (2, 2, 4))]
        if lens:
            inputs.append(_info("sequence_lens", TensorProto.INT32, (2,)))
        node = helper.make_node(
            "LSTM", ["X", "W", "R", "", "sequence_lens" if lens else ""], ["Y"], hidden_size=3
        )
        return _model([node], inputs, [_info("Y", elem, (2, 1, 2, 3))], weights, opset=17)

    def errors(model):
        return [f for f in static_findings(model) if f.severity == ERROR]

    assert not errors(rnn(TensorProto.FLOAT, True))
    assert not errors(rnn(TensorProto.FLOAT16, False))
    (found,) = errors(rnn(TensorProto.FLOAT16, True))
    assert "float16 LSTM with a sequence_lens input" in found.reason
    assert "--quantize fp16 --exclude LSTM" in found.fix
    # The real parser's words get the same fix.
    from graphopt.backends.tensorrt.hints import fix_for

    parser_reason = (
        "(Unnamed Layer* 38) [Select]: ISelectLayer must have `thenInput` and `elseInput` "
        "of same types but has Half and Float"
    )
    assert "--exclude LSTM" in fix_for("LSTM", parser_reason)
