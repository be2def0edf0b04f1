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

from graphopt.editing import initializers_as_constants
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
    # An IR < 4 model lists its weights as graph inputs too: they are constants (optimize's
    # initializer-inputs pass says the same), or the analysis would find no parameters.
    initializers_as_constants(clone)
    for value in graph_inputs(clone):
        if value.name in bound:
            value.shape = ir.Shape(bound[value.name])
    _forget_symbolic(clone)
    # Non-strict: a node onnx cannot infer (custom op) leaves its outputs unknown instead of
    # aborting inference for the whole graph.
    _onnx_inference(clone)
    if bound and not _all_concrete(clone):
        _shapes_from_folded_copy(clone)
    return clone, bound


def _forget_symbolic(model: ir.Model) -> None:
    # Symbolic dims recorded by the exporter (or an earlier inference) would otherwise stay
    # symbolic where onnx keeps the declared shape; forget them so inference recomputes them.
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for output in node.outputs:
            if output.shape is not None and not _is_concrete(output.shape):
                output.shape = None
            if output.const_value is not None:
                output.shape = ir.Shape(output.const_value.shape)
    for value in model.graph.initializers.values():
        if value.const_value is not None and (value.shape is None or not _is_concrete(value.shape)):
            value.shape = ir.Shape(value.const_value.shape)  # folded constants: shape is known


def _onnx_inference(model: ir.Model) -> None:
    onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(
        model
    )


def _all_concrete(model: ir.Model) -> bool:
    return all(
        o.shape is not None and _is_concrete(o.shape) for node in model.graph for o in node.outputs
    )


# At most this many bytes per tensor folded while computing shapes (shape arithmetic only).
_SHAPE_FOLD_LIMIT = 1 << 16


def _shapes_from_folded_copy(clone: ir.Model) -> None:
    """Fill shapes onnx inference left symbolic from a copy with the shape arithmetic folded.

    onnx's data propagation stops at e.g. a Slice whose end comes from ``Shape(input)``, and
    one unknown dim then spreads through every broadcast. At bound input shapes those are
    constants: fold them on a throw-away copy (the analysis clone must keep its nodes, which
    index the caller's model), infer there, and copy the shapes back by value name.
    """
    from graphopt.private_apis import constant_folding as folding

    def shape_arithmetic(node: ir.Node) -> bool:
        # Only integer tensors (shapes, sizes, indices): floats are data, not shapes.
        return node.domain in ("", "ai.onnx") and all(
            o.dtype is not None and not o.dtype.is_floating_point() for o in node.outputs
        )

    folded = clone.clone()
    folder = folding.FoldConstantsPass(
        shape_inference=False,
        input_size_limit=_SHAPE_FOLD_LIMIT,
        output_size_limit=_SHAPE_FOLD_LIMIT,
        should_fold=shape_arithmetic,
    )
    # Evaluations that fail here only mean a shape stays unknown: not the user's concern.
    quiet = logging.getLogger(folding.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        _fold_rounds(folded, folder)
    finally:
        quiet.setLevel(level)
    known = {
        o.name: o.shape
        for node in folded.graph
        for o in node.outputs
        if o.shape is not None and _is_concrete(o.shape)
    }
    for node in clone.graph:
        for out in node.outputs:
            if (out.shape is None or not _is_concrete(out.shape)) and out.name in known:
                out.shape = ir.Shape(known[out.name])


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


def _fold_rounds(folded: ir.Model, folder) -> None:
    from graphopt.passes.erasure.shape_folding import ShapeFoldingPass
    from graphopt.registry import PassContext

    for _ in range(3):
        changed = ShapeFoldingPass(PassContext())(folded).modified
        try:
            changed |= folder(folded).modified
        except Exception as exc:  # a failing evaluator: keep what onnx inferred
            logger.info("shape arithmetic folding failed: %s", exc)
        _forget_symbolic(folded)
        _onnx_inference(folded)
        if not changed:
            break
