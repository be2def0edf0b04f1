"""The TensorRT backend without TensorRT: static rules, profiles, 2:4 detection, fix hints."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.tensorrt.findings import ERROR, WARNING
from graphopt.backends.tensorrt.hints import fix_for
from graphopt.backends.tensorrt.precision import graph_precisions, is_two_four
from graphopt.backends.tensorrt.profiles import parse_shapes, plan_profiles
from graphopt.backends.tensorrt.rules import static_findings
from graphopt.errors import UserInputError


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _info(name, elem=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _errors(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(f.rule, f.reason) for f in static_findings(model) if f.severity == ERROR]


def test_clean_model_has_no_errors() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_info("x")], [_info("y")])
    assert _errors(model) == []


def test_unknown_op_and_foreign_domain_are_errors() -> None:
    model = _model(
        [
            helper.make_node("Unique", ["x"], ["u"]),
            helper.make_node("FastGelu", ["u"], ["g"], domain="com.microsoft"),
            # The parser imports some com.microsoft ops by name (parser_data.CONTRIB_OPS).
            helper.make_node("Gelu", ["g"], ["y"], domain="com.microsoft"),
        ],
        [_info("x")],
        [_info("y")],
    )
    found = [(rule, reason.split(" ")[1]) for rule, reason in _errors(model)]
    assert found == [("op", "Unique"), ("op", "com.microsoft::FastGelu")]


def test_double_input_is_accepted_but_uint16_is_not() -> None:
    # Measured on TensorRT-RTX 1.7: DOUBLE inputs parse (cast on import); UINT16 does not.
    double = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [_info("x", TensorProto.DOUBLE)],
        [_info("y", TensorProto.DOUBLE)],
    )
    wide = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [_info("x", TensorProto.UINT16)],
        [_info("y", TensorProto.UINT16)],
    )
    assert _errors(double) == []
    assert [rule for rule, _ in _errors(wide)] == ["tensor-type", "tensor-type"]


def _dq(zero_point: np.ndarray, name: str = "dq") -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(8, dtype=zero_point.dtype).reshape(2, 4), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(zero_point, "z")
    return _model(
        [
            helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name=name),
            helper.make_node("Add", ["x", "wf"], ["y"]),
        ],
        [_info("x")],
        [_info("y")],
        [weight, scale, zp],
    )


def test_asymmetric_and_uint8_quantization_are_errors() -> None:
    assert _errors(_dq(np.array(0, np.int8))) == []
    ((rule, reason),) = _errors(_dq(np.array(3, np.int8)))
    assert rule == "quantization" and "zero point" in reason
    ((rule, reason),) = _errors(_dq(np.array(0, np.uint8)))
    assert rule == "quantization" and "uint8" in reason
    assert "--requantize symmetric" in fix_for("DequantizeLinear", reason)


def test_computed_axes_are_errors_constant_axes_are_not() -> None:
    def reduce(axes_constant: bool) -> onnx.ModelProto:
        axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
        return _model(
            [helper.make_node("ReduceSum", ["x", "axes"], ["y"])],
            [_info("x")] + ([] if axes_constant else [_info("axes", TensorProto.INT64, [1])]),
            [_info("y", shape=(2, 1))],
            [axes] if axes_constant else [],
            opset=18,
        )

    assert _errors(reduce(True)) == []
    ((rule, _),) = _errors(reduce(False))
    assert rule == "constant-input"


def test_layer_norm_extra_outputs_and_pool_dilation() -> None:
    scale = numpy_helper.from_array(np.ones(4, np.float32), "g")
    norm = _model(
        [helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"])],
        [_info("x")],
        [_info("y"), _info("mean", shape=(2, 1))],
        [scale],
    )
    pool = _model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2], dilations=[2])],
        [_info("x", shape=(1, 1, 8))],
        [_info("y", shape=(1, 1, 6))],
    )
    assert [r for r, _ in _errors(norm)] == ["outputs"]
    assert [r for r, _ in _errors(pool)] == ["attributes"]


def test_shape_computed_from_a_float_input_is_an_error() -> None:
    # The expanded Range: trip count = Cast(Ceil(limit / delta)); a Shape read stops the chain.
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"])],
        "body",
        [_info("i", TensorProto.INT64, []), _info("c", TensorProto.BOOL, [])],
        [_info("c_out", TensorProto.BOOL, [])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")

    def loop(count_from: str) -> onnx.ModelProto:
        return _model(
            [
                helper.make_node("Shape", ["limit"], ["shape"]),
                helper.make_node("Ceil", ["limit"], ["ceil"]),
                helper.make_node("Cast", [count_from], ["trips"], to=TensorProto.INT64),
                helper.make_node("Loop", ["trips", "cond"], [], body=body),
                helper.make_node("Identity", ["limit"], ["y"]),
            ],
            [_info("limit", shape=[1])],
            [_info("y", shape=[1])],
            [cond],
        )

    ((rule, reason),) = _errors(loop("ceil"))
    assert rule == "shape-input" and "float network input" in reason
    assert _errors(loop("shape")) == []


def test_split_with_a_negative_last_chunk_is_an_error_inside_a_branch() -> None:
    def split(size: int, parts: int) -> onnx.ModelProto:
        branch = helper.make_graph(
            [helper.make_node("Split", ["x"], [f"p{i}" for i in range(parts)], num_outputs=parts)],
            "then",
            [],
            [_info("p0", shape=[None])],
        )
        other = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["q"])], "else", [], [_info("q", shape=[None])]
        )
        return _model(
            [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
            [_info("c", TensorProto.BOOL, []), _info("x", shape=[size])],
            [_info("y", shape=[None])],
            opset=18,
        )

    # onnx/onnx#5766: 5 into 4 chunks of 2 leaves -1 for the last; 4 into 5 leaves 0 (taken).
    ((rule, reason),) = _errors(split(5, 4))
    assert rule == "shape" and "negative" in reason
    assert _errors(split(4, 5)) == []


def test_random_double_vector_matmul_scatter_and_mask_rules() -> None:
    random = _model(
        [helper.make_node("RandomUniformLike", ["x"], ["y"])],
        [_info("x", TensorProto.DOUBLE)],
        [_info("y", TensorProto.DOUBLE)],
    )
    assert "double" in _errors(random)[0][1]
    vector_first = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        [_info("a", shape=[4]), _info("b", shape=[2, 4, 1])],
        [_info("y", shape=[2, 1])],
    )
    vector_last = _model(
        [helper.make_node("MatMul", ["b", "a"], ["y"])],
        [_info("b", shape=[2, 3, 4]), _info("a", shape=[4])],
        [_info("y", shape=[2, 3])],
    )
    assert "1-D" in _errors(vector_first)[0][1] and _errors(vector_last) == []
    q, k, mask = (2, 3, 4, 8), (2, 3, 6, 8), (2, 3, 4, 4)
    attention = _model(
        [helper.make_node("Attention", ["q", "k", "v", "m"], ["y"])],
        [_info("q", shape=q), _info("k", shape=k), _info("v", shape=k), _info("m", shape=mask)],
        [_info("y", shape=q)],
        opset=23,
    )
    assert "does not broadcast" in _errors(attention)[0][1]


def test_dynamic_dims_are_a_warning() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])], [_info("x", shape=("batch", 4))], [_info("y")]
    )
    findings = static_findings(model)
    assert [f.severity for f in findings] == [WARNING]
    assert "batch" in findings[0].reason


def test_shapes_flag_parsing() -> None:
    parsed = parse_shapes(["x:min=1x3,opt=4x3,max=8x3"])
    assert parsed == {"x": ((1, 3), (4, 3), (8, 3))}
    for bad in ("x:min=1x3,opt=4x3", "x:min=4x3,opt=1x3,max=8x3", "x:min=1x3,opt=4,max=8x3"):
        with pytest.raises(UserInputError):
            parse_shapes([bad])


def test_profiles_given_fixed_and_derived() -> None:
    inputs = [
        ("image", (-1, 3, -1, -1), True),
        ("ids", (-1, -1), False),
        ("mask", (-1, -1), False),
        ("static", (1, 4), True),
    ]
    profiles = plan_profiles(
        inputs, parse_shapes(["mask:min=1x1,opt=2x64,max=4x256"]), {"ids": (2, 32)}
    )
    by_name = {p.name: p for p in profiles}
    assert set(by_name) == {"image", "ids", "mask"}  # the static input needs none
    assert (by_name["image"].min, by_name["image"].max) == ((1, 3, 224, 224), (8, 3, 224, 224))
    assert by_name["ids"].min == by_name["ids"].max == (2, 32)
    assert by_name["mask"].source == "--shapes" and by_name["mask"].opt == (2, 64)
    with pytest.raises(UserInputError, match="no network input"):
        plan_profiles(inputs, parse_shapes(["nope:min=1,opt=1,max=1"]), {})


def test_two_four_detection() -> None:
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((128, 64)).astype(np.float32)
    sparse = dense.copy()
    # Zero two of every four along the reduction axis (rows of a MatMul weight [K, N]).
    sparse.reshape(32, 4, 64)[:, :2, :] = 0
    assert is_two_four(sparse, 0) and not is_two_four(dense, 0)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_info("x", shape=(1, 128))],
        [_info("y", shape=(1, 64))],
        [numpy_helper.from_array(sparse, "w")],
    )
    found = graph_precisions(model)
    assert found.sparse_weights == ["w"] and found.holds("float32")


def _local_function_model() -> onnx.ModelProto:
    body = [helper.make_node("MatMul", ["a", "b"], ["t"]), helper.make_node("Relu", ["t"], ["c"])]
    function = helper.make_function(
        "local", "MyMM", ["a", "b"], ["c"], body, [helper.make_opsetid("", 17)]
    )
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MyMM", ["x", "W"], ["h"], domain="local"),
            helper.make_node("MyMM", ["h", "W"], ["y"], domain="local"),
        ],
        "g",
        [_info("x")],
        [_info("y")],
        [weight],
    )
    imports = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=imports, functions=[function])


def _loop_model(condition: str) -> onnx.ModelProto:
    one = numpy_helper.from_array(np.ones(4, np.float32), "one")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v", "one"], ["v2"]),
        ],
        "body",
        [
            _info("i", TensorProto.INT64, []),
            _info("cond_in", TensorProto.BOOL, []),
            _info("v", shape=(4,)),
        ],
        [_info("cond_out", TensorProto.BOOL, []), _info("v2", shape=(4,))],
        [one],
    )
    trip = numpy_helper.from_array(np.array(3, np.int64), "M")
    cond = numpy_helper.from_array(np.array(True), "cond")
    loop = helper.make_node("Loop", ["M", condition, "x"], ["y"], name="loop", body=body)
    return _model([loop], [_info("x", shape=(4,))], [_info("y", shape=(4,))], [trip, cond])


def test_local_functions_are_checked_by_their_bodies() -> None:
    """TensorRT's parser imports a local function's body: the static table called each call
    an op with "no importer" (2 errors where the parser has none)."""
    assert _errors(_local_function_model()) == []


def test_a_loop_without_a_condition_is_an_error() -> None:
    """The parser fails on an omitted Loop condition ("Node input was not registered"); the
    static table accepted it."""
    assert [rule for rule, _ in _errors(_loop_model(""))] == ["loop-condition"]
    assert _errors(_loop_model("cond")) == []


@pytest.mark.parametrize("case", ["function", "loop", "loop-cond"])
def test_the_parser_agrees_on_functions_and_loops(trt, case: str) -> None:
    from graphopt.backends.tensorrt.lint import lint_tensorrt

    model = {
        "function": _local_function_model,
        "loop": lambda: _loop_model(""),
        "loop-cond": lambda: _loop_model("cond"),
    }[case]()
    parsed = lint_tensorrt(model)
    assert parsed.checker.endswith("parser")
    assert bool(parsed.errors) == bool(_errors(model)), parsed.errors
