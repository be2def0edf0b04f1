"""Verification: error measures, dtypes ORT's Python API only takes as OrtValues, the
tolerance by float type, input shapes that cannot be fed or prove nothing, and an interrupt
while ONNX Runtime loads."""

from __future__ import annotations

import importlib.abc
import importlib.util
import signal
import sys

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.api import OptimizeOptions
from graphopt.errors import UserInputError
from graphopt.input_dims import check_input_shapes
from graphopt.output_errors import SIGMOID_RESOLUTION, compare
from graphopt.tolerances import DEFAULT_TOLERANCE, DTYPE_TOLERANCES, default_tolerance
from graphopt.verify import NothingToCompare, Verifier
from graphopt_tests.helpers import make_model, op_types, tensor_info
from graphopt_tests.passes.erasure.util import reshape_by_lying_value_info


def test_compare_measures_relative_to_largest_magnitude() -> None:
    ref = np.array([10.0, -20.0, 5.0], dtype=np.float32)
    got = np.array([10.0, -20.0, 5.2], dtype=np.float32)
    err = compare("y", ref, got)
    assert np.isclose(err.max_abs, 0.2, atol=1e-6)
    assert np.isclose(err.max_rel, 0.2 / 20.0, atol=1e-7)
    assert 0.999 < err.cosine <= 1.0


def test_compare_flags_shape_changes_and_nan_mismatch() -> None:
    assert not compare("y", np.zeros((2, 3)), np.zeros((3, 2))).shape_ok
    nan_ref = np.array([np.nan, 1.0])
    assert compare("y", nan_ref, np.array([np.nan, 1.0])).max_rel == 0.0
    assert compare("y", nan_ref, np.array([0.0, 1.0])).detail == "non-finite values differ"


def test_bfloat16_model_is_verified_not_skipped() -> None:
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [tensor_info("x", TensorProto.BFLOAT16, [2, 3])],
        [tensor_info("y", TensorProto.FLOAT, [2, 3])],
    )
    verifier = Verifier(model)
    assert verifier.feeds["x"].dtype == ml_dtypes.bfloat16
    assert verifier.check(model).ok
    broken = make_model(
        [
            helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
            helper.make_node("Neg", ["c"], ["y"]),
        ],
        [tensor_info("x", TensorProto.BFLOAT16, [2, 3])],
        [tensor_info("y", TensorProto.FLOAT, [2, 3])],
    )
    assert not verifier.check(broken).ok


def test_compare_counts_only_the_difference_beyond_the_resolution() -> None:
    ref = np.array([0.0, 2.0**-25], dtype=np.float32)
    quanta = np.array([3 * 2.0**-25, 0.0], dtype=np.float32)
    assert compare("y", ref, quanta).max_rel > 1e-2  # scale floor 1e-6: 9e-8 is 9% of it
    within = compare("y", ref, quanta, SIGMOID_RESOLUTION)
    assert within.max_rel == 0.0
    assert np.isclose(within.max_abs, 3 * 2.0**-25)  # the raw difference is still reported
    beyond = compare("y", ref, np.array([1e-6, 0.0], dtype=np.float32), SIGMOID_RESOLUTION)
    # Another direction than the reference's: measured against its own largest magnitude.
    assert np.isclose(beyond.max_rel, (1e-6 - SIGMOID_RESOLUTION) / 2.0**-25, rtol=1e-4)


def test_scale_floor_forgives_rounding_not_a_different_output() -> None:
    x = np.random.default_rng(0).standard_normal(16)
    ref = (x * 1e-12).astype(np.float32)
    # A sign flip or a 1000x scale of a tiny output is an error of 2 or 999, not 4.7e-6.
    assert np.isclose(compare("y", ref, -ref).max_rel, 2.0, rtol=1e-6)
    assert compare("y", ref, ref * 1000).max_rel > 100
    assert compare("y", ref, -ref).cosine == -1.0
    # Rounding of a ~0 output (same direction, same size) is still measured against 1e-6.
    noisy = (ref * (1 + 1e-3 * x)).astype(np.float32)
    assert compare("y", ref, noisy).max_rel < 1e-4
    # An all-zero side has no direction: absolute, as before.
    assert compare("y", np.zeros(4, np.float32), np.full(4, 1e-11, np.float32)).max_rel < 1e-4


