"""Exact passes respect Q/DQ (issue 14 item 6): a quantized model stays quantized.

Models are quantized by ONNX Runtime's own tool (``quantize_static`` in QDQ and QOperator
formats, ``quantize_dynamic``) and run through ``graphopt.api.optimize`` (default pipeline,
portable and ``--target ort``). After it:

- every DequantizeLinear of an integer initializer is still there, reading the same
  integer data (constant folding never turns it back into a float weight, no fusion bakes
  its float values into a new weight);
- the Q/DQ nodes and the quantized ops (QLinear*, *Integer) are as many as before: fusions
  keep Q/DQ pairs, CSE does not merge the pair-per-consumer ORT's DedicatedQDQPair writes;
- the integer tensors are the same (identical copies may be merged by dedup);
- the weights take no more room: initializer bytes within 1%, and the file less the shape
  annotations and provenance graphopt always writes within 1% (plus a few hundred bytes for
  the graphs of four nodes, where a fused node's name and domain alone are 5%);
- verification (ORT, optimizations off) passes, and optimizing the output again gives the
  same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt_tests.helpers import import_or_skip

QUANT_REASON = "the models are quantized with onnxruntime.quantization"
Q_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# Integer element types of quantized data (int64 tensors are shapes, axes, indices).
QUANT_INT_TYPES = frozenset(
    {
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT16,
        TensorProto.UINT16,
        TensorProto.INT32,
        TensorProto.INT4,
        TensorProto.UINT4,
    }
)


def _init(rng, name, shape, low=None, high=None):
    if low is not None:
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def _conv_bn_relu_conv(rng):
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"]),
    ]
    inits = [
        _init(rng, "w1", (8, 3, 3, 3)),
        _init(rng, "b1", (8,)),
        _init(rng, "g", (8,), 0.5, 1.5),
        _init(rng, "be", (8,)),
        _init(rng, "m", (8,)),
        _init(rng, "v", (8,), 0.5, 1.5),
        _init(rng, "w2", (4, 8, 1, 1)),
    ]
    return nodes, inits, ["N", 3, 8, 8], 17


def _matmul_add_gelu_matmul(rng):
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Add", ["a", "b1"], ["b"]),
        helper.make_node("Gelu", ["b"], ["c"]),
        helper.make_node("MatMul", ["c", "w2"], ["y"]),
    ]
    inits = [_init(rng, "w1", (16, 32)), _init(rng, "b1", (32,)), _init(rng, "w2", (32, 8))]
    return nodes, inits, ["N", 4, 16], 20


def _residual_add(rng):
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["s"]),
        helper.make_node("Conv", ["s", "w2", "b2"], ["y"]),
    ]
    inits = [_init(rng, "w1", (4, 4, 3, 3)), _init(rng, "w2", (4, 4, 1, 1)), _init(rng, "b2", (4,))]
    return nodes, inits, ["N", 4, 8, 8], 17


def _concat(rng):
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Conv", ["x", "w2"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "w3"], ["y"]),
    ]
    inits = [
        _init(rng, "w1", (4, 3, 1, 1)),
        _init(rng, "w2", (4, 3, 1, 1)),
        _init(rng, "w3", (2, 8, 1, 1)),
    ]
    return nodes, inits, ["N", 3, 8, 8], 17


GRAPHS = {
    "conv_bn_relu_conv": _conv_bn_relu_conv,
    "matmul_add_gelu_matmul": _matmul_add_gelu_matmul,
    "residual_add": _residual_add,
    "concat": _concat,
}
# (name, how): QDQ and QOperator static, QDQ with a pair per consumer, dynamic.
FORMATS = ("qdq", "qdq_dedicated", "qoperator", "dynamic")


def _float_model(folder: Path, graph: str) -> tuple[Path, list]:
    rng = np.random.default_rng(0)
    nodes, inits, shape, opset = GRAPHS[graph](rng)
    proto = helper.make_model(
        helper.make_graph(
            nodes,
            graph,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    path = folder / f"{graph}.onnx"
    onnx.save(proto, path)
    return path, shape


def _quantize(source: Path, out: Path, fmt: str, samples: list[dict[str, np.ndarray]]) -> Path:
    quant = import_or_skip("onnxruntime.quantization", QUANT_REASON)
    if fmt == "dynamic":
        quant.quantize_dynamic(source, out, weight_type=quant.QuantType.QInt8)
        return out
    kind = quant.QuantFormat.QOperator if fmt == "qoperator" else quant.QuantFormat.QDQ
    extra = {"DedicatedQDQPair": True} if fmt == "qdq_dedicated" else {}
    quant.quantize_static(
        source, out, _reader(quant, samples), quant_format=kind, extra_options=extra
    )
    return out


def _digest(tensor: onnx.TensorProto) -> str:
    array = numpy_helper.to_array(tensor)
    return f"{tensor.data_type}:{array.shape}:" + hashlib.sha256(array.tobytes()).hexdigest()


def _facts(path: Path) -> dict:
    """What must not change: Q/DQ and quantized ops, integer data, sizes."""
    model = onnx.load(path)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dq_of_int = sorted(
        _digest(inits[n.input[0]])
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type in QUANT_INT_TYPES
    )
    quantized_ops = sorted(
        n.op_type
        for n in graph.node
        if n.op_type in Q_OPS or n.op_type.startswith("QLinear") or n.op_type.endswith("Integer")
    )
    int_data = {_digest(t) for t in graph.initializer if t.data_type in QUANT_INT_TYPES}
    # graphopt writes every inferred shape (value_info) and its provenance (metadata): the
    # model without them is what must not grow.
    del graph.value_info[:]
    del model.metadata_props[:]
    core_bytes = len(model.SerializeToString())
    return {
        "dq_of_int": dq_of_int,
        "quantized_ops": quantized_ops,
        "int_data": int_data,
        "init_bytes": sum(len(t.SerializeToString()) for t in graph.initializer),
        "core_bytes": core_bytes,
    }


def _optimize_twice(source: Path, folder: Path, target: str):
    from graphopt import api

    first, second = folder / f"opt_{target}.onnx", folder / f"opt2_{target}.onnx"
    result = api.optimize(source, first, api.OptimizeOptions(target=target))
    api.optimize(first, second, api.OptimizeOptions(target=target))
    return result, first, second


def _assert_still_quantized(source: Path, folder: Path, target: str, slack: int = 0) -> None:
    """``slack``: bytes a graph of a few nodes may grow by without any weight changing (a
    fused contrib node carries a name, its domain and an opset import: ~100 bytes)."""
    result, out, again = _optimize_twice(source, folder, target)
    before, after = _facts(source), _facts(out)
    assert after["dq_of_int"] == before["dq_of_int"], "a DequantizeLinear of integer data went"
    assert after["quantized_ops"] == before["quantized_ops"]
    assert after["int_data"] == before["int_data"]
    assert after["init_bytes"] <= before["init_bytes"] * 1.01
    assert after["core_bytes"] <= 1.01 * before["core_bytes"] + slack
    assert result.report.verified, result.report.verification_skipped
    assert out.read_bytes() == again.read_bytes(), "a second optimize changed the output"


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_ort_quantized_graphs_stay_quantized(tmp_path, graph, fmt, target):
    source, shape = _float_model(tmp_path, graph)
    rng = np.random.default_rng(1)
    sample_shape = [1, *shape[1:]]
    samples = [{"x": rng.standard_normal(sample_shape).astype(np.float32)} for _ in range(8)]
    quantized = _quantize(source, tmp_path / f"{graph}.{fmt}.onnx", fmt, samples)
    _assert_still_quantized(quantized, tmp_path, target, slack=256)


def test_dedicated_qdq_pairs_are_not_merged(tmp_path):
    """ORT's DedicatedQDQPair gives each consumer of ``x`` its own Q/DQ pair; CSE keeps them."""
    from graphopt import api

    source, shape = _float_model(tmp_path, "residual_add")
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal([1, *shape[1:]]).astype(np.float32)} for _ in range(4)]
    quantized = _quantize(source, tmp_path / "dedicated.onnx", "qdq_dedicated", samples)
    out = tmp_path / "out.onnx"
    api.optimize(quantized, out, api.OptimizeOptions())

    def pairs_reading_x(path: Path) -> int:
        return sum(
            n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in onnx.load(path).graph.node
        )

    assert pairs_reading_x(quantized) == 2
    assert pairs_reading_x(out) == 2


