"""Shape inference at concrete input shapes, on a clone: analysis never edits the caller's model.

Symbolic input dims are bound as :func:`graphopt.inputs.concrete_shape` binds them for
verification (``--input-shape`` first, then the documented defaults), so FLOPs and the inputs
ORT is fed agree. Inference is onnx's, through onnx-ir's ``ShapeInferencePass``, which takes
large initializers out of the protobuf it hands to onnx: external weights are never read.
Past ONNX Runtime's contrib ops, which onnx cannot infer, shapes come from standard stand-ins
(:mod:`graphopt.analysis.contrib_shapes`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import onnx_ir as ir
import onnx_ir.passes.common

from graphopt.editing import initializers_as_constants
from graphopt.errors import UserInputError
from graphopt.input_dims import graph_inputs, non_tensor_kind
from graphopt.inputs import concrete_shape

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
        kind = non_tensor_kind(value)
        if kind is not None:
            # A sequence, optional or map input has no shape to bind: what it feeds stays of
            # unknown shape (its FLOPs listed so), as for a tensor of undeclared shape. It
            # used to end the command: "cannot generate data for it ... --no-verify".
            if value.name in given:
                raise UserInputError(
                    f"--input-shape {value.name}: input {value.name!r} is {kind}, not a "
                    "tensor; only tensor inputs take a shape"
                )
            continue
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
    model: ir.Model, given: dict[str, tuple[int, ...]] | None = None, *, fold: bool = True
) -> tuple[ir.Model, dict[str, tuple[int, ...]]]:
    """A clone of ``model`` with input shapes bound and shapes inferred; and the bound shapes.

    Tensors are shared with ``model`` (nothing is copied or materialized); only the clone's
    value shapes change. ``fold=False``: onnx inference only, without folding the shape
    arithmetic onnx gives up on (several times faster on large graphs).
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
    onnx_inference(clone)
    if fold and bound and not _all_concrete(clone):
        _shapes_from_folded_copy(clone)
    elif not _all_concrete(clone):
        from graphopt.analysis.contrib_shapes import shapes_past_contrib_ops

        shapes_past_contrib_ops(clone)
    return clone, bound


# model.meta key: the graph object whose intermediate shapes were last re-inferred.
_RECONCILED = "graphopt.shapes_reconciled"

Dim = int | ir.SymbolicDim