def test_compare_cosine_of_huge_float64_is_finite() -> None:
    import warnings

    ref = np.array([1e155, -3e155, 2e155])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = compare("y", ref, ref.copy())
    assert error.cosine == 1.0


def _saturated(final: str, shift: float = 0.0):
    """y = final(x - 17) (+ shift): a map of ~1e-7..1e-6 on standard-normal inputs.

    Softplus(t) ~ Sigmoid(t) for t << 0, but it is not Sigmoid: no rounding allowance.
    """
    nodes = [helper.make_node("Add", ["x", "bias"], ["logit"])]
    out = "y" if not shift else "s"
    nodes.append(helper.make_node(final, ["logit"], [out]))
    initializers = {"bias": np.array([-17.0], dtype=np.float32)}
    if shift:
        nodes.append(helper.make_node("Add", ["s", "shift"], ["y"]))
        initializers["shift"] = np.array([shift], dtype=np.float32)
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [4, 64])],
        [tensor_info("y", TensorProto.FLOAT, [4, 64])],
        initializers,
    )


def test_sigmoid_outputs_allow_ort_sigmoid_rounding_only() -> None:
    verifier = Verifier(_saturated("Sigmoid"))
    assert verifier.resolutions == [SIGMOID_RESOLUTION]
    # A few quanta of ORT's sigmoid on a map whose max is ~1e-6: rounding, not a change.
    assert verifier.check(_saturated("Sigmoid", shift=2.0**-23)).ok
    moved = verifier.check(_saturated("Sigmoid", shift=2e-6))
    assert not moved.ok and "off by" in moved.reason
    # An output not produced by Sigmoid keeps the plain relative measure.
    softplus = Verifier(_saturated("Softplus"))
    assert softplus.resolutions == [0.0]
    assert not softplus.check(_saturated("Softplus", shift=2.0**-23)).ok


# ---- tolerance by float type -------------------------------------------------------------


