"""fp16, bf16 and fp8 quantization on a small Conv/MatMul/LayerNorm/Softmax graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.errors import UserInputError
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.passes.quantization.record import QuantRecord
from graphopt.registry import PassContext
from graphopt.sessions import make_session
from graphopt_tests.helpers import make_model, tensor_info

FLOAT = ir.DataType.FLOAT


def small_model(opset: int = 17, scale: float = 1.0) -> ir.Model:
    """x[1,3,8,8] -> Conv -> Relu -> flatten -> MatMul -> Mul(scale) -> LayerNorm -> Softmax."""
    rng = np.random.default_rng(0)
    initializers = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3,
        "b": rng.standard_normal(4).astype(np.float32) * 0.1,
        "shape": np.array([1, -1], np.int64),
        "m": rng.standard_normal((256, 16)).astype(np.float32) * 0.1,
        "k": np.full(16, scale, np.float32),
        "gamma": np.ones(16, np.float32),
        "beta": np.zeros(16, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "m"], ["h"], name="matmul"),
        helper.make_node("Mul", ["h", "k"], ["hk"], name="scale"),
        helper.make_node("LayerNormalization", ["hk", "gamma", "beta"], ["n"], name="ln"),
        helper.make_node("Softmax", ["n"], ["y"], axis=-1, name="softmax"),
    ]
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [tensor_info("y", TensorProto.FLOAT, [1, 16])],
        initializers,
        opset=opset,
    )


def quantize(model: ir.Model, **options) -> QuantRecord:
    graph_pass = QuantizePass(PassContext(), **options)
    graph_pass(model)
    return graph_pass.context.details["quantize"]


def calib_file(folder: Path, magnitude: float = 1.0) -> str:
    x = np.random.default_rng(3).standard_normal((12, 3, 8, 8)).astype(np.float32)
    path = folder / "calib.npz"
    np.savez(path, x=x * magnitude)
    return str(path)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return make_session(model).run(None, {"x": x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def precision(record: QuantRecord, node: str) -> tuple[str, str]:
    (layer,) = [layer for layer in record.layers if layer.node == node]
    return layer.precision, layer.reason


def dtypes(model: ir.Model) -> dict[str, ir.DataType | None]:
    """Element type of every named value of the main graph."""
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values()]
    values += [out for node in graph for out in node.outputs]
    return {v.name: v.dtype for v in values}


def test_fp16_runs_in_ort_with_float32_boundary_and_high_cosine():
    original, model = small_model(), small_model()
    record = quantize(model, mode="fp16")
    assert [v.dtype for v in model.graph.inputs] == [FLOAT]
    assert [v.dtype for v in model.graph.outputs] == [FLOAT]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert precision(record, "conv")[0] == "fp16"
    assert precision(record, "matmul")[0] == "fp16"
    assert model.graph.initializers["m"].dtype == ir.DataType.FLOAT16
    assert record.weight_bytes_after < 0.55 * record.weight_bytes_before
    # The emitted model itself runs on ORT's CPU provider.
    x = np.random.default_rng(7).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert cosine(run(original, x), run(model, x)) > 0.999
    assert record.fidelity_source.endswith("generated inputs (no --calib)")
    assert min(f.mean_cosine for rows in record.fidelity.values() for f in rows) > 0.999
    assert any("runs in ONNX Runtime CPU" in note for note in record.notes)


def test_type_change_list_is_complete():
    original = small_model()
    typed = io.load(onnx.shape_inference.infer_shapes(io.to_proto(original))).model
    before = dtypes(typed)
    model = small_model()
    record = quantize(model, mode="fp16")
    after = dtypes(model)
    listed = {change.tensor: (change.before, change.after) for change in record.type_changes}
    changed = {name for name in before if name in after and before[name] != after[name]}
    assert changed, "nothing was converted"
    assert changed <= set(listed), f"changed silently: {sorted(changed - set(listed))}"
    for name, (old, new) in listed.items():
        assert before[name] == FLOAT and old == "float"
        assert after[name].name.lower() == new
    # Every float16 tensor of the result is either listed or a Cast this pass inserted.
    for name, dtype in after.items():
        if dtype == ir.DataType.FLOAT16 and name not in listed:
            assert name not in before
            (producer,) = [n for n in model.graph if name in [o.name for o in n.outputs]]
            assert producer.op_type == "Cast"


def test_exclude_keeps_a_node_float32():
    model = small_model()
    record = quantize(model, mode="fp16", exclude="matmul")
    assert precision(record, "matmul") == ("float", "--exclude")
    (matmul,) = [n for n in model.graph if n.name == "matmul"]
    assert [v.dtype for v in (*matmul.inputs, *matmul.outputs)] == [FLOAT, FLOAT, FLOAT]
    assert model.graph.initializers["m"].dtype == FLOAT
    assert precision(record, "conv")[0] == "fp16"  # the exclusion is for that node only


def test_calibration_range_beyond_fp16_keeps_float32(tmp_path):
    # Inputs of magnitude ~1e4 push the Conv's output (and its input) past fp16's range/2,
    # and every tensor after it: nothing is left to convert, so the model is refused with
    # the reasons (it would come back as given).
    with pytest.raises(UserInputError, match=r"nothing to quantize.*exceeds the fp16 limit"):
        quantize(small_model(), mode="fp16", calib=calib_file(tmp_path, 2e4))
    # Only the Conv's input out of range (its output scaled back by the weights): the Conv
    # stays float32, the rest converts.
    model = small_model()
    weight = model.graph.initializers["w"]
    weight.const_value = ir.tensor(weight.const_value.numpy() * np.float32(1e-4))
    record = quantize(model, mode="fp16", calib=calib_file(tmp_path, 2e4))
    kept, reason = precision(record, "conv")
    assert kept == "float" and "x: max |x|" in reason and "exceeds the fp16 limit" in reason
    assert precision(record, "matmul")[0] == "fp16"
    assert set(record.fidelity) >= {"calibration", "held-out"}
    # The same graph on ordinary data converts the Conv: the range decided it.
    assert (
        precision(quantize(small_model(), mode="fp16", calib=calib_file(tmp_path)), "conv")[0]
        == "fp16"
    )


def test_without_calibration_generated_inputs_guard_the_fp16_range():
    # Weights inside fp16's range whose product is not (~1e5 on N(0, 1) inputs): with no
    # --calib the ranges come from generated inputs, so the layers that write or read it stay
    # float32, the one after converts, and the output stays finite (without any range it
    # overflowed to inf).
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "big"], ["h1"], name="up"),
        helper.make_node("MatMul", ["h1", "small"], ["h2"], name="down"),
        helper.make_node("Relu", ["h2"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "last"], ["y"], name="last"),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [2, 32])],
        [tensor_info("y", TensorProto.FLOAT, [2, 16])],
        {
            "big": (rng.standard_normal((32, 32)) * 4e3).astype(np.float32),
            "small": (rng.standard_normal((32, 32)) * 1e-3).astype(np.float32),
            "last": rng.standard_normal((32, 16)).astype(np.float32),
        },
    )
    original = model.clone()
    record = quantize(model, mode="fp16")
    for name in ("up", "down"):
        kept, reason = precision(record, name)
        assert kept == "float" and "h1: max |x|" in reason and "exceeds the fp16 limit" in reason
    assert precision(record, "last")[0] == "fp16"
    assert any("generated inputs (no --calib)" in note for note in record.notes)
    x = np.random.default_rng(5).standard_normal((2, 32)).astype(np.float32)
    got = make_session(model).run(None, {"x": x})[0]
    want = make_session(original).run(None, {"x": x})[0]
    assert np.isfinite(got).all() and cosine(want, got) > 0.999


def test_weight_beyond_fp16_keeps_its_reader_float32_without_calibration():
    model = small_model(scale=1e5)
    record = quantize(model, mode="fp16")
    kept, reason = precision(record, "scale")
    assert kept == "float" and "k: max |x|" in reason
    assert model.graph.initializers["k"].dtype == FLOAT


def test_bf16_fidelity_is_measured_on_a_simulation_and_said():
    model = small_model()
    record = quantize(model, mode="bf16")
    assert model.graph.initializers["m"].dtype == ir.DataType.BFLOAT16
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        make_session(model)  # why a simulation: ORT CPU has no bf16 kernels for these ops
    assert any(
        note.startswith(
            "bf16: fidelity measured on a float simulation of its rounding; ORT CPU "
            "cannot run bf16 "
        )
        for note in record.notes
    )
    assert record.ort_unrunnable
    cosines = [f.mean_cosine for rows in record.fidelity.values() for f in rows]
    max_rel = max(f.max_rel for rows in record.fidelity.values() for f in rows)
    # bf16 keeps 8 mantissa bits: well below fp16's error, but far from exact.
    assert min(cosines) > 0.999 and 1e-4 < max_rel < 0.05
    # One row per sample set, named a simulation: "ORT optimized" rows repeated the
    # simulation's numbers as if ORT's fused kernels, which cannot run bf16, had given them.
    assert list(record.fidelity) == ["generated, bf16 simulated"]


def test_fp8_needs_opset_19():
    with pytest.raises(UserInputError, match="--opset 19"):
        quantize(small_model(), mode="fp8", calib="random")


def test_fp8_at_opset_19_stores_e4m3_weights_behind_dequantize(tmp_path):
    original, model = small_model(19), small_model(19)
    record = quantize(model, mode="fp8", calib=calib_file(tmp_path))
    dequantize = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    weights = [n for n in dequantize if n.inputs[0].is_initializer()]
    assert len(weights) == 2
    assert all(n.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN for n in weights)
    assert {n.op_type for n in model.graph} >= {"QuantizeLinear", "DequantizeLinear"}
    assert "w" not in model.graph.initializers and "m" not in model.graph.initializers
    assert record.weight_bytes_after < 0.3 * record.weight_bytes_before
    assert {c.after for c in record.type_changes} == {"float8e4m3fn"}
    x = np.random.default_rng(7).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert cosine(run(original, x), run(model, x)) > 0.99
    assert record.fidelity["held-out"][0].mean_cosine > 0.99


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_same_input_same_bytes(mode):
    first, second = small_model(), small_model()
    quantize(first, mode=mode)
    quantize(second, mode=mode)
    assert io.to_proto(first).SerializeToString() == io.to_proto(second).SerializeToString()


def test_fp8_behind_a_clip_measures_fidelity_without_ort_optimizations(tmp_path):
    # ORT 1.32's optimizer fails the session on Clip -> float8 QuantizeLinear (and drops a
    # Relu in front of one): the record measures the model's own numerics, optimizations off.
    model = small_model(19)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.op_type = "Clip"
    relu.version = None
    low = ir.Value(name="clip_min", const_value=ir.tensor(np.array(0.0, np.float32)))
    high = ir.Value(name="clip_max", const_value=ir.tensor(np.array(6.0, np.float32)))
    for value in (low, high):
        model.graph.register_initializer(value)
    relu.resize_inputs(3)
    relu.replace_input_with(1, low)
    relu.replace_input_with(2, high)
    record = quantize(model, mode="fp8", calib=calib_file(tmp_path))
    assert set(record.fidelity) == {"calibration", "held-out"}
    assert record.fidelity["held-out"][0].mean_cosine > 0.99
    assert any("optimizations off" in note for note in record.notes)


def test_fp8_same_input_same_bytes(tmp_path):
    first, second = small_model(19), small_model(19)
    quantize(first, mode="fp8", calib=calib_file(tmp_path))
    quantize(second, mode="fp8", calib=calib_file(tmp_path))
    assert io.to_proto(first).SerializeToString() == io.to_proto(second).SerializeToString()


def branchy_model() -> ir.Model:
    """h = x @ w read inside both If branches (outer-scope capture), then Relu."""
    rng = np.random.default_rng(1)
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 8])
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["h", "h"], ["o"], name="then_add")], "then", [], [out]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["o"], name="else_neg")], "else", [], [out]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node(
            "If", ["cond"], ["z"], then_branch=then_graph, else_branch=else_graph, name="if"
        ),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [1, 4]), tensor_info("cond", TensorProto.BOOL, [])],
        [tensor_info("y", TensorProto.FLOAT, [1, 8])],
        {"w": rng.standard_normal((4, 8)).astype(np.float32)},
    )


def test_if_bodies_stay_float32_with_casts_at_their_boundary():
    original, model = branchy_model(), branchy_model()
    record = quantize(model, mode="fp16")
    assert precision(record, "matmul")[0] == "fp16"
    kept, reason = precision(record, "if")
    assert kept == "float" and "subgraph" in reason
    x = np.random.default_rng(2).standard_normal((1, 4)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        want = make_session(original).run(None, feeds)[0]
        got = make_session(model).run(None, feeds)[0]
        assert cosine(want, got) > 0.999


def test_an_epsilon_fp16_cannot_hold_keeps_its_reader_float32():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Mul", ["h", "h"], ["sq"], name="square"),
        helper.make_node("Add", ["sq", "eps"], ["v"], name="add_eps"),
        helper.make_node("Sqrt", ["v"], ["y"], name="sqrt"),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [1, 4])],
        [tensor_info("y", TensorProto.FLOAT, [1, 8])],
        {
            "w": np.ones((4, 8), np.float32),
            "eps": np.array(1e-12, np.float32),
        },
    )
    record = quantize(model, mode="fp16")
    kept, reason = precision(record, "add_eps")
    assert kept == "float" and "epsilon" in reason
    assert model.graph.initializers["eps"].dtype == FLOAT
    assert precision(record, "square")[0] == "fp16"


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_through_the_pipeline_with_verification(tmp_path, mode):
    from graphopt import api

    source = tmp_path / "small.onnx"
    io.save(small_model(), source)
    result = api.optimize(source, tmp_path / "out.onnx", api.OptimizeOptions(quantize=mode))
    record = result.report.details["quantize"]
    assert record.mode == mode
    written = io.load(tmp_path / "out.onnx").model
    low = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}[mode]
    assert written.graph.initializers["m"].dtype == low
    if mode == "bf16":
        # ORT CPU cannot run it: its change is measured on a simulation (no lossy_check);
        # exact passes after it would be unverified, and none changed the model here.
        report = result.report
        assert report.lossy_unrunnable == "quantize" and report.lossy_check is None
        assert not report.unverified_after and report.verified
    else:
        assert result.report.lossy_check is not None and result.report.lossy_check.outputs


def test_short_reductions_convert_long_ones_stay_float32():
    nodes = [
        helper.make_node("Conv", ["a", "wa"], ["ra"], name="conv"),
        helper.make_node("ReduceMean", ["ra"], ["pooled"], axes=[2, 3], name="pool"),
        helper.make_node("Relu", ["pooled"], ["y1"], name="relu_pooled"),
        helper.make_node("MatMul", ["b", "wb"], ["rb"], name="matmul"),
        helper.make_node("ReduceSum", ["rb", "axes"], ["total"], name="sum"),
        helper.make_node("Relu", ["total"], ["y2"], name="relu_total"),
    ]
    model = make_model(
        nodes,
        [
            tensor_info("a", TensorProto.FLOAT, ["N", 8, 7, 7]),
            tensor_info("b", TensorProto.FLOAT, ["N", 512]),
        ],
        [
            tensor_info("y1", TensorProto.FLOAT, ["N", 8, 1, 1]),
            tensor_info("y2", TensorProto.FLOAT, ["N", 1]),
        ],
        {
            "axes": np.array([1], np.int64),
            "wa": np.full((8, 8, 1, 1), 0.1, np.float32),
            "wb": np.full((512, 512), 0.01, np.float32),
        },
    )
    record = quantize(model, mode="fp16")
    assert precision(record, "pool")[0] == "fp16"  # 49 elements per output value
    kept, reason = precision(record, "sum")  # 512
    assert kept == "float" and "risky" in reason
    assert precision(record, "relu_pooled")[0] == "fp16"
    # With the long sum kept float32, the Relu after it has nothing to share fp16 with.
    kept, reason = precision(record, "relu_total")
    assert kept == "float" and "would only add Casts" in reason
    assert any("ReduceSum" in note for note in record.notes)


def test_a_weightless_chain_between_float32_ops_is_not_converted():
    # With Conv and MatMul excluded, Relu, Reshape and the Mul by 16 scalars have no weight
    # to shrink: converting them would only add Casts.
    model = small_model()
    # Nothing else converts either: refused, the chain's reason named.
    with pytest.raises(UserInputError, match=r"Mul, Relu, Reshape: no weight .* only add Casts"):
        quantize(model, mode="fp16", exclude="Conv,MatMul")
    assert not [n for n in model.graph if n.op_type == "Cast"]
    # The same chain next to a converted MatMul joins it: one Cast where it starts.
    record = quantize(small_model(), mode="fp16", exclude="Conv")
    assert precision(record, "relu")[0] == "fp16"


@pytest.mark.slow
def test_gpt2_fp16_keeps_its_exact_fusions_and_is_a_fixed_point():
    # GPT-2's Reshape→Gemm→Reshape → MatMul moves fp16 rounding by 2.5e-4: at the default
    # tolerance that rolled the fusion back, and optimizing the output again then applied it.
    # The exact passes after fp16 are checked at the model's own error against the original.
    from graphopt import api, models
    from graphopt_tests.models.cases import require

    require("gpt2_tiny")
    options = api.OptimizeOptions(target="ort", quantize="fp16")
    result = api.optimize(models.get("gpt2_tiny"), None, options)
    assert not result.report.rolled_back
    record = result.report.details["quantize"]
    assert 0 < record.exact_tolerance_after < 1e-2
    again = api.optimize(result.model, None, api.OptimizeOptions(target="ort"))
    assert [n.op_type for n in again.model.graph] == [n.op_type for n in result.model.graph]


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "fp16", "bf16"])
def test_a_model_already_in_fp16_is_refused_not_left_as_it_is(tmp_path, mode):
    """Every Conv/MatMul computes in float16: these modes start from float32 and would
    quantize nothing, so the user hears why instead of getting the model back unchanged."""
    model = small_model()
    quantize(model, mode="fp16")
    with pytest.raises(UserInputError, match="already computes in float16"):
        quantize(model, mode=mode, calib=calib_file(tmp_path))


def test_bf16_twice_is_refused_where_conv_stayed_float32(tmp_path):
    """bf16 keeps Conv in float32 before opset 22, so its output still has float32 layers;
    a second bf16 run failed inside ORT (which runs no bf16 Gemm) under another pass's name."""
    model = small_model()
    quantize(model, mode="bf16")
    types = {n.op_type: n.inputs[0].dtype for n in model.graph if n.op_type in ("Conv", "MatMul")}
    assert types["Conv"] == ir.DataType.FLOAT and ir.DataType.BFLOAT16 in types.values()
    with pytest.raises(UserInputError, match="already computes partly in bfloat16"):
        quantize(model, mode="bf16")


