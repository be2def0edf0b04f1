"""What ``graphopt lint --target tensorrt`` says about each node: one label per node shared by
the table and the parser, every rejection once, nothing the parse-on cut caused reported as a
rejection, TensorRT's reasons on one clean line, and the fix that actually helps. The parser's
side is skipped, saying why, without tensorrt_rtx."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt.backends.tensorrt.findings import ERROR
from graphopt.backends.tensorrt.hints import clean_reason, fix_for
from graphopt.backends.tensorrt.lint import UNVERIFIED, lint_tensorrt, rejection_notes
from graphopt.backends.tensorrt.rules import static_findings
from graphopt_tests.backends.trt_models import if_model, model, tensor, value

_FOREIGN = ("my.ops",)


def _custom_then_pool() -> onnx.ModelProto:
    """my.ops::Foo (no importer) -> MaxPool -> Reshape: shape inference cannot type Foo's
    output, so its stand-in input has no shape, which MaxPool then refuses."""
    nodes = [
        helper.make_node("Foo", ["x"], ["f"], name="foo", domain="my.ops"),
        helper.make_node("MaxPool", ["f"], ["p"], kernel_shape=[2, 2], name="pool"),
        helper.make_node("Reshape", ["p", "shape"], ["y"], name="reshape"),
    ]
    shape = tensor(np.array([1, -1], np.int64), "shape")
    return model(nodes, [value("x", shape=(1, 3, 8, 8))], initializers=[shape], domains=_FOREIGN)


def _uint8_qdq(zero_point: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ]
    inits = [tensor(np.float32(0.05), "s"), tensor(np.uint8(zero_point), "z")]
    return model(nodes, initializers=inits, opset=13)


def _duplicate_names() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="dup"),
        helper.make_node("Foo", ["r"], ["f"], name="dup", domain="my.ops"),
        helper.make_node("Relu", ["f"], ["y"], name="r2"),
    ]
    return model(nodes, domains=_FOREIGN)


def _function_call() -> onnx.ModelProto:
    body = [helper.make_node("Foo", ["a"], ["b"], domain="my.ops")]
    imports = [helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]
    function = helper.make_function("local", "MyFn", ["a"], ["b"], body, imports)
    built = model(
        [helper.make_node("MyFn", ["x"], ["y"], domain="local", name="call")],
        domains=("local", "my.ops"),
    )
    built.functions.append(function)
    return built


def _branch_qdq() -> onnx.ModelProto:
    return if_model(
        [
            helper.make_node("QuantizeLinear", ["x", "bs", "bz"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "bs", "bz"], ["t"]),
        ],
        [tensor(np.float32(0.1), "bs"), tensor(np.uint8(128), "bz")],
    )


def test_a_rejection_the_cut_caused_is_unverified_not_an_error(trt) -> None:
    """To parse past node 'foo', lint cuts it and feeds its output as a network input. That
    input had no shape, and the parser's "at least 4 dimensions are required" on 'pool' was
    reported as a rejection (false: the model's MaxPool gets Foo's 4-D output)."""
    result = lint_tensorrt(_custom_then_pool())
    assert [f.location for f in result.errors] == ["node 'foo' (Foo)"]
    (after,) = [f for f in result.findings if f.rule == UNVERIFIED]
    assert after.severity == "warning" and after.location == "node 'pool' (MaxPool)"
    assert after.reason.startswith("unverified, parsed only after node 'foo' (Foo) was cut")
    # The uint8 Q's cut made the DequantizeLinear read a uint8 network input.
    result = lint_tensorrt(_uint8_qdq(128))
    assert [f.node_name for f in result.errors] == ["q"]
    assert [f.node_name for f in result.warnings if f.rule == UNVERIFIED] == ["dq"]


def test_an_ops_own_rejection_after_a_cut_stays_an_error(trt) -> None:
    """No importer for an op is about the op, whatever its inputs: still a rejection."""
    nodes = [
        helper.make_node("Foo", ["x"], ["f"], name="foo", domain="my.ops"),
        helper.make_node("Bar", ["f"], ["y"], name="bar", domain="my.ops"),
    ]
    result = lint_tensorrt(model(nodes, domains=_FOREIGN))
    assert [f.node_name for f in result.errors] == ["foo", "bar"]


def test_a_duplicate_name_is_one_node_once() -> None:
    """Two nodes named 'dup': the parser's rejection of the second was cut as the first
    (and reported twice)."""
    static = lint_tensorrt(_duplicate_names(), static=True)
    assert [f.location for f in static.errors] == ["node 1 'dup' (Foo)"]


def test_a_duplicate_name_is_one_node_once_for_the_parser(trt) -> None:
    result = lint_tensorrt(_duplicate_names())
    assert [f.location for f in result.errors] == ["node 1 'dup' (Foo)"]


def test_unnamed_nodes_are_labelled_by_graph_and_index() -> None:
    """Static mode counted subgraph nodes into its "node N"; the parser said node ''."""
    static = lint_tensorrt(_branch_qdq(), static=True)
    assert [f.location for f in static.errors] == [
        "If 'cond' then-branch node 0 (QuantizeLinear)",
        "If 'cond' then-branch node 1 (DequantizeLinear)",
    ]
    # A main-graph node after the If: its index in the main graph (the If's branch nodes
    # are not counted).
    branch = if_model([helper.make_node("Identity", ["x"], ["t"])])
    branch.graph.node.append(helper.make_node("Foo", ["y"], ["z"], domain="my.ops"))
    branch.graph.output[0].name = "z"
    branch.opset_import.append(helper.make_opsetid("my.ops", 1))
    (error,) = [f for f in static_findings(branch) if f.severity == ERROR]
    assert error.location == "node 3 (Foo)"
    function = lint_tensorrt(_function_call(), static=True)
    assert [f.location for f in function.errors] == [
        "function local::MyFn node 0 (Foo), called by node 'call' (MyFn)"
    ]


def test_the_parser_labels_nodes_as_the_table_does(trt) -> None:
    branch = lint_tensorrt(_branch_qdq())
    assert branch.errors[0].location == "If 'cond' then-branch node 0 (QuantizeLinear)"
    function = lint_tensorrt(_function_call())
    assert [f.location for f in function.errors] == [
        "function local::MyFn node 0 (Foo), called by node 'call' (MyFn)"
    ]
    # The pre-opset-7 error names no node; the parser's log says which one it was parsing.
    inputs = [value("a", shape=(2, 4)), value("b", shape=(2, 4))]
    old = lint_tensorrt(model([helper.make_node("Add", ["a", "b"], ["y"])], inputs, opset=6))
    assert [f.location for f in old.errors] == ["node 0 (Add)"]
    assert "--opset 13" in old.errors[0].fix


def test_parser_reasons_are_one_clean_line(trt) -> None:
    """TensorRT's reasons came raw: several lines, source paths, and a CUDA-driver line that
    is about the machine, not the model."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xu"], to=TensorProto.UINT8),
        helper.make_node("Add", ["xu", "xu"], ["au"]),
        helper.make_node("Cast", ["au"], ["y"], to=TensorProto.FLOAT),
    ]
    for built in (_custom_then_pool(), model(nodes, opset=18)):
        for finding in lint_tensorrt(built).findings:
            reason = finding.reason
            assert "\n" not in reason and "cuda" not in reason.lower(), reason
            assert "/_src/" not in reason and "Invalid Node" not in reason, reason