@pytest.mark.torch
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_quantized_digits_cnn_stays_quantized(tmp_path, per_channel):
    """The trained digits CNN, quantized on its calibration split (QDQ)."""
    from graphopt_tests.models.cases import require

    require("digits")
    from graphopt import models
    from graphopt.calibration import load_npz
    from graphopt.models import digits

    calib = load_npz(digits.write_calib_npz(tmp_path / "calib.npz", "calib", 64))["input"]
    samples = [{"input": calib[i : i + 8]} for i in range(0, len(calib), 8)]
    quant = import_or_skip("onnxruntime.quantization", QUANT_REASON)
    quantized = tmp_path / "digits.qdq.onnx"
    quant.quantize_static(
        models.get("digits"),
        quantized,
        _reader(quant, samples),
        quant_format=quant.QuantFormat.QDQ,
        per_channel=per_channel,
    )
    for target in ("portable", "ort"):
        _assert_still_quantized(quantized, tmp_path, target)


def _reader(quant, samples):
    class Reader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(samples)

        def get_next(self):
            return next(self.samples, None)

    return Reader()


@pytest.mark.torch
def test_dynamically_quantized_bert_is_a_fixed_point_with_ort_fusions(tmp_path):
    """ORT's quantizer adds values without value_info (``x_quantized`` after a LayerNorm
    declared ``[batch, sequence, 128]``): their dims must come out final in the first run,
    or a second optimize refines them and changes the bytes."""
    from graphopt_tests.models.cases import require

    require("bert_tiny")
    from graphopt import models

    quant = import_or_skip("onnxruntime.quantization", QUANT_REASON)
    quantized = tmp_path / "bert_tiny.dyn.onnx"
    quant.quantize_dynamic(models.get("bert_tiny"), quantized, weight_type=quant.QuantType.QInt8)
    _assert_still_quantized(quantized, tmp_path, "ort")