def _conv_bn(dtype: int, seed: int = 0) -> ir.Model:
    """y = BatchNormalization(Conv(x)) in ``dtype``: fuse-conv-bn folds it exactly."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    arrays = {
        "w": rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72),
        "b": rng.standard_normal(16) * 0.1,
        "scale": rng.uniform(0.5, 2.0, 16),
        "bias": rng.standard_normal(16),
        "mean": rng.standard_normal(16) * 0.1,
        "var": rng.uniform(0.5, 2.0, 16),
    }
    return make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]),
        ],
        [tensor_info("x", dtype, [1, 8, 16, 16])],
        [tensor_info("y", dtype, [1, 16, 16, 16])],
        {name: a.astype(np_dtype) for name, a in arrays.items()},
    )


def test_default_tolerance_follows_the_float_type_the_model_computes_in() -> None:
    assert default_tolerance(_conv_bn(TensorProto.FLOAT)) == DEFAULT_TOLERANCE == 1e-4
    assert default_tolerance(_conv_bn(TensorProto.FLOAT16)) == 8 * 2.0**-10
    # float32 in and out, float16 inside: the float16 rounding is what a rewrite moves.
    mixed = make_model(
        [
            helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT),
        ],
        [tensor_info("x", TensorProto.FLOAT, [2, 3])],
        [tensor_info("y", TensorProto.FLOAT, [2, 3])],
    )
    assert default_tolerance(mixed) == DTYPE_TOLERANCES[ir.DataType.FLOAT16]
    bf16 = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [tensor_info("x", TensorProto.BFLOAT16, [2, 3])],
        [tensor_info("y", TensorProto.FLOAT, [2, 3])],
    )
    assert default_tolerance(bf16) == 8 * 2.0**-7
    assert Verifier(bf16).tolerance == 8 * 2.0**-7
    assert Verifier(bf16, tolerance=1e-6).tolerance == 1e-6


def test_exact_fusion_on_a_float16_model_is_kept_and_tolerance_overrides() -> None:
    model = _conv_bn(TensorProto.FLOAT16)
    result = graphopt.optimize(model)
    assert "BatchNormalization" not in op_types(result.model)
    assert result.report.rolled_back == [] and result.report.verified
    # The fold moves the float16 outputs by about half an ulp at the largest magnitude:
    # beyond float32's 1e-4, well inside 8 ulps (7.8e-3).
    assert 1e-4 < result.report.verification.worst_rel < 2.0**-10
    # An explicit tolerance applies whatever the type: at 1e-4 the fold is rolled back.
    strict = graphopt.optimize(model, options=OptimizeOptions(tolerance=1e-4))
    assert "fuse-conv-bn" in strict.report.rolled_back
    assert "BatchNormalization" in op_types(strict.model)


# ---- shapes that cannot be fed or prove nothing ------------------------------------------


def _relu(shape: list) -> ir.Model:
    return make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", TensorProto.FLOAT, shape)],
        [tensor_info("y", TensorProto.FLOAT, shape)],
    )


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 4, 1), "--input-shape x:1x4x1: input 'x' has rank 2 ([batch, 4]), not 3"),
        ((2, 5), "--input-shape x:2x5: axis 1 of input 'x' is fixed at 4 by the model"),
        ((0, 4), "--input-shape x:0x4: a zero-sized dim gives empty tensors"),
    ],
)
def test_bad_input_shapes_are_refused_before_anything_runs(shape, message: str) -> None:
    model = _relu(["batch", 4])
    with pytest.raises(UserInputError) as info:
        check_input_shapes(model, {"x": shape})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    with pytest.raises(UserInputError, match="--input-shape x:"):
        Verifier(model, {"x": shape})
    check_input_shapes(model, {"x": (3, 4)})  # a symbolic batch takes any size


def test_empty_outputs_are_not_called_verified() -> None:
    # A zero-sized dim the model fixes: every comparison of the empty outputs would pass.
    with pytest.raises(NothingToCompare, match=r"empty on the inputs used \(x 0x4\)"):
        Verifier(_relu([0, 4]))
    result = graphopt.optimize(_relu([0, 4]))
    assert result.report.verification is None and not result.report.verified
    assert "comparing empty tensors proves nothing" in result.report.verification_skipped


def test_outputs_nan_everywhere_are_not_called_verified() -> None:
    """y = Log(x - 10) @ W is NaN for every generated input: "verification passed, worst
    relative error 0" was said having compared nothing (compare failed the same pair)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "ten"], ["s"]),
            helper.make_node("Log", ["s"], ["l"]),
            helper.make_node("MatMul", ["l", "w"], ["m"]),
            helper.make_node("Identity", ["m"], ["y"]),
        ],
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(np.array(10, np.float32), "ten"),
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(NothingToCompare, match=r"empty or NaN everywhere .* --verify-inputs"):
        Verifier(model)
    result = graphopt.optimize(model)
    assert not result.report.verified and "proves nothing" in result.report.verification_skipped
    # Inputs in the model's domain verify it.
    feeds = {"x": np.full((2, 4), 11.0, np.float32)}
    assert Verifier(model, feeds=feeds).reference[0].size == 6


# ---- an interrupt while ONNX Runtime loads -------------------------------------------------