def test_clean_reason_keeps_the_message() -> None:
    raw = (
        "Invalid Node - pool\n"
        "ITensor::getDimensions: Error Code 3: API Usage Error (pool: at least 4 dimensions "
        "are required for input. In checkNOrMoreDims at /_src/optimizer/api/network.cpp:865)\n"
        "[checkMacros.cpp::catchCudaError::250] Error Code 1: Cuda Runtime (In catchCudaError "
        "at /_src/common/dispatch/checkMacros.cpp:250 (cudaError 35: CUDA driver version is "
        "insufficient for CUDA runtime version))"
    )
    assert clean_reason(raw, "MaxPool", ("pool",)) == (
        "at least 4 dimensions are required for input"
    )
    plugin = 'creator && "Plugin not found, are the plugin name, version, and namespace correct?"'
    assert clean_reason(plugin, "Foo") == (
        "no importer for Foo, and no plugin of that name (Plugin not found)"
    )
    assert clean_reason("Assertion failed: false", "Det") == (
        "TensorRT's parser has no importer for Det"
    )
    assertion = (
        "Assertion failed: creator && getPluginCreatorVersion(creator) == "
        "CreatorVersion::kV3ONE: failed to load MatMulNBits plugin."
    )
    assert clean_reason(assertion) == "failed to load MatMulNBits plugin."
    internal = (
        "[graphShapeAnalyzer.cpp::checkCalculationStatusSanity::2155] Error Code 2: Internal "
        "Error (Assertion !isInFlight(p.second.symbolicRep) failed.  In "
        "checkCalculationStatusSanity at /_src/optimizer/shapeof/graphShapeAnalyzer.cpp:2155)"
    )
    assert clean_reason(internal) == (
        "internal error: Assertion !isInFlight(p.second.symbolicRep) failed"
    )
    dla = (
        "TensorRT does not support UINT8 types for intermediate tensors. For UINT8 "
        "quantization, the kIMPORT_UINT8_QUANTIZATION flag must be set. (DLA version >= 3.16 "
        "only)"
    )
    assert clean_reason(dla) == "TensorRT does not support UINT8 types for intermediate tensors."


