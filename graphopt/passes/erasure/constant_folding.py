"""Constant folding on top of onnxscript's folder, under graphopt's size rules.

The size rule (``--fold-limit``, ``PassContext.fold_limit_bytes``, default 1 MiB, None = no
limit): a folded result larger than the limit is kept only when it is not larger than the
constant data it replaces, i.e. the bytes of its constant inputs that nobody else reads.
Transposing a 4 MB weight used once is fine; ConstantOfShape/Expand/Tile/Range making a
10 MB tensor out of a few bytes is refused.

The copy rule (any limit but None): a result over :data:`COPY_LIMIT_BYTES` that reads a
constant over that size which stays in the model (a graph output, or read by a node that
does not compute from constants only, so never folds) is not folded unless it replaces at
least its own size. Folding it would store a second copy of the
weight: GPT-2's tied embedding, read by the token Gather and, transposed, by the LM head,
grew by 128,002 parameters (+21% on disk) when Transpose(weight) was folded beside it.

onnxscript's own limits count *elements*, not bytes, and its compensation counts inputs by
element too; graphopt decides itself (``should_fold`` returns True/False for every node) and
re-checks the actual result, so onnxscript's limits never apply.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.private_apis import constant_folding as folding
from graphopt.registry import GraphPass, Stage, register

# Never folded: random ops (a folded draw would be frozen), and Q/DQ, whose folding
# would turn a quantized model's int8 weights back into float ones.
NEVER_FOLD = frozenset(
    {
        "RandomUniform",
        "RandomNormal",
        "RandomUniformLike",
        "RandomNormalLike",
        "Multinomial",
        "Bernoulli",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
    }
)
_NO_LIMIT = 1 << 62
# Above this, a result that copies a weight still read elsewhere is not folded (module doc).
# Shape and index constants (tens of bytes), scalars and small per-channel vectors stay
# well under it and keep folding; the weights whose copies grow a model are far above it
# (a 1000x128 embedding is 512 KB). 4 KiB is a 1024-float32 row: a copy that size is noise.
COPY_LIMIT_BYTES = 4096
logger = logging.getLogger(__name__)


def _has_unmodelled_cast_attributes(node: ir.Node) -> bool:
    """Cast/CastLike with attributes beyond ``to`` (saturate, round_mode)."""
    return editing.is_op(node, ("Cast", "CastLike")) and any(
        name != "to" for name in node.attributes
    )


def _replaced_bytes(node: ir.Node) -> int:
    """Bytes of constant inputs that only this node reads (they go away when it folds)."""
    total = 0
    seen: set[int] = set()
    for value in node.inputs:
        if value is None or id(value) in seen or value.const_value is None:
            continue
        seen.add(id(value))
        if value.is_graph_output() or any(use.node is not node for use in value.uses()):
            continue
        total += value.const_value.nbytes
    return total


def _reads_shared_weight(node: ir.Node) -> bool:
    """Whether ``node`` reads a constant over :data:`COPY_LIMIT_BYTES` that stays in the
    model after it folds: a graph output, or read by a node that does not fold (one with an
    input computed at run time: GPT-2's token Gather reads the tied weight with the ids).
    A constant read only by nodes that fold too goes with them: Swin's shifted-window mask,
    a zero image that Slices and ScatterNDs read, folds whole (refusing each step as a
    copy left 66 more nodes)."""
    for value in node.inputs:
        if value is None or value.const_value is None:
            continue
        if value.const_value.nbytes <= COPY_LIMIT_BYTES:
            continue
        memo: dict[int, bool] = {}
        if value.is_graph_output() or any(
            use.node is not node and not _from_constants(use.node, memo) for use in value.uses()
        ):
            return True
    return False


def _from_constants(node: ir.Node, memo: dict[int, bool], depth: int = 0) -> bool:
    """Whether ``node`` computes from constants only, through its producers (so that it
    may fold in turn): the mask's ScatterND reads the zero image and a Transpose of a Slice
    of it. No graph input, no random op, no subgraph; past 64 producers deep, no."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = False  # a cycle (none in a valid graph) or a repeat: not proven yet
    result = (
        depth < 64
        and node.op_type not in NEVER_FOLD
        and not any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attr in node.attributes.values()
        )
    )
    for value in node.inputs if result else ():
        if value is None or value.const_value is not None:
            continue
        producer = value.producer()
        if producer is None or not _from_constants(producer, memo, depth + 1):
            result = False
            break
    memo[id(node)] = result
    return result


def _static_nbytes(value: ir.Value) -> int | None:
    dims = editing.static_shape(value)
    if dims is None or value.dtype is None or value.dtype == ir.DataType.STRING:
        return None
    return int(np.prod(dims, dtype=np.int64)) * value.dtype.itemsize