def _weight_only(follow: str, rng) -> onnx.ModelProto:
    """x → op(x, DequantizeLinear(int8 weight)) → an affine ``follow`` a fusion would fold."""
    conv = follow.startswith("conv")
    shape = (8, 3, 3, 3) if conv else (16, 8)
    weight = rng.integers(-127, 128, shape).astype(np.int8)
    inits = [
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node(
            "DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0 if conv else 1
        )
    ]
    nodes.append(helper.make_node("Conv" if conv else "MatMul", ["x", "w"], ["p"]))
    params = (1, 8, 1, 1) if conv else (8,)
    if follow == "conv_bn":
        for name in ("g", "b", "m", "v"):
            inits.append(_init(rng, name, (8,), 0.5, 1.5))
        nodes.append(helper.make_node("BatchNormalization", ["p", "g", "b", "m", "v"], ["y"]))
    else:  # Mul then Add by constants: scale_into_weights / conv_affine / matmul_add territory
        inits += [_init(rng, "s", params, 0.5, 1.5), _init(rng, "t", params)]
        nodes += [
            helper.make_node("Mul", ["p", "s"], ["q"]),
            helper.make_node("Add", ["q", "t"], ["y"]),
        ]
    shape_in = ["N", 3, 8, 8] if conv else ["N", 16]
    return helper.make_model(
        helper.make_graph(
            nodes,
            follow,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("follow", ["conv_bn", "conv_mul_add", "matmul_mul_add"])
def test_weight_only_dequantized_weights_are_not_baked_into_float(tmp_path, follow, target):
    """Conv+BN, Conv/MatMul+Mul+Add would fold into the weight if it were a float constant:
    behind a DequantizeLinear it is not, and must stay int8 (the affine ops stay too)."""
    source = tmp_path / f"{follow}.onnx"
    onnx.save(_weight_only(follow, np.random.default_rng(0)), source)
    _assert_still_quantized(source, tmp_path, target, slack=256)
