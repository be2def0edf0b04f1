"""The static rule table against TensorRT's real parser, case by case: each model below is
linted by the table (always) and by the parser (where tensorrt_rtx imports), and both must
give the verdict the parser was measured to give (TensorRT-RTX 1.7.1).

The cases are the classes where the table disagreed: values folded or carried inside If/Loop
bodies and through Identity/Cast, shapes computed from a float input's values, pre-opset-7
elementwise ops, uint8 quantization with zero point 0, ONNX Runtime's contrib ops (the parser
picks an importer by op name, whatever the domain)."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.util import find_spec

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.backends.tensorrt.lint import LintResult, lint_tensorrt
from graphopt.backends.tensorrt.module import TensorRT, find_tensorrt
from graphopt_tests.backends.trt_models import if_model, model, tensor, value

MS = "com.microsoft"
_I64 = TensorProto.INT64


def _parser() -> TensorRT | None:
    """TensorRT's parser where tensorrt_rtx is installed (a broken install fails) and not
    turned off (GRAPHOPT_TENSORRT=none), else None: the table's verdict is still checked
    against the measured one."""
    if find_spec("tensorrt_rtx") is None or os.environ.get("GRAPHOPT_TENSORRT") == "none":
        return None
    find_tensorrt.cache_clear()
    found = find_tensorrt().found
    assert found is not None, find_tensorrt().why_not()
    return found


def assert_agree(built: onnx.ModelProto, rejected: bool) -> tuple[LintResult, LintResult | None]:
    """The table's verdict on ``built`` is ``rejected``, and so is the parser's."""
    static = lint_tensorrt(built, static=True)
    assert bool(static.errors) == rejected, [f.describe() for f in static.findings]
    if _parser() is None:
        return static, None
    real = lint_tensorrt(built)
    assert real.checker.endswith("parser")
    assert bool(real.errors) == rejected, [f.describe() for f in real.findings]
    return static, real


def _from_float(name: str, elem: int = _I64, unsqueeze: bool = True) -> list[onnx.NodeProto]:
    """``name`` computed from the values of the float input x (max(x), cast)."""
    nodes = [
        helper.make_node("ReduceMax", ["x"], [f"{name}_max"], keepdims=0),
        helper.make_node("Cast", [f"{name}_max"], [f"{name}_cast"], to=elem),
    ]
    if unsqueeze:
        nodes.append(helper.make_node("Unsqueeze", [f"{name}_cast", "z0"], [name]))
    else:
        nodes.append(helper.make_node("Identity", [f"{name}_cast"], [name]))
    return nodes


_INTS = [tensor(np.array([v], np.int64), n) for n, v in (("z0", 0), ("one", 1), ("two", 2))]
_INTS += [tensor(np.array([3], np.int64), "three")]


def _shape_slot(op: str, source: str) -> onnx.ModelProto:
    """``op`` whose shape input is computed from the float input (``source`` "float") or is
    an int64 network input k ("int")."""
    value_in = "k"
    pre = _from_float("k") if source == "float" else []
    inputs = [value("x")] + ([value("k", _I64, [1])] if source == "int" else [])
    inits = list(_INTS)
    if op == "Pad":
        pads = ["z0"] * 7 + [value_in]
        nodes = [
            helper.make_node("Concat", pads, ["pads"], axis=0),
            helper.make_node("Pad", ["x", "pads"], ["y"]),
        ]
    elif op == "Slice":
        nodes = [helper.make_node("Slice", ["x", "z0", value_in, "three"], ["y"])]
    elif op == "Resize":
        nodes = [
            helper.make_node("Concat", ["one", "two", value_in, value_in], ["sizes"], axis=0),
            helper.make_node("Resize", ["x", "", "", "sizes"], ["y"]),
        ]
    elif op == "TopK":
        nodes = [helper.make_node("TopK", ["x", value_in], ["y", "indices"])]
    elif op == "Split":
        nodes = [
            helper.make_node("Concat", [value_in, value_in], ["parts"], axis=0),
            helper.make_node("Split", ["x", "parts"], ["y", "y2"], axis=3),
        ]
    else:  # Range over a computed limit
        pre = _from_float("k", unsqueeze=False) if source == "float" else []
        inputs = [value("x")] + ([value("k", _I64, [])] if source == "int" else [])
        inits += [tensor(np.int64(0), "start"), tensor(np.int64(1), "delta")]
        nodes = [helper.make_node("Range", ["start", value_in, "delta"], ["y"])]
    return model(pre + nodes, inputs, initializers=inits, opset=13)


def _qdq(zero_point, opset: int = 13) -> list[onnx.TensorProto]:
    return [tensor(np.float32(0.05), "s"), tensor(zero_point, "z")]


def _uint8_qdq_zero() -> onnx.ModelProto:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ]
    return model(nodes, initializers=_qdq(np.uint8(0)), opset=13)


def _zero_point_through(op: str, point: int) -> onnx.ModelProto:
    """Q/DQ whose int8 zero point is ``op`` of an initializer (Identity: folded, read by
    the parser; Add: computed, not read at all)."""
    inputs = ["z0"] if op == "Identity" else ["z0", "z0"]
    nodes = [
        helper.make_node(op, inputs, ["z"]),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    inits = [tensor(np.float32(0.05), "s"), tensor(np.int8(point), "z0")]
    return model(nodes, initializers=inits, opset=13)


def _reduce_axes(op: str) -> onnx.ModelProto:
    """ReduceSum whose axes are ``op`` of an initializer."""
    inputs = ["a0"] if op in ("Identity", "Cast") else ["a0", "z0"]
    extra = {"to": _I64} if op == "Cast" else {}
    nodes = [
        helper.make_node(op, inputs, ["axes"], **extra),
        helper.make_node("ReduceSum", ["x", "axes"], ["y"]),
    ]
    inits = [tensor(np.array([1], np.int64), "a0"), tensor(np.array([0], np.int64), "z0")]
    return model(nodes, initializers=inits, opset=18)


def _unsqueeze_axes(source: str) -> onnx.ModelProto:
    """Unsqueeze axes folded from constants (accepted) or read from an int input (not)."""
    if source == "int":
        nodes = [helper.make_node("Unsqueeze", ["x", "k"], ["y"])]
        return model(nodes, [value("x"), value("k", _I64, [1])], opset=13)
    nodes = [
        helper.make_node("Add", ["z0", "z0"], ["axes"]),
        helper.make_node("Unsqueeze", ["x", "axes"], ["y"]),
    ]
    return model(nodes, initializers=[tensor(np.array([0], np.int64), "z0")], opset=13)


def _one_hot(depth: str) -> onnx.ModelProto:
    inits = [
        tensor(np.array([0, 1], np.float32), "values"),
        tensor(np.array([0, 1], np.int64), "indices"),
        tensor(np.int64(1), "i1"),
    ]
    if depth == "shape":  # a dim of x: a shape the parser folds
        pre = [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "i1"], ["d"]),
        ]
    else:
        pre = _from_float("d", unsqueeze=False)
    nodes = [*pre, helper.make_node("OneHot", ["indices", "d", "values"], ["y"])]
    return model(nodes, initializers=inits, opset=13)


def _branch_constant() -> onnx.ModelProto:
    """ReduceSum in an If branch, its axes a Constant of that branch."""
    axes = tensor(np.array([1], np.int64), "axes_value")
    return if_model(
        [
            helper.make_node("Constant", [], ["axes"], value=axes),
            helper.make_node("ReduceSum", ["x", "axes"], ["t"]),
        ]
    )


def _loop_constant() -> onnx.ModelProto:
    """A Loop body squeezing with axes from a Constant of the body."""
    axes = tensor(np.array([0], np.int64), "axes_value")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Constant", [], ["axes"], value=axes),
            helper.make_node("Unsqueeze", ["v_in", "axes"], ["u"]),
            helper.make_node("Squeeze", ["u", "axes"], ["v_out"]),
        ],
        "body",
        [value("i", _I64, []), value("cond_in", TensorProto.BOOL, []), value("v_in", shape=[4])],
        [value("cond_out", TensorProto.BOOL, []), value("v_out", shape=[4])],
    )
    inits = [tensor(np.int64(3), "n"), tensor(np.array(True), "go")]
    nodes = [helper.make_node("Loop", ["n", "go", "x"], ["y"], body=body, name="loop")]
    return model(nodes, [value("x", shape=[4])], initializers=inits, opset=18)


def _branch_qdq() -> onnx.ModelProto:
    """uint8 Q/DQ with zero point 128, its scale and zero point initializers of the branch."""
    return if_model(
        [
            helper.make_node("QuantizeLinear", ["x", "bs", "bz"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "bs", "bz"], ["t"]),
        ],
        [tensor(np.float32(0.1), "bs"), tensor(np.uint8(128), "bz")],
    )


def _old_opset(op: str, opset: int, bias: tuple[int, ...] = (2, 2), **attrs) -> onnx.ModelProto:
    if op == "Gemm":
        inputs = [value("a", shape=(2, 4)), value("b", shape=(4, 2)), value("c", shape=bias)]
    else:
        inputs = [value("a", shape=(2, 4)), value("b", shape=(2, 4))]
    names = [v.name for v in inputs]
    return model([helper.make_node(op, names, ["y"], **attrs)], inputs, opset=opset)


def _uint8_weight_dequantize() -> onnx.ModelProto:
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"]),
        helper.make_node("Add", ["x", "wf"], ["y"]),
    ]
    inits = [*_qdq(np.uint8(0)), tensor(np.arange(4, dtype=np.uint8).reshape(1, 4), "w")]
    return model(nodes, [value("x", shape=(1, 4))], initializers=inits, opset=13)


_B, _S, _H = 1, 8, 32
_QKV = [value(n, shape=(_B, _S, _H)) for n in ("q", "k", "v")]


def _contrib(op: str, inputs: list[str], extra_inputs=(), outputs=("y",), inits=(), **attrs):
    node = helper.make_node(op, inputs, list(outputs), domain=MS, **attrs)
    return model([node], [*_QKV, *extra_inputs], initializers=inits, domains=(MS,))


def _ort_attention() -> onnx.ModelProto:
    """com.microsoft::Attention in ORT's packed form (input, weights [H, 3H], bias [3H])."""
    inits = [
        tensor(np.full((_H, 3 * _H), 0.01, np.float32), "w"),
        tensor(np.zeros(3 * _H, np.float32), "b"),
    ]
    node = helper.make_node("Attention", ["q", "w", "b"], ["y"], domain=MS, num_heads=2)
    return model([node], [_QKV[0]], initializers=inits, domains=(MS,))