class _InterruptedImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import onnxruntime`` as Ctrl-C during its load leaves it.

    onnxruntime's extension imports numpy from C; numpy's import_array turns whatever is raised
    there, KeyboardInterrupt included, into ``ImportError("numpy... failed to import")``. The
    interrupt is delivered the way Python delivers a signal: the current SIGINT handler runs.
    """

    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime":
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        except KeyboardInterrupt:
            raise ImportError("numpy._core.multiarray failed to import") from None


@pytest.fixture
def interrupted_ort_import(monkeypatch):
    """The next ``import onnxruntime`` is interrupted (the real module comes back after)."""
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(), *sys.meta_path])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_while_importing_onnxruntime_stays_an_interrupt(interrupted_ort_import) -> None:
    # Before: the ImportError read as "ONNX Runtime cannot run the original model" and the
    # run went on unverified.
    with pytest.raises(KeyboardInterrupt):
        graphopt.optimize(_relu([2, 4]))


def test_sequence_optional_and_map_outputs_are_compared_element_by_element() -> None:
    from graphopt.output_errors import compare

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    same = compare("s", [a, a[:1]], [a.copy(), a[:1].copy()])
    assert same.max_rel == 0 and same.shape_ok
    moved = compare("s", [a, a], [a, a + 0.5])
    assert moved.max_rel == pytest.approx(0.5 / 5)
    assert not compare("s", [a], [a, a]).shape_ok  # a sequence of another length
    assert compare("o", None, None).max_rel == 0  # both optionals empty
    assert "optional present -> absent" in compare("o", a, None).detail
    assert compare("m", {1: 0.5, 2: 1.0}, {1: 0.5, 2: 1.0}).max_rel == 0
    assert "map keys differ" in compare("m", {1: 0.5}, {2: 0.5}).detail


@pytest.mark.parametrize("mode", [None, "fp16", "int8"])
def test_a_model_with_a_sequence_output_optimizes_and_verifies(mode) -> None:
    """Verification read every output as an array ('list' object has no attribute 'shape',
    exit 3 in every mode); fidelity measures a sequence over its elements."""
    # 4x8: fp16 keeps a 4x4 square weight float32 (the size of an epsilon table), and a run
    # that quantizes nothing is refused.
    weight = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            # A MatMul: int8 has a layer to quantize (a model without one is "nothing to do").
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Relu", ["m"], ["r"]),
            helper.make_node("SequenceConstruct", ["x", "r"], ["s"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [
            helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", 8]),
        ],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    flags = {} if mode is None else {"quantize": mode}
    if mode == "int8":
        flags["calib"] = "random"
    options = OptimizeOptions(**flags)
    result = graphopt.optimize(ir.serde.deserialize_model(model), None, options)
    assert result.report.verified
    if mode is not None:
        fidelity = next(iter(result.report.details["quantize"].fidelity.values()))
        assert [f.output for f in fidelity] == ["s", "r"]


def requantized_qdq_model(integer_path: bool = False, w_scale: float = 0.1) -> ir.Model:
    """x -> Q/DQ (u8) -> MatMul <- DQ(s8 block-sparse W) -> Q/DQ (u8) -> y: a model that rounds
    at run time. The output's scale is twice the product of the input scales, so the layer's
    integer sums land on the requantizer's rounding midpoints, where the float path (ORT with
    optimizations off) and an integer one (ORT's QLinearMatMul, graphopt's SparseQMatMul)
    round a whole step apart.

    ``integer_path``: the layer computed the integer way in standard ops
    (``MatMulInteger`` x the scales), an exact rewrite of it; ``w_scale``: the rewrite's weight
    scale (another value: a broken one)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, size=(64, 32)).astype(np.int8)
    w *= np.repeat(rng.random((16, 32)) < 0.5, 4, axis=0).astype(np.int8)
    sx = np.float32(0.1)
    inits = {
        "sx": np.array(sx, np.float32),
        "zx": np.array(128, np.uint8),
        "w": w,
        "sw": np.array(0.1, np.float32),
        "sy": np.array(np.float32(2) * (sx * np.float32(0.1)), np.float32),
        "zy": np.array(128, np.uint8),
    }
    quantize = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
    ]
    if integer_path:
        inits["zw"] = np.array(0, np.int8)
        inits["product"] = np.array(sx * np.float32(w_scale), np.float32)
        layer = [
            helper.make_node("MatMulInteger", ["xq", "w", "zx", "zw"], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["accf", "product"], ["h"]),
        ]
    else:
        layer = [
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
            helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"]),
            helper.make_node("MatMul", ["xd", "wd"], ["h"], name="qfc"),
        ]
    requantize = [
        helper.make_node("QuantizeLinear", ["h", "sy", "zy"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "sy", "zy"], ["y"]),
    ]
    return make_model(
        [*quantize, *layer, *requantize],
        [tensor_info("x", TensorProto.FLOAT, ["batch", 64])],
        [tensor_info("y", TensorProto.FLOAT, ["batch", 32])],
        inits,
        opset=21,
        ir_version=10,
    )


