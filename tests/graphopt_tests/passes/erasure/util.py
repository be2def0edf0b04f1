"""Shared checks for the erasure-pass tests."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from graphopt import io
from graphopt.registry import GraphPass, PassContext
from graphopt_tests.helpers import assert_same_outputs, op_types, roundtrip, run_pass


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
