"""Shape inference at concrete input shapes, on a clone: analysis never edits the caller's model.

Symbolic input dims are bound as :func:`graphopt.inputs.concrete_shape` binds them for
verification (``--input-shape`` first, then the documented defaults), so FLOPs and the inputs
ORT is fed agree. Inference is onnx's, through onnx-ir's ``ShapeInferencePass``, which takes
large initializers out of the protobuf it hands to onnx: external weights are never read.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common

from graphopt.errors import UserInputError
from graphopt.inputs import concrete_shape, graph_inputs

logger = logging.getLogger(__name__)


def bind_input_shapes(
    model: ir.Model, given: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """{input name: concrete shape} for every input whose shape can be bound.

    Inputs without a declared shape and not in ``given`` are left out (their consumers get
    no shapes). Names in ``given`` that are not graph inputs are an error.
    """
    given = given or {}
    inputs = graph_inputs(model)
    unknown = set(given) - {v.name for v in inputs}
    if unknown:
        raise UserInputError(f"--input-shape names unknown input(s): {', '.join(sorted(unknown))}")
    bound: dict[str, tuple[int, ...]] = {}
    for value in inputs:
        if value.shape is None and value.name not in given:
            continue
        declared = value.shape
        if value.name in given and declared is not None and len(given[value.name]) != len(declared):
            raise UserInputError(
                f"--input-shape {value.name}: rank {len(given[value.name])} does not match "
                f"the declared shape {shape_text(declared)}"
            )
        bound[value.name] = concrete_shape(value, given)
    return bound


def infer_shapes(
    model: ir.Model, given: dict[str, tuple[int, ...]] | None = None
) -> tuple[ir.Model, dict[str, tuple[int, ...]]]:
    """A clone of ``model`` with input shapes bound and shapes inferred; and the bound shapes.

    Tensors are shared with ``model`` (nothing is copied or materialized); only the clone's
    value shapes change.
    """
    bound = bind_input_shapes(model, given)
    clone = model.clone()
    for value in graph_inputs(clone):
        if value.name in bound:
            value.shape = ir.Shape(bound[value.name])
    # Symbolic dims recorded by the exporter would otherwise stay symbolic where onnx
    # keeps the declared shape; forget them so inference recomputes them from the inputs.
    for node in ir.traversal.RecursiveGraphIterator(clone.graph):
        for output in node.outputs:
            if output.shape is not None and not _is_concrete(output.shape):
                output.shape = None
    # Non-strict: a node onnx cannot infer (custom op) leaves its outputs unknown instead of
    # aborting inference for the whole graph.
    onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(
        clone
    )
    return clone, bound


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dim is a known integer, else None."""
    if value is None:
        return None
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None or not _is_concrete(shape):
        return None
    return tuple(int(d) for d in shape)


def _is_concrete(shape: ir.Shape) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in shape)


def shape_text(shape: ir.Shape | None) -> list[int | str | None] | None:
    """A JSON-friendly shape: ints, symbolic names, None for unknown dims."""
    if shape is None:
        return None
    dims: list[int | str | None] = []
    for dim in shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif getattr(dim, "value", None) is not None:
            dims.append(str(dim.value))
        else:
            dims.append(None)
    return dims