def test_a_model_rounding_at_run_time_allows_what_orts_own_optimizations_move() -> None:
    """ORT's fused integer kernel and the unoptimized float path round a step apart; an exact
    rewrite that computes the integer way is within that (and the note says so); a broken one
    still fails, and a model that does not round at run time gets no allowance."""
    from graphopt.tolerances import rounds_at_run_time

    model = requantized_qdq_model()
    assert rounds_at_run_time(model)
    verifier = Verifier(model)
    (floor,) = verifier.ort_floors
    assert floor > 100 * DEFAULT_TOLERANCE  # a whole requantization step, measured
    exact = verifier.check(requantized_qdq_model(integer_path=True))
    assert exact.outputs[0].max_rel > DEFAULT_TOLERANCE  # rolled back before the allowance
    assert exact.ok, exact.reason
    assert f"'y' {floor:.3g}" in exact.shape_note
    assert "optimizations already move its outputs" in exact.shape_note
    broken = verifier.check(requantized_qdq_model(integer_path=True, w_scale=0.105))
    assert not broken.ok
    assert "ONNX Runtime's optimizations move it too" in broken.reason
    # Weight-only quantization (QuantizeLinear of a constant) rounds nothing at run time.
    float_model = _relu(["n", 4])
    assert not rounds_at_run_time(float_model)
    assert Verifier(float_model).ort_floors == [0.0]
    weights_only = make_model(
        [
            helper.make_node("QuantizeLinear", ["c", "s"], ["cq"]),
            helper.make_node("DequantizeLinear", ["cq", "s"], ["cd"]),
            helper.make_node("Add", ["x", "cd"], ["y"]),
        ],
        [tensor_info("x", TensorProto.FLOAT, [4])],
        [tensor_info("y", TensorProto.FLOAT, [4])],
        {"c": np.arange(4, dtype=np.float32), "s": np.array(0.1, np.float32)},
        opset=21,
        ir_version=10,
    )
    assert not rounds_at_run_time(weights_only)


def test_rebased_reference_measures_its_own_allowance() -> None:
    """After a lossy pass the reference is its result (Verifier.rebased): a quantized one gets
    the allowance measured on it, and the pipeline's widened tolerance is not added to."""
    weight = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32) * 0.1
    original = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor_info("x", TensorProto.FLOAT, ["batch", 64])],
        [tensor_info("y", TensorProto.FLOAT, ["batch", 32])],
        {"w": weight},
    )
    verifier = Verifier(original)
    assert verifier.ort_floors == [0.0]
    rebased = verifier.rebased(requantized_qdq_model())
    (floor,) = rebased.ort_floors
    assert floor > 100 * DEFAULT_TOLERANCE
    assert rebased.tolerances(DEFAULT_TOLERANCE) == [floor + DEFAULT_TOLERANCE]
    assert rebased.tolerances(1.0) == [1.0]  # the pipeline's widened tolerance, as it was


def test_a_rewrite_that_takes_one_symbol_for_another_fails_at_the_second_shape() -> None:
    """S and T are 16 at the first shape; were they equal at the second too (32), copying x's
    S where the model reads y's T would pass both checks."""
    model = reshape_by_lying_value_info()
    verifier = Verifier(model)
    assert verifier.check(model).ok
    result = verifier.check(reshape_by_lying_value_info(copied=True))
    assert not result.ok and "S=32, T=8" in result.reason
    assert verifier.shapes == [
        "N=1, S=16, T=16: x 1x16x8, y 1x16x8",
        "N=2, S=32, T=8: x 2x32x8, y 2x8x8",
    ]