def test_fixes_match_the_reasons_both_checkers_give() -> None:
    """ "No importer" and "^OP: false$" never matched (the reasons say "has no importer"),
    so Det, Unique and custom ops got no fix."""
    no_importer = "TensorRT's parser has no importer for this op"
    for op, reason, domain in (
        ("Det", "TensorRT's parser has no importer for Det", ""),
        ("Unique", "op Unique has no importer in TensorRT's ONNX parser", ""),
        ("Foo", "op my.ops::Foo has no importer in TensorRT's ONNX parser", "my.ops"),
        ("Foo", "no importer for Foo, and no plugin of that name (Plugin not found)", "my.ops"),
    ):
        assert fix_for(op, reason, domain=domain).startswith(no_importer), op
    quantized = fix_for("QLinearConv", "TensorRT's parser has no importer for QLinearConv")
    assert "QOperator form" in quantized and "--quantize int8" in quantized
    contrib = fix_for("FastGelu", "no importer for FastGelu", domain="com.microsoft")
    assert "--target tensorrt" in contrib and "contrib" in contrib


def test_a_uint8_cast_is_not_sent_to_requantize() -> None:
    """A plain Cast to uint8 got "uint8 Q/DQ: --requantize symmetric", which then had
    nothing to do."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xu"], to=TensorProto.UINT8),
        helper.make_node("Cast", ["xu"], ["y"], to=TensorProto.FLOAT),
    ]
    (error,) = [f for f in static_findings(model(nodes)) if f.severity == ERROR]
    assert "requantize symmetric" not in error.fix and "re-export" in error.fix


def test_requantize_is_suggested_only_where_it_converts() -> None:
    """After --requantize symmetric (which skips If/Loop bodies and ORT's QOperator form),
    the fix suggested --requantize symmetric again."""
    for finding in static_findings(_branch_qdq()):
        assert "inside an If body" in finding.fix and "--quantize int8" in finding.fix
        assert "re-rounds" not in finding.fix
    # ORT's QOperator form: a uint8 QuantizeLinear feeding QLinearConv.
    weight = tensor(np.ones((2, 2, 1, 1), np.uint8), "w")
    scalars = [tensor(np.float32(0.1), "s"), tensor(np.uint8(128), "z"), weight]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="quantize"),
        helper.make_node("QLinearConv", ["xq", "s", "z", "w", "s", "z", "s", "z"], ["y"]),
    ]
    findings = static_findings(model(nodes, initializers=scalars))
    (quantize,) = [f for f in findings if f.node_name == "quantize"]
    assert "its output feeds QLinearConv" in quantize.fix and "re-rounds" not in quantize.fix
    # A main-graph activation Q/DQ it converts.
    (uint8,) = [f for f in static_findings(_uint8_qdq(128)) if f.node_name == "q"]
    assert "--requantize symmetric re-rounds" in uint8.fix


def test_the_optimize_warning_names_a_graph_level_rejection() -> None:
    """The first rejection's node name was printed even when it had none ("first: : ...")."""
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    wide = [value("x", TensorProto.UINT16)]
    (note,) = rejection_notes(ir.serde.deserialize_model(model(nodes, wide)))
    assert "first: graph: input 'x' has type UINT16" in note


def test_clean_reason_drops_a_layer_named_after_the_node() -> None:
    """TensorRT names the layers of one node NAME_N; an unnamed node's prepared name is its
    label, which read "node 0 (MeanVarianceNormalization): node 0 (Mean...)_4: ..."."""
    raw = (
        "node 0 (MeanVarianceNormalization)_4: ElementWiseOperation SUM must have same input "
        "types. But they are of types Half and Float"
    )
    label = "node 0 (MeanVarianceNormalization)"
    assert clean_reason(raw, "MeanVarianceNormalization", (label,)) == (
        "ElementWiseOperation SUM must have same input types. But they are of types Half and Float"
    )
    # Another node's name that merely starts the same stays.
    assert clean_reason("conv1_b: bad", "Conv", ("conv1",)) == "conv1_b: bad"