def _group_query_attention(past: bool) -> onnx.ModelProto:
    extra = [value("pk", shape=(_B, 1, _S, 16)), value("pv", shape=(_B, 1, _S, 16))]
    extra += [value("lengths", TensorProto.INT32, (_B,)), value("total", TensorProto.INT32, ())]
    inputs = ["q", "k", "v", "pk" if past else "", "pv" if past else "", "lengths", "total"]
    qkv = [value("q", shape=(_B, _S, _H))] + [value(n, shape=(_B, _S, 16)) for n in "kv"]
    node = helper.make_node(
        "GroupQueryAttention",
        inputs,
        ["y", "pk_out", "pv_out"],
        domain=MS,
        num_heads=2,
        kv_num_heads=1,
        scale=0.25,
    )
    used = extra if past else extra[2:]
    return model([node], [*qkv, *used], domains=(MS,))


def _skip_layer_norm(outputs: tuple[str, ...]) -> onnx.ModelProto:
    node = helper.make_node(
        "SkipSimplifiedLayerNormalization", ["q", "k", "g"], list(outputs), domain=MS
    )
    gamma = tensor(np.ones(_H, np.float32), "g")
    return model([node], _QKV[:2], initializers=[gamma], domains=(MS,))


def _foreign_relu() -> onnx.ModelProto:
    node = helper.make_node("Relu", ["x"], ["y"], domain="my.ops")
    return model([node], domains=("my.ops",))


