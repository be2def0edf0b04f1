"""What the ``--target ort`` fusions share: run onnxscript's ORT fusion rules on a copy.

onnxscript's ``ort_fusions`` rules need shapes and a constant-folded graph, and several of them
create intermediate ops in a private domain (``ai.onnxruntime._fusion``) that a later rule is
meant to consume. A graphopt pass must leave a valid, runnable model, so each pass here works on
a clone: prepare, apply its rules, inline whatever intermediate op no rule consumed, and only
when contrib ops really appeared does the result replace the model. A pass that finds nothing
leaves the model untouched (the preparation's folding is not smuggled in under zero hits).

The preparation is graphopt's own (shape inference, then the pipeline's cleanup passes, whose
constant folding obeys the run's ``--fold-limit``), not onnxscript's whole optimizer, which
has folding limits and rewrites (BatchNorm fusion among them) of its own. Each pass
declares the op types its rules start from (``ops``), so the pass manager skips it on models
without them (a CNN pays nothing for the transformer fusions).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter.ort_fusions import shape_optimization

from graphopt import io
from graphopt.passes.fusion.ort._opset import legalize
from graphopt.registry import GraphPass, PassContext, Stage, all_passes

MS_DOMAIN = "com.microsoft"
# Where onnxscript parks intermediate fusion ops (SDPA, RotaryEmbedding before cos/sin caching).
PRIVATE_DOMAIN_PREFIX = "ai.onnxruntime._fusion"

# A fusion step: onnxscript's ``fuse_*`` functions take the model and return a count.
FusionStep = Callable[..., int]


def count_ops(model: ir.Model, ops: tuple[tuple[str, str], ...]) -> int:
    """Nodes of the main graph whose (domain, op_type) is in ``ops``."""
    found = Counter((node.domain or "", node.op_type) for node in model.graph)
    return sum(found[op] for op in ops)


def prepare(model: ir.Model, context: PassContext, symbolic: bool = False) -> ir.Model:
    """Shapes and folding before fusing (graphopt's own passes, the run's fold limit).

    ONNX's shape inference leaves TorchScript exports' attention reshapes (target built by
    Concat from Shape ops, with a -1) as unrelated unknown dims, and the MHA rules then cannot
    tell that Q, K and V agree on batch, heads and sequence. ORT's symbolic shape inference
    names those dims consistently (``symbolic``); on dynamo exports it fails or, merging dims,
    hides matches that ONNX's shapes allow, so passes try ONNX's shapes first.
    Its ``auto_merge`` assumes broadcast dims equal (e.g. ``Min(512, sequence)`` and
    ``sequence``), so its shapes only guide the rules and are dropped afterwards (see
    :func:`reset_shapes`); where it merged two of the graph inputs' dims its shapes are not
    used at all (see :func:`_merges_input_dims`).
    """
    common_passes.ShapeInferencePass()(model)
    clean(model, context)
    if symbolic:
        model = _symbolic_shapes(model, context) or model
    shape_optimization.rules.apply_to_model(model)
    clean(model, context)
    return model


def clean(model: ir.Model, context: PassContext) -> None:
    """graphopt's cleanup passes (the pipeline's own), to a fixed point (at most 4 rounds)."""
    cleanup = [cls for cls in all_passes().values() if cls.stage == Stage.CLEANUP]
    for _ in range(4):
        changed = False
        for cls in cleanup:
            changed |= cls(context).call(model).modified
        if not changed:
            return


# Initializers over this size go to ORT's symbolic shape tool as typed graph inputs, without
# their data (int32/int64 ones stay: shape arithmetic reads their values).
SYMBOLIC_WEIGHT_BYTES = 1024
_SHAPE_DTYPES = frozenset((ir.DataType.INT32, ir.DataType.INT64))


def _symbolic_shapes(model: ir.Model, context: PassContext | None = None) -> ir.Model | None:
    """``model`` re-loaded with ORT's symbolic shapes, or None when that inference fails.

    The tool copies the model proto several times over; its weights only count by their
    shapes, so large ones are left out (typed graph inputs, as onnx-ir does for ONNX's shape
    inference) and the re-loaded model gets the very same tensors back, in their order. A
    model whose float embedding table stays float (int4-weight) otherwise peaked at ~4 copies
    of the table per fusion pass.
    """
    from graphopt.private_apis import symbolic_shape_inference

    before = {value.name: value.shape for value in model.graph.inputs}
    saved, stripped = _weights_as_inputs(model.graph)
    try:
        proto = symbolic_shape_inference(io.to_proto(model))
    except TimeoutError as error:  # sympy ran for minutes on some exports' dim arithmetic
        if context is not None:  # notes are kept once: every later pass says the same
            context.note(f"{error}; the --target ort fusions used ONNX's shapes")
        proto = None
    except Exception:  # any other failure there just means: keep ONNX's shapes
        proto = None
    finally:
        _weights_back(model.graph, saved, stripped)
    if proto is None:
        return None
    result = io.load(proto).model
    del proto
    names = {value.name for value, *_ in stripped}
    if names - {value.name for value in result.graph.inputs}:
        return None  # the tool dropped one: keep ONNX's shapes
    if _merges_input_dims(before, result.graph):
        return None
    _weights_back(result.graph, saved, stripped, by_name=True)
    return result


def _merges_input_dims(before: dict[str | None, ir.Shape | None], graph: ir.Graph) -> bool:
    """Whether the tool's ``auto_merge`` made two of the graph inputs' dims one (or a symbol a
    number): shapes resting on that assumption would let the rules fuse what only holds when
    the merged dims happen to be equal.

    A cross-attention whose memory has its own batch dim (``B2``, broadcast over the query's
    ``B``) had both renamed ``B`` once its Q·Kᵀ MatMul broadcast them, and became a
    MultiHeadAttention that fails on batch 1 memory; two unnamed batch dims of a residual
    Add became one named dim and a SkipSimplifiedLayerNormalization that drops the
    broadcast. A dim that was unknown and got a name of its own is no merge.
    """
    origin: dict[str, object] = {}  # the tool's dim name → which original dim it stands for
    for value in graph.inputs:
        old = before.get(value.name)
        if value.name not in before or old is None:
            continue
        new = value.shape
        if new is None or new.rank() != old.rank():
            return True
        for axis, (was, now) in enumerate(zip(old.dims, new.dims, strict=True)):
            if isinstance(was, int):
                if now != was:
                    return True
                continue
            if isinstance(now, int):
                return True
            if now.value is None:
                continue
            # Each unknown dim is a dim of its own; named dims are one dim per name.
            key = ("name", was.value) if was.value is not None else (value.name, axis)
            if origin.setdefault(now.value, key) != key:
                return True
    return False


def _weights_as_inputs(graph: ir.Graph):
    """Move ``graph``'s large initializers to typed graph inputs without data; returns the
    initializers in order and (value, tensor, shape, type) of those moved."""
    saved = list(graph.initializers.values())
    stripped = []
    for value in saved:
        tensor = value.const_value
        if (
            tensor is None
            or tensor.nbytes <= SYMBOLIC_WEIGHT_BYTES
            or tensor.dtype in _SHAPE_DTYPES
            or value.is_graph_input()
        ):
            continue
        stripped.append((value, tensor, value.shape, value.type))
    for value, tensor, _, _ in stripped:
        graph.initializers.pop(value.name)
        value.const_value = None
        value.shape = value.shape or ir.Shape(tensor.shape)
        value.type = value.type or ir.TensorType(tensor.dtype)
        graph.inputs.append(value)
    return saved, stripped


def _weights_back(graph: ir.Graph, saved, stripped, by_name: bool = False) -> None:
    """Undo :func:`_weights_as_inputs` on ``graph``, or with ``by_name`` on the graph loaded
    from the tool's result: the same tensors, the initializers' original order."""
    moved = {value.name: (tensor, shape, kind) for value, tensor, shape, kind in stripped}
    inputs = {v.name: v for v in graph.inputs if v.name in moved}
    for value in inputs.values():
        graph.inputs.remove(value)
    current = dict(graph.initializers)
    graph.initializers.clear()
    for value in saved:
        if value.name in moved:
            tensor, shape, kind = moved[value.name]
            target = inputs[value.name] if by_name else value
            target.const_value = tensor
            if not by_name:
                value.shape, value.type = shape, kind
            graph.register_initializer(target)
        elif value.name in current:
            graph.register_initializer(current.pop(value.name))
    for value in current.values():
        graph.register_initializer(value)


# onnxscript's shape checks compare dims with ``==``, and onnx-ir's unknown dim equals every
# other unknown dim: a residual Add of [?, 4, 8] and [?, 4, 8] (batch 3 and batch 1) passed as
# an Add of equal shapes. While the rules run, each unknown dim of the working copy gets a
# name of its own (so it equals nothing but itself); the names go again before the result
# is adopted.
UNKNOWN_DIM_PREFIX = "graphopt_unknown_dim_"
_unknown_dims = itertools.count()


def _values(model: ir.Model) -> Iterator[ir.Value]:
    """Graph inputs and every node output of the main graph and the model's functions."""
    yield from model.graph.inputs
    for node in model.graph.all_nodes():
        yield from node.outputs
    for function in model.functions.values():
        yield from function.inputs
        for node in function.all_nodes():
            yield from node.outputs


