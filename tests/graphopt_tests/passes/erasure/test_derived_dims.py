"""DerivedDims: a declared symbol counts where inference derives it, or, where symbolic
inference finds no name (a position table read through a Range over the sequence length,
as every decoder export has), where folded inference at two bindings with distinct symbols
at distinct sizes gives that symbol's size both times; never where the size is another
symbol's (a value_info that calls T's dim S)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt import io
from graphopt.passes.erasure.derived_dims import DerivedDims
from graphopt_tests.helpers import tensor_info
from graphopt_tests.passes.erasure.util import lying_value_info

F = TensorProto.FLOAT


def _positions_model():
    """a = x[N, S, 8] + table[Range(0, Shape(x)[1])]: onnx's symbolic inference gives the
    Gather no first dim (a Range of a computed length), so ``a`` is [N, ?, 8]; the exporter
    declares it [N, S, 8], which is true."""
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "one"], ["s"]),
        helper.make_node("Range", ["zero", "s", "one"], ["pos"]),
        helper.make_node("Gather", ["table", "pos"], ["emb"]),
        helper.make_node("Add", ["x", "emb"], ["a"]),
        helper.make_node("Relu", ["a"], ["out"]),
    ]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes,
        "positions",
        [tensor_info("x", F, ["N", "S", 8])],
        [tensor_info("out", F, ["N", "S", 8])],
        [
            onnx.numpy_helper.from_array(np.array(1, np.int64), "one"),
            onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
            onnx.numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "table"),
        ],
        value_info=[tensor_info("a", F, ["N", "S", 8])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return io.load(proto).model


def _value(model, name: str):
    return next(o for node in model.graph for o in node.outputs if o.name == name)


def test_a_declared_symbol_folded_inference_confirms_counts():
    model = _positions_model()
    derived = DerivedDims(model)
    a = _value(model, "a")
    assert derived.symbol(a, 0) == "N"
    assert derived.symbol(a, 1) == "S"
    assert derived.same(a, 1, model.graph.inputs[0], 1)


def test_a_declared_symbol_that_is_another_symbols_size_does_not_count():
    model = lying_value_info([helper.make_node("Relu", ["x"], ["out"])])
    derived = DerivedDims(model)
    z = _value(model, "z")
    assert derived.symbol(z, 0) == "N"
    assert derived.symbol(z, 1) is None
    assert not derived.same(z, 1, model.graph.inputs[0], 1)
