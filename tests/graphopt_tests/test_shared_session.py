"""Sessions whose large initializers ORT reads from graphopt's arrays (``ortrun.shared_session``).

``make_session`` lends a model's large initializers to ORT instead of serializing them; the
outputs must be those of the serialized model, bit for bit, with and without ORT's graph
optimizations, and the model must come out as it went in.
"""

from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io, sessions
from graphopt.backends import ort as ort_backend
from graphopt.ortrun import file_map, run_session, shareable_initializers

SMALL = 1024  # lend from 1 KiB on: the test models stay tiny


def _model(folder=None) -> ir.Model:
    """MatMul on W, Gather on a table T, and a small bias B; external data when ``folder``."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32), dtype=np.float32)
    table = rng.standard_normal((50, 32), dtype=np.float32)
    bias = rng.standard_normal(32, dtype=np.float32)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w, "W"), (table, "T"), (bias, "B"))]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["y"]),
        helper.make_node("Gather", ["T", "ids"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lent",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 32]),
        ],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if folder is None:
        return io.load(proto).model
    path = folder / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return io.load(path).model


FEEDS = {
    "x": np.random.default_rng(1).standard_normal((2, 64), dtype=np.float32),
    "ids": np.array([0, 49, 7], dtype=np.int64),
}


def _outputs(session) -> list[np.ndarray]:
    return run_session(session, [o.name for o in session.get_outputs()], FEEDS)


def _serialized(model: ir.Model, optimize: bool, monkeypatch) -> list[np.ndarray]:
    with monkeypatch.context() as patch:
        patch.setattr(ort_backend, "SHARE_MIN_BYTES", 1 << 62)
        session = sessions.make_session(model, optimize=optimize)
    assert not hasattr(session, "_graphopt_lent")
    return _outputs(session)


@pytest.mark.parametrize("optimize", [False, True])
def test_lent_initializers_give_the_serialized_outputs(optimize, monkeypatch):
    model = _model()
    expected = _serialized(model, optimize, monkeypatch)
    monkeypatch.setattr(ort_backend, "SHARE_MIN_BYTES", SMALL)
    session = sessions.make_session(model, optimize=optimize)
    assert len(session._graphopt_lent) == 2  # W and T; the 128-byte bias is serialized
    for got, want in zip(_outputs(session), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_model_comes_out_unchanged(monkeypatch):
    model = _model()
    before = io.to_proto(model).SerializeToString()
    tensors = {name: value.const_value for name, value in model.graph.initializers.items()}
    monkeypatch.setattr(ort_backend, "SHARE_MIN_BYTES", SMALL)
    sessions.make_session(model)
    assert {n: v.const_value for n, v in model.graph.initializers.items()} == tensors
    assert list(model.graph.initializers) == list(tensors)
    assert io.to_proto(model).SerializeToString() == before


def test_session_keeps_lent_arrays_alive(monkeypatch):
    monkeypatch.setattr(ort_backend, "SHARE_MIN_BYTES", SMALL)
    model = _model()
    w = model.graph.initializers["W"].const_value.numpy().copy()
    b = model.graph.initializers["B"].const_value.numpy().copy()
    session = sessions.make_session(model)
    del model
    gc.collect()
    y, _ = _outputs(session)
    np.testing.assert_allclose(y, FEEDS["x"] @ w + b, rtol=1e-5, atol=1e-5)


def test_external_weights_are_mapped_by_the_session(tmp_path, monkeypatch):
    """An external tensor lends a map of its own, so the model can release its map (as the
    int4 pass does with each float weight once quantized) while the session lives."""
    model = _model(tmp_path)
    expected = _serialized(model, False, monkeypatch)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors)
    lent = shareable_initializers(model, SMALL)
    assert sorted(lent) == ["T", "W"]
    own = {name: model.graph.initializers[name].const_value for name in lent}
    for name, array in lent.items():
        own[name].numpy()  # the tensor's own map
        assert file_map(array) is not None and file_map(array) is not own[name].raw
    monkeypatch.setattr(ort_backend, "SHARE_MIN_BYTES", SMALL)
    session = sessions.make_session(model)
    for tensor in tensors:
        tensor.numpy()  # the model's own map, as a pass reading the weight makes it
        tensor.release()  # would raise BufferError if ORT held this map
    for got, want in zip(_outputs(session), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_only_plain_large_initializers_are_lent():
    big = np.ones((32, 32), dtype=np.float32)  # 4 KiB
    model = ir.Model(ir.Graph([], [], nodes=[], name="g"), ir_version=8)
    for name, array in (
        ("plain", big),
        ("small", np.ones(4, dtype=np.float32)),
        ("bfloat16", big.astype(ml_dtypes.bfloat16)),
        ("fortran", np.asfortranarray(big)),
    ):
        value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        model.graph.register_initializer(value)
        model.graph.append(ir.node("Identity", [value]))
    overridable = ir.Value(name="input", const_value=ir.Tensor(big, name="input"))
    model.graph.register_initializer(overridable)
    model.graph.inputs.append(overridable)  # a feed may replace it: ORT must own it
    model.graph.append(ir.node("Identity", [overridable]))
    unread = ir.Value(name="unread", const_value=ir.Tensor(big, name="unread"))
    model.graph.register_initializer(unread)
    assert list(shareable_initializers(model, SMALL)) == ["plain"]


@pytest.mark.parametrize("optimize", [False, True])
def test_an_unread_large_initializer_stays_serialized(optimize, monkeypatch):
    """ORT drops unread initializers before taking external ones, then cannot find them."""
    model = _model()
    unread = np.ones((64, 64), dtype=np.float32)
    model.graph.register_initializer(ir.Value(name="U", const_value=ir.Tensor(unread, name="U")))
    expected = _serialized(model, optimize, monkeypatch)
    monkeypatch.setattr(ort_backend, "SHARE_MIN_BYTES", SMALL)
    session = sessions.make_session(model, optimize=optimize)
    assert len(session._graphopt_lent) == 2  # W and T, not U
    for got, want in zip(_outputs(session), expected, strict=True):
        np.testing.assert_array_equal(got, want)