def _contrib_range() -> onnx.ModelProto:
    inits = [tensor(np.int64(0), "start"), tensor(np.int64(4), "limit")]
    node = helper.make_node("Range", ["start", "limit"], ["y"], domain=MS)
    return model([node], initializers=inits, domains=(MS,))


def _conv_transpose(output_shape: list[int]) -> onnx.ModelProto:
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], output_shape=output_shape)
    weight = tensor(np.ones((2, 2, 2, 2), np.float32), "w")
    return model([node], initializers=[weight], opset=11)


def _concat_without_axis() -> onnx.ModelProto:
    return model([helper.make_node("Concat", ["x", "x"], ["y"])], opset=1)


# name: (model, the parser's verdict: rejected)
CASES: dict[str, tuple[Callable[[], onnx.ModelProto], bool]] = {
    # Weights and constants where the parser folds them.
    "axes via Identity": (lambda: _reduce_axes("Identity"), False),
    "axes via Cast": (lambda: _reduce_axes("Cast"), False),
    "axes via Add": (lambda: _reduce_axes("Add"), True),
    "unsqueeze axes folded": (lambda: _unsqueeze_axes("constants"), False),
    "unsqueeze axes from an int input": (lambda: _unsqueeze_axes("int"), True),
    "constant inside an If branch": (_branch_constant, False),
    "constant inside a Loop body": (_loop_constant, False),
    "one-hot depth from a static dim": (lambda: _one_hot("shape"), False),
    "one-hot depth from float values": (lambda: _one_hot("float"), True),
    # Shapes computed from a float input's values; from an int input they are accepted.
    **{
        f"{op} shape from {source} values": (
            lambda op=op, source=source: _shape_slot(op, source),
            source == "float",
        )
        for op in ("Pad", "Slice", "Resize", "TopK", "Split", "Range")
        for source in ("float", "int")
    },
    # Quantization.
    "uint8 Q/DQ, zero point 0": (_uint8_qdq_zero, False),
    "uint8 weight DequantizeLinear, zero point 0": (_uint8_weight_dequantize, True),
    "uint8 Q/DQ inside an If branch": (_branch_qdq, True),
    "zero point 5 via Identity": (lambda: _zero_point_through("Identity", 5), True),
    "zero point 0 via Identity": (lambda: _zero_point_through("Identity", 0), False),
    # The parser takes a computed zero point (it does not read it); the engine build
    # refuses it ("zero_point which is not an initializer", measured): lint says so with
    # either checker (rule "builder").
    "zero point computed by Add": (lambda: _zero_point_through("Add", 5), True),
    # Opsets below 7.
    "Add at opset 6": (lambda: _old_opset("Add", 6), True),
    "Sum at opset 7": (lambda: _old_opset("Sum", 7), False),
    "Gemm at opset 6": (lambda: _old_opset("Gemm", 6), False),
    "Gemm broadcast at opset 6": (lambda: _old_opset("Gemm", 6, broadcast=1), False),
    "Gemm 1-D bias at opset 6": (lambda: _old_opset("Gemm", 6, (2,)), True),
    "Concat without axis": (_concat_without_axis, True),
    # Ops of other domains: imported by name.
    "my.ops::Relu": (_foreign_relu, False),
    "com.microsoft::Attention": (_ort_attention, True),
    "GroupQueryAttention without past": (lambda: _group_query_attention(False), True),
    "GroupQueryAttention with past": (lambda: _group_query_attention(True), True),
    "MultiHeadAttention": (
        lambda: _contrib("MultiHeadAttention", ["q", "k", "v"], num_heads=2),
        False,
    ),
    "MultiHeadAttention with bias": (
        lambda: _contrib(
            "MultiHeadAttention",
            ["q", "k", "v", "bias"],
            inits=[tensor(np.zeros(3 * _H, np.float32), "bias")],
            num_heads=2,
        ),
        True,
    ),
    "SkipSimplifiedLayerNormalization": (lambda: _skip_layer_norm(("y",)), False),
    "SkipSimplifiedLayerNormalization with mean and inv_std_var": (
        lambda: _skip_layer_norm(("y", "mean", "inv_std_var")),
        True,
    ),
    "com.microsoft::Range without delta": (_contrib_range, True),
    # Static shapes.
    "ConvTranspose output_shape within padding": (lambda: _conv_transpose([6, 6]), False),
    "ConvTranspose negative front padding": (lambda: _conv_transpose([9, 9]), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_static_table_and_parser_agree(case: str) -> None:
    build, rejected = CASES[case]
    assert_agree(build(), rejected)


def test_uint8_zero_point_0_is_accepted_with_a_warning_saying_what_changes() -> None:
    """The parser takes a uint8 QuantizeLinear with zero point 0 and declares it int8: the
    range changes silently. Both checkers say so, on the Q node, with the fix."""
    static, real = assert_agree(_uint8_qdq_zero(), False)
    for result in filter(None, (static, real)):
        (warning,) = [f for f in result.warnings if f.rule == "quantization"]
        assert warning.location == "node 'q' (QuantizeLinear)"
        assert "127*scale" in warning.reason and "clamped to 0" in warning.reason
        assert "--requantize symmetric" in warning.fix


def test_an_int_input_read_as_a_shape_is_a_warning() -> None:
    """An int network input feeding Reshape's shape becomes a shape tensor: accepted, but an
    engine build needs its values in the profile. The table and the parser's network agree."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    built = model(nodes, [value("x", shape=(2, 6)), value("shape", _I64, [2])])
    for result in filter(None, assert_agree(built, False)):
        (warning,) = result.warnings
        assert "input 'shape' is a shape tensor" in warning.reason, result.checker
        assert "min/opt/max values" in warning.reason


def test_a_foreign_op_imported_by_name_is_a_warning() -> None:
    for result in filter(None, assert_agree(_foreign_relu(), False)):
        (warning,) = result.warnings
        assert "imported as ONNX Relu" in warning.reason


def test_ort_attention_has_its_own_verdict() -> None:
    """com.microsoft::Attention was judged by the ONNX Attention rules (a reason comparing
    its weights' and bias's shapes as if they were K and V)."""
    static, _ = assert_agree(_ort_attention(), True)
    (error,) = static.errors
    assert error.rule == "contrib" and "packed-QKV" in error.reason
    assert "--target tensorrt" in error.fix


def test_a_contrib_op_from_an_ort_fusion_gets_the_tensorrt_target_as_fix() -> None:
    static, real = assert_agree(_group_query_attention(False), True)
    for result in filter(None, (static, real)):
        assert "optimize the source model with graphopt optimize --target tensorrt" in (
            result.errors[0].fix
        )