def name_unknown_dims(model: ir.Model) -> None:
    """Give every unknown dim of ``model`` a name no other dim has."""
    for value in _values(model):
        shape = value.shape
        if shape is None or not any(_is_unknown(d) for d in shape.dims):
            continue
        value.shape = ir.Shape([_fresh_dim() if _is_unknown(d) else d for d in shape.dims])


def forget_unknown_names(model: ir.Model) -> None:
    """Undo :func:`name_unknown_dims`, also on values that inherited such a name."""
    for value in _values(model):
        shape = value.shape
        if shape is None or not any(_is_placeholder(d) for d in shape.dims):
            continue
        value.shape = ir.Shape([None if _is_placeholder(d) else d for d in shape.dims])


def _fresh_dim() -> ir.SymbolicDim:
    return ir.SymbolicDim(f"{UNKNOWN_DIM_PREFIX}{next(_unknown_dims)}")


def _is_unknown(dim: int | ir.SymbolicDim) -> bool:
    return not isinstance(dim, int) and dim.value is None


def _is_placeholder(dim: int | ir.SymbolicDim) -> bool:
    return (
        not isinstance(dim, int)
        and isinstance(dim.value, str)
        and dim.value.startswith(UNKNOWN_DIM_PREFIX)
    )


def value_shapes(model: ir.Model) -> dict[str, ir.Shape | None]:
    """Shapes of node outputs by name."""
    return {v.name: v.shape for node in model.graph for v in node.outputs if v.name}


