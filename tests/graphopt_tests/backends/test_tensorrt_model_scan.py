"""Reading a model file's input names, initializer names and external-data locations from the
protobuf wire format, without parsing the model; None for what is not a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt import io
from graphopt.backends.tensorrt.model_scan import _fields, scan_model


def _model(weight: onnx.TensorProto, input_weight: bool = False) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])]
    if input_weight:  # an IR 3 style input that is also an initializer
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 4]))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inputs_initializers_and_external_locations(tmp_path: Path) -> None:
    weight = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1, 4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "sub/w.bin"), ("offset", "0")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "m.onnx"
    onnx.save(_model(weight, input_weight=True), path)
    header = scan_model(path)
    assert header is not None
    assert header.inputs == ["x", "W"] and header.fed_inputs == ["x"]
    assert header.initializers == {"W"}
    assert header.locations == {"sub/w.bin"}


def test_a_graph_written_in_two_pieces_is_read_whole(tmp_path: Path) -> None:
    # graphopt's own save streams large initializers as a second graph field (merged on load).
    big = numpy_helper.from_array(np.ones((2**18, 4), np.float32), "big")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2**18])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [big],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    io.save(ir.serde.deserialize_model(model), path)
    data = path.read_bytes()
    pieces = [f for f in _fields(data, 0, len(data)) if f[0] == 7]  # ModelProto.graph
    assert len(pieces) == 2
    header = scan_model(path)
    assert header is not None
    assert header.fed_inputs == ["x"] and header.initializers == {"big"} and not header.locations


def test_what_is_not_a_model_gives_none(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(numpy_helper.from_array(np.ones((1, 4), np.float32), "W")), path)
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.onnx").write_text("hello, not a model\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "dir.onnx").mkdir()
    for name in ("cut.onnx", "text.onnx", "empty.onnx", "dir.onnx", "missing.onnx"):
        assert scan_model(tmp_path / name) is None, name
    assert scan_model(path).fed_inputs == ["x"]
