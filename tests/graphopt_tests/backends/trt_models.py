"""Tiny ONNX models the TensorRT backend tests build: a dynamic-batch Relu, an Add whose
weight is external data, and builders for the lint's agreement cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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


def value(name: str, elem: int = TensorProto.FLOAT, shape=(1, 2, 4, 4)) -> onnx.ValueInfoProto:
    """A tensor value_info; ``shape`` None: no shape."""
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def tensor(array, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def model(
    nodes,
    inputs=None,
    outputs=None,
    initializers=(),
    opset: int = 17,
    domains: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """A one-graph model: input x [1, 2, 4, 4] float and output y of no shape by default;
    ``domains`` are imported at version 1."""
    graph = helper.make_graph(
        list(nodes),
        "g",
        list(inputs or [value("x")]),
        list(outputs or [value("y", shape=None)]),
        list(initializers),
    )
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    built = helper.make_model(graph, opset_imports=imports)
    built.ir_version = 3 if opset < 8 else 8
    return built


def if_model(branch_nodes, branch_initializers=(), opset: int = 18) -> onnx.ModelProto:
    """y = If(min(x) > 0, then: ``branch_nodes`` (output t), else: x); the If is named
    'cond', the branch's nodes as given (unnamed, as exporters leave them)."""
    then = helper.make_graph(
        list(branch_nodes), "then", [], [value("t", shape=None)], list(branch_initializers)
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [value("e", shape=None)]
    )
    nodes = [
        helper.make_node("ReduceMin", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="cond"),
    ]
    return model(nodes, initializers=[tensor(np.float32(0), "zero")], opset=opset)


def line_file(path: Path) -> Path:
    """A text-line model: any width, height 48 in practice; the derived 224x224 profile
    cannot be reshaped, so the builder fails on it."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 3 * 48 * 5, -1])
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Relu", ["r"], ["y"]),
        ],
        "line",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [shape],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