def test_int4_weight_takes_a_model_already_in_fp16():
    """MatMulNBits takes float16 activations: int4-weight is no reason to refuse."""
    model = small_model()
    quantize(model, mode="fp16")
    graph_pass = QuantizePass(PassContext(target="ort"), mode="int4-weight")
    graph_pass(model)
    assert precision(graph_pass.context.details["quantize"], "matmul")[0].startswith("int4")


def _attribute_typed_model(maker: str) -> ir.Model:
    """x[N,16] -> MatMul -> a; ``maker`` builds a float tensor shaped like ``a`` whose type an
    attribute sets (or, with no attribute, the default float32); y = a + that tensor."""
    makers = {
        "ConstantOfShape": [
            helper.make_node("Shape", ["a"], ["s"], name="shape"),
            helper.make_node(
                "ConstantOfShape",
                ["s"],
                ["c"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]),
                name="maker",
            ),
        ],
        "ConstantOfShape (no value)": [
            helper.make_node("Shape", ["a"], ["s"], name="shape"),
            helper.make_node("ConstantOfShape", ["s"], ["c"], name="maker"),
        ],
        "EyeLike": [helper.make_node("EyeLike", ["a"], ["c"], name="maker")],
        "EyeLike (dtype)": [
            helper.make_node("EyeLike", ["a"], ["c"], dtype=TensorProto.FLOAT, name="maker")
        ],
        "RandomUniformLike": [
            helper.make_node(
                "RandomUniformLike",
                ["a"],
                ["c"],
                dtype=TensorProto.FLOAT,
                low=0.0,
                high=0.0,
                seed=1.0,
                name="maker",
            )
        ],
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="matmul"),
        *makers[maker],
        helper.make_node("Add", ["a", "c"], ["y"], name="add"),
    ]
    weight = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32) * 0.3
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["N", 16])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 16])],
        {"w": weight},
    )


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
@pytest.mark.parametrize(
    "maker",
    [
        "ConstantOfShape",
        "ConstantOfShape (no value)",
        "EyeLike",
        "EyeLike (dtype)",
        "RandomUniformLike",
    ],
)
def test_ops_whose_output_type_an_attribute_sets_stay_float32_and_the_model_is_valid(mode, maker):
    """Retyping such an op's output alone (ConstantOfShape's float32 ``value`` under a
    float16 output) wrote a model ONNX and ORT reject, reported as verified."""
    original, model = _attribute_typed_model(maker), _attribute_typed_model(maker)
    record = quantize(model, mode=mode)
    kept, reason = precision(record, "maker")
    assert kept == "float" and ("output type is set by" in reason or "allows no" in reason)
    assert precision(record, "matmul")[0] == mode
    onnx.checker.check_model(io.to_proto(model), full_check=True)
    if mode == "fp16":
        x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
        assert cosine(run(original, x), run(model, x)) > 0.999


