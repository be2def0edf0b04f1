"""A Reshape target computed from shapes becomes a constant, wherever that is exact.

Exporters spell ``x.view(*y.shape[:-2], 64, 197)`` as Shape→Slice→Concat→Reshape, and
Swin's window partition ``x.view(B * 64, 49, C)`` as Shape→Gather→Mul→Unsqueeze→Concat:
targets built at run time whose entries are mostly static. Each entry of the target is
followed back (:mod:`graphopt.analysis.shape_entries`: Concat, Gather, Slice, Unsqueeze,
Cast…) to a constant, a dim read by Shape, or something computed (Mul, Div…). Then:

- a constant, or a static dim, is written as is;
- a read of the Reshape input's own dim at the same position, or of a dim named like a
  graph-input dim (batch, sequence) that the input has at that position, becomes 0
  (without ``allowzero``: "copy the input's dim"), exact whatever that dim is; a name
  counts only where inference from the graph inputs puts it on both tensors
  (:mod:`graphopt.passes.erasure.derived_dims`), never on a value_info's word alone;
- when every entry but one is a positive constant, that one becomes -1, whatever computes
  it (a lone copy too: the usual spelling of a batch dim). Reshape then has one solution
  for it (the element count fixes it; with zero elements it is 0 both ways). A computed
  entry next to a 0 (a copied dim may be 0) or a -1 has no unique solution: kept.

The Shape, Gather, Concat… feeding the old target — and whatever only fed them — then die.
Shapes are re-inferred from the graph inputs first (a stale declared dim would be baked in).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.analysis.channel_shapes import Context
from graphopt.analysis.shape_entries import DimRef, shape_source, vector_length
from graphopt.analysis.shapes import reconcile_shapes
from graphopt.passes.erasure.derived_dims import DerivedDims
from graphopt.registry import GraphPass, Stage, register

# Longest computed target rewritten (Reshape targets are a handful of entries).
_MAX_ENTRIES = 64
# Marks an entry that copies the Reshape input's dim at its position (written as 0).
_COPY = "copy"


def _entry(ctx: Context, node: ir.Node, position: int, derived: DerivedDims) -> int | str | None:
    """What the target of Reshape ``node`` holds at ``position``: an int, ``_COPY``, or None
    when its value is only known at run time."""
    source = shape_source(ctx, node.inputs[1], position)
    if not isinstance(source, DimRef):
        return source
    shape = ctx.shape(source.value)
    dim = shape[source.axis] if shape is not None and source.axis < len(shape) else None
    if isinstance(dim, int):
        return dim * source.scale
    if source.scale != 1:
        return None
    if source.value is node.inputs[0] and source.axis == position:
        return _COPY
    # Another tensor's dim named like an input dim (batch, sequence) that the Reshape input
    # has at this very position: the same size (x.view(B, S, H, D) with B, S read off the
    # tensor before the projection). Only names inference derives from the inputs: a
    # value_info may call a dim S that is really T, and the two-shape check gives S and T
    # equal sizes. Names, not Context's text: it writes unknown dims as '?', which a model
    # may use as a real name.
    if derived.same(source.value, source.axis, node.inputs[0], position):
        return _COPY
    return None


def known_target(ctx: Context, node: ir.Node, derived: DerivedDims) -> list[int] | None:
    """A constant target equivalent to Reshape ``node``'s computed one, or None.

    ``derived``: the graph inputs' symbolic dims where inference puts them (equal names,
    equal sizes).
    """
    length = vector_length(ctx, node.inputs[1])
    if length is None or not 0 < length <= _MAX_ENTRIES:
        return None
    entries = [_entry(ctx, node, p, derived) for p in range(length)]
    allowzero = editing.attribute(node, "allowzero", 0)
    if _COPY in entries and allowzero:
        # 0 would mean a zero-size dim, not a copy: the input dims must stay read.
        entries = [None if e == _COPY else e for e in entries]
    varying = [p for p, e in enumerate(entries) if not isinstance(e, int)]
    if len(varying) == 1 and all(e > 0 for e in entries if isinstance(e, int)):
        # The usual -1 (also for a lone copy: the conventional spelling of a batch dim).
        return [-1 if p in varying else e for p, e in enumerate(entries)]
    if None in entries:
        return None  # -1 next to a 0, a copy or a -1: no unique solution
    return [0 if e == _COPY else e for e in entries]


@register
class ReshapeTargetPass(GraphPass):
    """Computed Reshape targets → constants (copied dims 0, one computed dim -1); else keep.

    Refuses when more than one entry is computed, or one is next to a 0 or -1.
    """

    name = "reshape-target"
    ops = frozenset(("Reshape",))
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        reconcile_shapes(model)
        ctx = Context()
        derived = DerivedDims(model)
        hits = 0
        for node in editing.all_nodes(model):
            if not editing.is_op(node, "Reshape") or len(node.inputs) < 2 or node.graph is None:
                continue
            target = node.inputs[1]
            if target is None or editing.is_constant(target) or node.inputs[0] is None:
                continue
            known = known_target(ctx, node, derived)
            if known is None:
                continue
            base = (target.name or "reshape_target") + "_known"
            array = np.array(known, dtype=np.int64)
            node.replace_input_with(1, editing.add_constant(node, base, array))
            producer = target.producer()
            if producer is not None:
                _remove_dead_chain(producer)
            hits += 1
        return hits


def _remove_dead_chain(node: ir.Node) -> None:
    """Remove ``node`` and, recursively, the producers only it read (when all are dead)."""
    inputs = list(node.inputs)
    if node.graph is None or not editing.remove_if_dead(node):
        return
    for value in inputs:
        producer = value.producer() if value is not None else None
        if producer is not None:
            _remove_dead_chain(producer)