def reconcile_shapes(model: ir.Model) -> int:
    """Re-infer every intermediate shape from the graph inputs; returns how many changed.

    Declared intermediate shapes (value_info) may be stale: left behind by an exporter or an
    earlier tool at another batch size, e.g. ``[1, 4]`` for a value that is ``[N, 4]``.
    Passes that fold a shape into a constant must not trust them, or the output works at
    the stale size only. So every node output's shape is dropped and inferred afresh from
    the graph inputs (and constants), in place, dim by dim:

    - where inference finds nothing at all (a custom op), the declared shape stays: nothing
      contradicts it;
    - an int, or a symbol of the graph inputs, that inference finds wins over whatever was
      declared;
    - where inference finds only a made-up or unknown dim, a declared int stays only when
      inference at two different concrete bindings of the input symbols gives that same
      int both times (ONNX inference loses e.g. the head count of a Reshape whose target
      has a -1, which exporters declare; a stale batch size fails the check). A declared
      input symbol stays unless such a binding contradicts it, any other declared name
      (``Gemmlogits_dim_0``) as it is: no binding can evaluate it, a name is never folded
      into a constant, and the fusions match on the exporter's names (``sequence``).

    Runs once per graph object (remembered in ``model.meta``): the passes' own edits keep
    shapes right, so later calls on the same graph would find nothing new. A rollback
    swaps the graph, and the next call re-infers.
    """
    if model.meta.get(_RECONCILED) is model.graph:
        return 0
    declared: list[tuple[ir.Value, ir.Shape | None]] = []
    untyped: list[tuple[ir.Value, ir.TypeProtocol | None, ir.Shape | None]] = []
    for graph in model.graphs():
        for node in graph:
            for value in node.outputs:
                if value.const_value is not None:
                    continue  # a constant's shape is its data's
                if not _tensor_valued(node, value):
                    untyped.append((value, value.type, value.shape))
                    continue
                declared.append((value, value.shape))
                value.shape = None
    onnx_inference(model)  # never raises: a failed inference leaves every shape unknown
    # Sequences and optionals are not shapes to fold, and ONNX's inference through nested
    # If/Loop bodies can give them a tensor type (a Loop body's If returning a sequence came
    # back FLOAT [], which ORT then refused): what they were declared stays.
    for value, type_, shape in untyped:
        value.type, value.shape = type_, shape
    # Where inference finds nothing (a custom op: ORT's contrib ops have no onnx schema),
    # the declaration stays, and the checks below see it too (at their bindings).
    blind = [(value, shape) for value, shape in declared if value.shape is None]
    for value, shape in blind:
        value.shape = shape
    symbols = input_symbols(model)
    doubts: list[tuple[ir.Value, int, Dim]] = []
    kept: set[tuple[int, int]] = set()  # (id(value), axis) whose declared dim stays
    for value, shape in declared:
        found = value.shape
        if found is None or shape is None or found is shape or len(found) != len(shape):
            continue
        for axis, (dim, inferred) in enumerate(zip(shape, found, strict=True)):
            if _in_doubt(dim, inferred, symbols):
                doubts.append((value, axis, dim))
            elif _unverifiable_name(dim, inferred, symbols):
                kept.add((id(value), axis))
    if doubts:
        # Plain onnx inference at the bindings usually settles every doubt; folding the
        # shape arithmetic too (several times slower) only when a declared int is left
        # unconfirmed by it.
        checks = concrete_checks(model, blind, fold=False)
        if any(isinstance(d, int) and not _stands(v, a, d, checks) for v, a, d in doubts):
            checks = concrete_checks(model, blind, fold=True)
        kept |= {(id(v), a) for v, a, d in doubts if _stands(v, a, d, checks)}
    changed = 0
    for value, shape in declared:
        if value.shape is None or value.shape is shape:
            continue  # nothing inferred: the declaration stands (or there was none)
        if shape is not None and len(shape) == len(value.shape):
            dims = [
                d if (id(value), axis) in kept else i
                for axis, (d, i) in enumerate(zip(shape, value.shape, strict=True))
            ]
            value.shape = ir.Shape(dims)
        if shape is None or list(shape) != list(value.shape):
            changed += 1
    if kept:
        _carry_kept_dims(model, declared, symbols)
    model.meta[_RECONCILED] = model.graph
    return changed


def reinfer_shapes(model: ir.Model) -> int:
    """:func:`reconcile_shapes` again, after an edit that changed sizes without updating the
    shapes it made stale: the declared shapes are kept where inference confirms them or
    cannot tell (symbolic names; ints only where both bindings give them), and a stale int
    gives way. For a rewrite that resizes dims it does not track (the decomposition's head
    ranks); returns how many shapes changed."""
    model.meta.pop(_RECONCILED, None)
    return reconcile_shapes(model)


def _carry_kept_dims(
    model: ir.Model, declared: list[tuple[ir.Value, ir.Shape | None]], symbols: set[str]
) -> None:
    """Infer once more the values nobody declared that inference left partly unknown.

    They took their dims from the inference above, which ran before the declared dims kept
    there were put back: a ``batch`` kept on ``x`` reached an undeclared ``q(x)`` (a tool
    such as ONNX Runtime's quantizer adds values without value_info) as a made-up ``unk__N``
    that later inferences never refine, so a second ``optimize`` of the output refined it
    and changed the bytes. Inferring again with the kept dims in place carries them on.
    """
    fresh = [
        value
        for value, shape in declared
        if shape is None
        and value.shape is not None
        and any(not isinstance(d, int) and d.value not in symbols for d in value.shape)
    ]
    if not fresh:
        return
    for value in fresh:
        value.shape = None
    onnx_inference(model)


# Ops whose outputs may be sequences or optionals, or take their type from a body.
_MAYBE_NOT_TENSOR = frozenset(
    (
        "If", "Loop", "Scan", "Optional", "OptionalGetElement", "SequenceConstruct",
        "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceMap", "SplitToSequence",
    )
)  # fmt: skip


