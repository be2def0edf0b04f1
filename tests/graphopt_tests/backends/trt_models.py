"""Tiny ONNX files the TensorRT backend tests build: a dynamic-batch Relu, and an Add whose
weight is external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def relu_file(path: Path) -> Path:
    """y = Relu(x), x [n, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def external_add_file(folder: Path, location: str = "w.bin", write: bool = True) -> Path:
    """folder/ext.onnx: y = x + W, W (4 floats, 0..3) stored at ``location`` relative to
    ``folder`` (written there when ``write``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if write:
        (folder / location).write_bytes(np.arange(4, dtype=np.float32).tobytes())
    weight = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1, 4])
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"], name="add")],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = folder / "ext.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