def reset_shapes(model: ir.Model, shapes: dict[str, ir.Shape | None]) -> None:
    """Give intermediate values the shapes ONNX's inference found (unknown for new ones)."""
    for node in model.graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = shapes.get(value.name)


def finish(model: ir.Model, context: PassContext) -> None:
    """Inline intermediate fusion functions that no rule consumed; drop dead nodes."""
    # Only onnxscript's intermediate functions: the model's own functions stay as they are.
    common_passes.InlinePass(lambda f: f.domain.startswith(PRIVATE_DOMAIN_PREFIX))(model)
    clean(model, context)
    for domain in [d for d in model.graph.opset_imports if d.startswith(PRIVATE_DOMAIN_PREFIX)]:
        if not any(node.domain == domain for node in model.graph):
            del model.graph.opset_imports[domain]
    if any(node.domain == MS_DOMAIN for node in model.graph):
        model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
        model.opset_imports.setdefault(MS_DOMAIN, 1)


def adopt(model: ir.Model, result: ir.Model) -> None:
    """Make ``model`` (the object the pass manager holds) carry ``result``'s graph."""
    model.graph = result.graph
    model.functions.clear()
    model.functions.update(result.functions)


class OrtFusionPass(GraphPass):
    """Base of the ORT contrib-op fusions (not registered itself)."""

    stage = Stage.FUSION
    exact = True
    # Rewrites the main graph only: onnxscript's rules do not descend into If/Loop bodies.
    handles_subgraphs = False
    # Contrib ops run only on ONNX Runtime.
    targets = frozenset(("ort",))
    # The fusion steps, applied in order to the prepared clone.
    steps: ClassVar[tuple[FusionStep, ...]] = ()
    # The contrib ops this family produces; hits = how many more of them there are after.
    produces: ClassVar[tuple[tuple[str, str], ...]] = ()

    def repair(self, model: ir.Model) -> bool:
        """Fix what the rules got wrong in ``model`` (the clone); False refuses the result."""
        return True

    def rewrite(self, model: ir.Model) -> int:
        before = count_ops(model, self.produces)
        onnx_shapes: dict[str, ir.Shape | None] = {}
        for symbolic in (False, True):
            work = prepare(model.clone(), self.context, symbolic)
            if not symbolic:
                onnx_shapes = value_shapes(work)
            for step in self.steps:
                # Again before each step: shape inference inside a step may add unknown dims.
                name_unknown_dims(work)
                step(work)
            forget_unknown_names(work)
            if not self.repair(work):
                continue
            finish(work, self.context)
            # The rules write opset-15+ forms (Shape's start/end …): respell them for the
            # model's opset, or drop a result that has no valid spelling there.
            if not legalize(work):
                continue
            if symbolic:
                reset_shapes(work, onnx_shapes)
            hits = count_ops(work, self.produces) - before
            if hits > 0:
                adopt(model, work)
                return hits
        return 0