class _LimitedFolder(folding.FoldConstantsPass):
    """onnxscript's folder with the byte rule applied to every new tensor."""

    def __init__(self, limit: int | None) -> None:
        super().__init__(
            shape_inference=True,
            input_size_limit=_NO_LIMIT,
            output_size_limit=_NO_LIMIT,
            should_fold=self._should_fold,
        )
        self.limit = limit
        self.default_opset = 0  # set per model in call()

    def _allowed(self, node: ir.Node, nbytes: int) -> bool:
        """The size and copy rules (module doc) for a result of ``nbytes``."""
        if self.limit is None:
            return True  # --fold-limit none: every size rule lifted
        if nbytes <= _replaced_bytes(node):
            return True  # the model does not grow
        if nbytes > COPY_LIMIT_BYTES and _reads_shared_weight(node):
            return False  # a second copy of a weight that stays
        return nbytes <= self.limit

    def _should_fold(self, node: ir.Node) -> bool:
        if not editing.is_op(node, node.op_type):
            return False  # other domains: the reference evaluator is not ORT
        if node.op_type in NEVER_FOLD:
            return False
        # Decide before evaluating when the output size is known (saves memory and time).
        for output in node.outputs:
            nbytes = _static_nbytes(output)
            if nbytes is not None and not self._allowed(node, nbytes):
                return False
        return True

    def call(self, model: ir.Model):  # type: ignore[override]
        imports = model.opset_imports
        self.default_opset = imports.get("", imports.get("ai.onnx", 0))
        return super().call(model)

    def process_node(self, node: ir.Node, is_function: bool):  # type: ignore[override]
        if node.op_type in _SEQUENCE_REWRITES and self.default_opset < 13:
            # onnxscript rewrites these into Unsqueeze/Split with axes as an input, which
            # needs opset 13: below it the model would be invalid (rolled back by verification,
            # written as it is with --no-verify).
            return None
        if node.op_type == "Abs" and not _is_dims(node.inputs[0]):
            # onnxscript turns Abs of any symbolic shape value into Identity, assuming every
            # symbolic value is a dim (>= 0); Shape(x)[0:1] - 5 is not (error 2.0 at N=2).
            # Only a Shape's own output is sure to be non-negative.
            return None
        if _has_unmodelled_cast_attributes(node):
            # onnxscript rewrites CastLike into Cast(to=...) and drops `saturate` (and would
            # drop any newer attribute): leave such casts alone.
            return None
        try:
            return super().process_node(node, is_function)
        except RuntimeError as exc:
            # An evaluator that fails on one node (e.g. SplitToSequence with a runtime split)
            # only means this node is not folded, not that the whole pass fails.
            logger.info("not folding %s (%s): %s", node.name, node.op_type, exc)
            return None

    def _prepare_folded_tensor(self, node, output_name, output_array):  # type: ignore[override]
        if isinstance(output_array, np.ndarray) and not self._allowed(node, output_array.nbytes):
            return None
        return super()._prepare_folded_tensor(node, output_name, output_array)


def _is_dims(value: ir.Value | None) -> bool:
    """A constant, or the output of a Shape node: Abs of it is safe to fold either way."""
    if value is None:
        return False
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Shape")


# Ops onnxscript's folder rewrites (not folds) into opset-13 forms.
_SEQUENCE_REWRITES = frozenset({"ConcatFromSequence", "SplitToSequence"})


def _graph_input_constants(model: ir.Model) -> list[tuple[ir.Value, ir.TensorProtocol]]:
    """Initializers that are also graph inputs: the caller may feed them, so not constant."""
    found = []
    for graph in model.graphs():
        for value in graph.inputs:
            if value.const_value is not None:
                found.append((value, value.const_value))
    return found


def _count(model: ir.Model) -> int:
    return sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph))


@register
class ConstantFoldingPass(GraphPass):
    """Fold standard ops with constant inputs under the byte rule (see module); no random ops."""

    name = "constant-folding"
    stage = Stage.CLEANUP
    # Infers shapes node by node: the costliest cleanup pass, rerun every fixed-point round.
    memoize = True

    def rewrite(self, model: ir.Model) -> int:
        hidden = _graph_input_constants(model)
        for value, _ in hidden:
            value.const_value = None  # onnxscript reads const_value of inputs in places
        outputs = [(v, v.name, v.type, v.shape) for v in model.graph.outputs]
        before = _count(model)
        try:
            folded = _LimitedFolder(self.context.fold_limit_bytes)(model)
        finally:
            for value, tensor in hidden:
                value.const_value = tensor
        # The folder infers shapes as it goes; the graph's signature must not change.
        for index, (value, name, type_, shape) in enumerate(outputs):
            current = model.graph.outputs[index]
            current.name = name
            if current is value:
                value.type, value.shape = type_, shape
        # Hits are the nodes folded away; a rewrite that removes none still counts as a change
        # (onnxscript turns ConcatFromSequence of a SequenceConstruct into Unsqueeze + Concat):
        # reported as none, a broken one was never replayed and rolled back.
        return max(before - _count(model), 1 if folded.modified else 0)