def test_a_conversion_onnx_rejects_is_an_error_not_a_simulation(monkeypatch):
    """A planning mistake that leaves an op computing float32 under a float16 label is raised
    (exit 3: a bug), not measured on a float simulation as 'ORT lacks the kernel'."""
    from graphopt.passes.quantization import float_plan, float_types

    real = float_types.plan_conversion

    def careless(model: ir.Model, *args, **kwargs) -> float_plan.Plan:
        plan = real(model, *args, **kwargs)
        for node in model.graph:
            if node.op_type == "ConstantOfShape":
                plan.convert[id(node)] = ((), (0,))
        return plan

    monkeypatch.setattr(float_types, "plan_conversion", careless)
    for mode in ("fp16", "bf16"):
        with pytest.raises(float_types.ConversionError, match="fails ONNX type checking"):
            quantize(_attribute_typed_model("ConstantOfShape"), mode=mode)


def test_only_a_missing_low_precision_kernel_routes_to_the_simulation():
    """ORT's type errors are the model's fault: fidelity_on_runnable raises them. Its
    NOT_IMPLEMENTED for a bf16 op is what the simulation stands in for."""
    from graphopt.passes.calibration.samples import random_calibration
    from graphopt.passes.quantization.float_simulation import fidelity_on_runnable

    original = _attribute_typed_model("ConstantOfShape")
    broken = original.clone()
    (maker,) = [n for n in broken.graph if n.op_type == "ConstantOfShape"]
    maker.outputs[0].type = ir.TensorType(ir.DataType.FLOAT16)  # value stays float32
    sets = {"generated": random_calibration(original, {}, count=4)}
    with pytest.raises(Exception, match="Type"):
        fidelity_on_runnable(original, broken, sets, ir.DataType.FLOAT16)
    lowered = small_model()
    record = quantize(lowered, mode="bf16")
    assert record.ort_unrunnable.startswith("ORT CPU cannot run bf16 ")
    sets = {"generated": random_calibration(small_model(), {}, count=4)}
    _, note, why = fidelity_on_runnable(small_model(), lowered, sets, ir.DataType.BFLOAT16)
    assert "float simulation" in note and why


def test_a_weight_that_is_also_an_output_gives_its_readers_a_stored_low_copy():
    # It stayed float32 with a Cast at run time before the MatMul; constant-folding that
    # Cast later moved the output (ORT's fp16 MatMul takes another path for a constant B)
    # and was rolled back.
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 16)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor_info("x", TensorProto.FLOAT, ["n", 16])],
        [
            tensor_info("y", TensorProto.FLOAT, ["n", 16]),
            tensor_info("w", TensorProto.FLOAT, [16, 16]),
        ],
        {"w": weight},
    )
    quantize(model, mode="fp16")
    (matmul,) = [node for node in model.graph if node.op_type == "MatMul"]
    read = matmul.inputs[1]
    assert read.const_value is not None and read.dtype == ir.DataType.FLOAT16
    assert not any(node.op_type == "Cast" and node.inputs[0].name == "w" for node in model.graph)
    output = next(v for v in model.graph.outputs if v.name == "w")
    assert output.dtype == ir.DataType.FLOAT and np.array_equal(output.const_value.numpy(), weight)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    session = make_session(model)
    y, w = session.run(None, {"x": x})
    assert np.array_equal(w, weight)
    np.testing.assert_allclose(y, x @ weight, rtol=2e-2, atol=2e-2)
