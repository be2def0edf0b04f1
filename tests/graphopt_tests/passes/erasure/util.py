"""Shared checks for the erasure-pass tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt import io
from graphopt.registry import GraphPass, PassContext
from graphopt_tests.helpers import assert_same_outputs, op_types, roundtrip, run_pass, tensor_info

F = TensorProto.FLOAT


def check(
    model: ir.Model, pass_cls: type[GraphPass], context: PassContext | None = None, **kw
) -> tuple[ir.Model, int, list[str]]:
    """Run the pass; the result serializes, keeps its output names and matches ORT outputs."""
    after, hits = run_pass(model, pass_cls, context)
    after = roundtrip(after)
    assert [v.name for v in after.graph.outputs] == [v.name for v in model.graph.outputs]
    assert_same_outputs(model, after, **kw)
    return after, hits, op_types(after)


def inferred(model: ir.Model) -> ir.Model:
    """The model with ONNX shape inference applied (as the pipeline's folding pass does)."""
    return io.load(onnx.shape_inference.infer_shapes(io.to_proto(model), data_prop=True)).model


def lying_value_info(
    nodes: list[onnx.NodeProto], initializers: dict[str, np.ndarray] | None = None
) -> ir.Model:
    """x[N, S, 8], y[N, T, 8], z = Slice(y, 0:Shape(y)[1], axis 1) (y itself) declared
    [N, S, 8] by a value_info; ``nodes`` then compute ``out`` [N, S, 8]. Inference gives z no
    dims (the Slice end is computed), and the two bindings reconcile_shapes checks give S
    and T one size, so the declared S stands."""
    slicing = [
        helper.make_node("Shape", ["y"], ["sy"]),
        helper.make_node("Gather", ["sy", "one"], ["t"]),
        helper.make_node("Unsqueeze", ["t", "zero"], ["end"]),
        helper.make_node("Slice", ["y", "zero", "end", "one1"], ["z"]),
    ]
    proto = helper.make_model(
        helper.make_graph(
            slicing + nodes,
            "lying_value_info",
            [
                tensor_info("x", TensorProto.FLOAT, ["N", "S", 8]),
                tensor_info("y", TensorProto.FLOAT, ["N", "T", 8]),
            ],
            [tensor_info("out", TensorProto.FLOAT, ["N", "S", 8])],
            [
                onnx.numpy_helper.from_array(np.array(1, np.int64), "one"),
                onnx.numpy_helper.from_array(np.array([1], np.int64), "one1"),
                onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
                onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
                *(onnx.numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()),
            ],
            value_info=[tensor_info("z", F, ["N", "S", 8])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    return io.load(proto).model


def reshape_by_lying_value_info(copied: bool = False) -> ir.Model:
    """out = Reshape(Softmax(Reshape(Relu(x), [Shape(z)[0], Shape(z)[1], -1])), Shape(x))
    on :func:`lying_value_info`: the inner target is [N, T, 8 * S / T]. ``copied``: that
    target as [0, 0, -1] instead, the rewrite that takes z's T for x's S (wrong if S != T)."""
    if copied:
        target = [helper.make_node("Identity", ["copy_target"], ["shp"])]
    else:
        target = [
            helper.make_node("Shape", ["z"], ["sz"]),
            helper.make_node("Gather", ["sz", "i0"], ["d0"]),
            helper.make_node("Gather", ["sz", "one"], ["d1"]),
            helper.make_node("Unsqueeze", ["d0", "zero"], ["u0"]),
            helper.make_node("Unsqueeze", ["d1", "zero"], ["u1"]),
            helper.make_node("Concat", ["u0", "u1", "minus_one"], ["shp"], axis=0),
        ]
    rest = [
        helper.make_node("Relu", ["x"], ["w"]),
        helper.make_node("Reshape", ["w", "shp"], ["r"]),
        helper.make_node("Softmax", ["r"], ["sm"], axis=-1),
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Reshape", ["sm", "sx"], ["out"]),
    ]
    constants = {"i0": np.array(0, np.int64), "copy_target": np.array([0, 0, -1], np.int64)}
    return lying_value_info(target + rest, constants)