def _tensor_valued(node: ir.Node, value: ir.Value) -> bool:
    """Whether ``value`` is known or bound to be a tensor (so its shape may be re-inferred)."""
    if value.type is not None:
        return isinstance(value.type, ir.TensorType)
    return node.op_type not in _MAYBE_NOT_TENSOR or (node.domain or "") not in ("", "ai.onnx")


def input_symbols(model: ir.Model) -> set[str]:
    """Names of the symbolic dims of the graph inputs.

    Inference carries these names along, so two dims that bear the same one are equal at
    run time (as the inputs' declared shapes promise). Names it makes up for unknown dims
    (``unk__0``…) are not among them: separate inference runs may reuse one.
    """
    return {
        dim.value
        for value in graph_inputs(model)
        if value.shape is not None
        for dim in value.shape
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None
    }


def _in_doubt(declared: Dim, inferred: Dim, symbols: set[str]) -> bool:
    """Whether the declared dim says something that inference from the inputs neither
    confirms nor overrules, and that the bindings can check: inference found only a
    made-up (``unk__0``) or unknown dim, and the declaration an int or an input's symbol."""
    if isinstance(inferred, int) or inferred.value in symbols:
        return False  # inference knows: it wins
    if isinstance(declared, int):
        return declared >= 0
    return declared.value in symbols


def _unverifiable_name(declared: Dim, inferred: Dim, symbols: set[str]) -> bool:
    """A declared name no binding can evaluate, where inference only made a dim up."""
    if isinstance(inferred, int) or inferred.value in symbols or isinstance(declared, int):
        return False
    return declared.value is not None and declared.value not in symbols


# (concrete shapes by value name, value of each input symbol) at one binding of the inputs.
Check = tuple[dict[str, tuple[int | None, ...]], dict[str, int]]


def concrete_checks(
    model: ir.Model,
    blind: list[tuple[ir.Value, ir.Shape | None]],
    fold: bool,
    bindings: list[tuple[dict[str, tuple[int, ...]], dict[str, int]]] | None = None,
) -> list[Check]:
    """Inference at two bindings of the input symbols (none when inference fails): per
    binding, every value's inferred dims (None: unknown) and the symbols' sizes.

    ``blind``: values whose declared shape stands because inference cannot find one; where
    that shape is ints and input symbols it is bound too, so that inference goes on past
    them (it would forget a symbolic shape at concrete bindings). ``bindings``: the default
    :func:`_bindings`, or others (:func:`distinct_bindings`).
    """
    checks: list[Check] = []
    for given, values in _bindings(model) if bindings is None else bindings:
        bound: list[tuple[ir.Value, ir.Shape | None]] = []
        for value, shape in blind:
            dims = [d if isinstance(d, int) else values.get(d.value or "") for d in shape or ()]
            if shape is not None and all(isinstance(d, int) and d >= 0 for d in dims):
                bound.append((value, value.shape))
                value.shape = ir.Shape(dims)
        try:
            clone, _ = infer_shapes(model, given, fold=fold)
        except Exception as exc:  # an odd model: nothing is confirmed, inference wins
            logger.info("cross-check inference failed: %s", exc)
            return []
        finally:
            for value, shape in bound:
                value.shape = shape
        shapes = {
            o.name: tuple(d if isinstance(d, int) else None for d in o.shape)
            for node in ir.traversal.RecursiveGraphIterator(clone.graph)
            for o in node.outputs
            if o.shape is not None
        }
        checks.append((shapes, values))
    return checks