def test_dims_the_original_needs_equal_share_a_value_at_the_second_shape() -> None:
    """x[N, ?] + y[N, ?]: two unnamed dims (their own symbols) that the Add needs equal. At
    distinct values ORT rejects the original, so both move together and the report says so."""
    model = make_model(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [
            tensor_info("x", TensorProto.FLOAT, ["N", None]),
            tensor_info("y", TensorProto.FLOAT, ["N", None]),
        ],
        [tensor_info("z", TensorProto.FLOAT, ["N", None])],
    )
    verifier = Verifier(model)
    assert [f["y"].shape for f in verifier.input_sets] == [(1, 16), (2, 32)]
    assert verifier.shape_note.startswith("x[1], y[1] share a value at the second shape (the ")
    assert "fails when they differ" in verifier.shape_note


def _dead_half_precision(dead: str) -> ir.Model:
    """y = x * 2 in float32, next to a float16/bfloat16 value nothing reads."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"])]
    inputs = [tensor_info("x", TensorProto.FLOAT, ["N", 8])]
    if dead == "cast":
        nodes.append(helper.make_node("Cast", ["x"], ["unused"], to=TensorProto.BFLOAT16))
    else:
        inputs.append(tensor_info("h", TensorProto.FLOAT16, ["N", 8]))
    return make_model(
        nodes,
        inputs,
        [tensor_info("y", TensorProto.FLOAT, ["N", 8])],
        {"k": np.array(2.0, np.float32)},
    )


def _times(k: float) -> ir.Model:
    return make_model(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        [tensor_info("x", TensorProto.FLOAT, ["N", 8])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 8])],
        {"k": np.array(k, np.float32)},
    )


@pytest.mark.parametrize("dead", ["cast", "input"])
def test_a_dead_half_precision_value_does_not_loosen_the_tolerance(dead: str) -> None:
    # An unused Cast to bfloat16 (or an unused float16 input) made the tolerance 6.25e-2 for
    # a pure float32 output: a 5% change passed.
    model = _dead_half_precision(dead)
    assert default_tolerance(model) == DEFAULT_TOLERANCE
    verifier = Verifier(model)
    assert verifier.tolerance == DEFAULT_TOLERANCE
    result = verifier.check(_with_k(model, 2.1))
    assert not result.ok and "off by 0.05" in result.reason


def _with_k(model: ir.Model, k: float) -> ir.Model:
    changed = model.clone()
    changed.graph.initializers["k"].const_value = ir.tensor(np.array(k, np.float32))
    return changed


def test_the_tolerance_is_per_output_and_stated() -> None:
    # y computed through bfloat16, z in float32: each at its own default.
    def build(kz: float, ky: float) -> ir.Model:
        return make_model(
            [
                helper.make_node("Cast", ["x"], ["h"], to=TensorProto.BFLOAT16),
                helper.make_node("Cast", ["h"], ["c"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["c", "ky"], ["y"]),
                helper.make_node("Mul", ["x", "kz"], ["z"]),
            ],
            [tensor_info("x", TensorProto.FLOAT, [2, 8])],
            [
                tensor_info("y", TensorProto.FLOAT, [2, 8]),
                tensor_info("z", TensorProto.FLOAT, [2, 8]),
            ],
            {"ky": np.array(ky, np.float32), "kz": np.array(kz, np.float32)},
        )

    verifier = Verifier(build(2.0, 2.0))
    assert verifier.tolerance == DTYPE_TOLERANCES[ir.DataType.BFLOAT16]
    within = verifier.check(build(2.0, 2.02))  # 1% on the bfloat16 output: within 8 ulps
    assert within.ok
    assert within.tolerance_text == (
        "at tolerance 0.0625 for 'y' (bfloat16 in its computation), 0.0001 for the other outputs"
    )
    beyond = verifier.check(build(2.02, 2.0))  # 1% on the float32 output: not
    assert not beyond.ok and "'z' off by 0.01" in beyond.reason
    assert Verifier(_times(2.0)).check(_times(2.0)).tolerance_text == ""
    assert Verifier(_times(2.0), tolerance=1e-3).check(_times(2.0)).tolerance_text == (
        "at tolerance 0.001"
    )


def test_a_bool_output_with_many_flips_is_not_near_the_boundary() -> None:
    # t = x * w with w[0] = 1e6: every other element is within 1e-4 of 0 relative to the
    # largest compared value, so 7 of 8 flipped elements of t > 0 used to pass.
    w = np.ones(8, np.float32)
    w[0] = 1e6

    def build(sign: np.ndarray) -> ir.Model:
        model = make_model(
            [
                helper.make_node("Mul", ["x", "w"], ["t0"]),
                helper.make_node("Mul", ["t0", "s"], ["t"]),
                helper.make_node("Greater", ["t", "z"], ["y"]),
            ],
            [tensor_info("x", TensorProto.FLOAT, ["N", 8])],
            [tensor_info("y", TensorProto.BOOL, ["N", 8])],
            {"w": w, "s": sign, "z": np.array(0.0, np.float32)},
        )
        list(model.graph)[2].inputs[0].dtype = ir.DataType.FLOAT  # as shape inference says
        return model

    flip = -np.ones(8, np.float32)
    flip[0] = 1
    verifier = Verifier(build(np.ones(8, np.float32)))
    result = verifier.check(build(flip))
    assert not result.ok and "7 of 8 elements flipped" in result.reason
    assert verifier.check(build(np.ones(8, np.float32))).ok


def _random_model(k: float, seed: bool = False) -> ir.Model:
    """y = QDQ(Dropout(x), training) (random), z = x * k (not)."""
    dropout = helper.make_node(
        "Dropout", ["x", "ratio", "tm"], ["d"], **({"seed": 1} if seed else {})
    )
    return make_model(
        [
            dropout,
            helper.make_node("QuantizeLinear", ["d", "sc", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["y"]),
            helper.make_node("Mul", ["x", "k"], ["z"]),
        ],
        [tensor_info("x", TensorProto.FLOAT, ["N", 64])],
        [
            tensor_info("y", TensorProto.FLOAT, ["N", 64]),
            tensor_info("z", TensorProto.FLOAT, ["N", 64]),
        ],
        {
            "ratio": np.array(0.5, np.float32),
            "tm": np.array(True),
            "sc": np.array(0.05, np.float32),
            "zp": np.array(0, np.uint8),
            "k": np.array(k, np.float32),
        },
    )


def test_outputs_that_differ_between_runs_of_the_original_are_not_compared() -> None:
    verifier = Verifier(_random_model(2.0))
    assert verifier.nondeterministic == [0]
    assert verifier.ort_floors[0] == 0.0  # the run-to-run variation is not ORT's doing
    result = verifier.check(_random_model(2.0))
    assert result.ok, result.reason  # a correct candidate: y's variation rolls nothing back
    assert result.outputs[0].not_compared and not result.outputs[1].not_compared
    assert "not compared: the original's outputs ('y') differ between two runs" in (
        result.shape_note
    )
    assert "random ops without a seed: Dropout" in result.shape_note
    assert "'z' off by" in verifier.check(_random_model(2.1)).reason
    # Seeded: every session repeats it, so it is compared as before.
    assert Verifier(_random_model(2.0, seed=True)).nondeterministic == []


def test_a_model_whose_every_output_is_random_is_not_verified() -> None:
    model = make_model(
        [helper.make_node("Dropout", ["x", "ratio", "tm"], ["y"])],
        [tensor_info("x", TensorProto.FLOAT, ["N", 8])],
        [tensor_info("y", TensorProto.FLOAT, ["N", 8])],
        {"ratio": np.array(0.5, np.float32), "tm": np.array(True)},
    )
    with pytest.raises(NothingToCompare, match=r"differ between two runs .*Dropout"):
        Verifier(model)