def _bindings(model: ir.Model) -> list[tuple[dict[str, tuple[int, ...]], dict[str, int]]]:
    """Two bindings of the inputs' symbolic dims, every symbol to different sizes in each.

    The first is the documented default (batch 1, …); in the second each size is doubled
    (batch 3): a dim declared as an int that follows the batch (or any symbol) cannot give
    that int both times. A symbol takes one size wherever it appears, as the model's
    declared shapes promise.
    """
    firsts: dict[str, int] = {}
    seconds: dict[str, int] = {}
    given: tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]] = ({}, {})
    for value in graph_inputs(model):
        if value.shape is None or non_tensor_kind(value) is not None:
            continue  # nothing to bind (a sequence or optional has no shape to set)
        default = concrete_shape(value, {})
        one: list[int] = []
        two: list[int] = []
        for axis, (dim, size) in enumerate(zip(value.shape, default, strict=True)):
            other = size * 2 + (1 if axis == 0 else 0)
            name = dim.value if isinstance(dim, ir.SymbolicDim) else None
            if name is not None:
                size, other = firsts.setdefault(name, size), seconds.setdefault(name, other)
            elif isinstance(dim, int) and dim >= 0:
                other = size
            one.append(size)
            two.append(other)
        given[0][value.name], given[1][value.name] = tuple(one), tuple(two)
    return [(given[0], firsts), (given[1], seconds)]


def distinct_bindings(model: ir.Model) -> list[tuple[dict[str, tuple[int, ...]], dict[str, int]]]:
    """The two bindings of :func:`_bindings` with distinct symbols at distinct sizes within
    each: what tells one symbol from another. At the default binding ``S = T = 16`` a dim
    that is T's reads as S's too; here the later of two equal symbols moves on by its step
    (16 → 32, 48…; batch 1 → 2…), the graph inputs' shapes bound to match."""
    result = []
    for given, values in _bindings(model):
        sizes: dict[str, int] = {}
        for name, size in values.items():
            step = min(size & -size, 32) if size > 0 else 1
            moved = size
            while moved in sizes.values():
                moved += step
            sizes[name] = moved
        rebound = {
            value.name: tuple(
                sizes[d.value] if isinstance(d, ir.SymbolicDim) and d.value in sizes else s
                for d, s in zip(value.shape, given[value.name], strict=True)
            )
            for value in graph_inputs(model)
            if value.name in given and value.shape is not None
        }
        result.append((rebound, sizes))
    return result


def _stands(value: ir.Value, axis: int, declared: Dim, checks: list[Check]) -> bool:
    """Whether a declared dim in doubt stands: an int must be confirmed by every binding
    (and there must be some); a name must not be contradicted by any (a binding that does
    not know the dim says nothing; a name the bindings cannot evaluate is not checked)."""
    if isinstance(declared, int) and not checks:
        return False
    for shapes, values in checks:
        shape = shapes.get(value.name)
        found = shape[axis] if shape is not None and axis < len(shape) else None
        if isinstance(declared, int):
            if found != declared:
                return False
        elif found is not None and declared.value in values and found != values[declared.value]:
            return False
    return True


def _forget_symbolic(model: ir.Model) -> None:
    # Symbolic dims recorded by the exporter (or an earlier inference) would otherwise stay
    # symbolic where onnx keeps the declared shape; forget them so inference recomputes them.
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for output in node.outputs:
            if output.shape is not None and not is_concrete(output.shape):
                output.shape = None
            if output.const_value is not None:
                output.shape = ir.Shape(output.const_value.shape)
    for value in model.graph.initializers.values():
        if value.const_value is not None and (value.shape is None or not is_concrete(value.shape)):
            value.shape = ir.Shape(value.const_value.shape)  # folded constants: shape is known


def onnx_inference(model: ir.Model) -> None:
    """onnx's shape inference, in place; non-strict: a node onnx cannot infer (a custom op)
    leaves its outputs unknown, and a failure leaves every shape unknown."""
    onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(
        model
    )


def _all_concrete(model: ir.Model) -> bool:
    return all(
        o.shape is not None and is_concrete(o.shape) for node in model.graph for o in node.outputs
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
    from graphopt.analysis.contrib_shapes import copy_shapes, replace_contrib_ops
    from graphopt.private_apis import constant_folding as folding

    def shape_arithmetic(node: ir.Node) -> bool:
        # Only integer tensors (shapes, sizes, indices): floats are data, not shapes.
        return node.domain in ("", "ai.onnx") and all(
            o.dtype is not None and not o.dtype.is_floating_point() for o in node.outputs
        )

    folded = clone.clone()
    # Contrib ops have no onnx inference: on this copy, standard ops with their output shapes.
    replace_contrib_ops(folded.graph)
    folder = folding.FoldConstantsPass(
        shape_inference=False,
        input_size_limit=_SHAPE_FOLD_LIMIT,
        output_size_limit=_SHAPE_FOLD_LIMIT,
        should_fold=shape_arithmetic,
    )
    # Evaluations that fail here only mean a shape stays unknown: not the user's concern.
    with _folding_quietly(logging.getLogger(folding.__name__)):
        seen = _fold_rounds(folded, folder)
    copy_shapes(folded, clone, seen)


class _QuietInThisThread(logging.Filter):
    """Drops records under ERROR logged by a thread inside :func:`_folding_quietly`. A
    per-thread flag, not the logger's level: the level is process-wide, and one run's
    restoring it let another run's (concurrent API calls) folding noise through."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not getattr(self.local, "depth", 0)


_QUIET = _QuietInThisThread()


@contextlib.contextmanager
def _folding_quietly(quiet: logging.Logger) -> Iterator[None]:
    if _QUIET not in quiet.filters:
        quiet.addFilter(_QUIET)  # once per process; a no-op outside the context
    _QUIET.local.depth = getattr(_QUIET.local, "depth", 0) + 1
    try:
        yield
    finally:
        _QUIET.local.depth -= 1


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dim is a known integer, else None."""
    if value is None:
        return None
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None or not is_concrete(shape):
        return None
    return tuple(int(d) for d in shape)


def is_concrete(shape: ir.Shape) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in shape)


def shape_text(
    shape: ir.Shape | None, name: Callable[[str], str] = str
) -> list[int | str | None] | None:
    """A JSON-friendly shape: ints, symbolic names (through ``name``), None for unknown dims."""
    if shape is None:
        return None
    dims: list[int | str | None] = []
    for dim in shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif getattr(dim, "value", None) is not None and str(dim.value).strip():
            dims.append(name(str(dim.value)))
        else:
            dims.append(None)
    return dims


def _fold_rounds(folded: ir.Model, folder) -> dict[str, ir.Value]:
    """Fold shape arithmetic and infer again until a round makes no progress.

    Each round can only reach one step further: a shape folded here lets inference past a
    Reshape, whose now-known output lets the next Shape fold, and so on down the graph; and
    the first round may fold nothing at all, its inference being the first to see past the
    contrib ops' stand-ins. So neither "nothing folded" nor a fixed number of rounds is the
    end (a cap of 3, and stopping at the first round that folded nothing, left ppocr_rec's
    MatMuls past a QuickGelu of unknown shape after ``--target ort``). A round is progress
    when it leaves fewer nodes (folded away) or fewer outputs of unknown shape; both are
    counts that never go below 0, so the loop ends, after at most their sum of rounds.

    Returns every value of concrete shape some round inferred, by name: the next round may
    fold it away (a ``Shape`` output becomes a constant of another name), and the analysis
    clone, which keeps its nodes, still wants its shape (a ReduceProd of that ``Shape``).
    """
    from graphopt.analysis.contrib_shapes import concrete_values

    # Through the registry: the analysis imports no pass module (see test_layering).
    from graphopt.registry import PassContext, get_pass

    shape_folding = get_pass("shape-folding")
    # The copy's shapes were inferred at bound input shapes just now: nothing to reconcile
    # (and reconciling would run this very inference again).
    folded.meta[_RECONCILED] = folded.graph
    left = _unsettled(folded)
    seen: dict[str, ir.Value] = {}
    while True:
        shape_folding(PassContext())(folded)
        try:
            folder(folded)
        except Exception as exc:  # a failing evaluator: keep what onnx inferred
            logger.info("shape arithmetic folding failed: %s", exc)
        _forget_symbolic(folded)
        onnx_inference(folded)
        seen.update(concrete_values(folded))
        now = _unsettled(folded)
        if now >= left:
            return seen
        left = now


def _unsettled(model: ir.Model) -> int:
    """Nodes of ``model`` plus node outputs whose shape is not concrete: what folding and
    inference have left to settle (each productive round lowers it)."""
    count = 0
    for node in model.graph:
        count += 1
        count += sum(o.shape is None or not is_concrete(o.shape) for o in node.outputs)
    return count
