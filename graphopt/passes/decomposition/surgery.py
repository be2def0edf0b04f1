"""Writing a decomposition plan into a copy of the model: smaller weights, fixed shapes.

The MLP's intermediate units go with pruning's channel removal (the ZIG group says which
parameter slices and size constants belong to a unit); the down projection is then replaced
by its Nyström refit. Attention head dims are not ZIG units (a head's dims are coupled in
Q·Kᵀ), so Q/K/V/O weights, biases and the head-split/merge Reshape entries are rewritten
here, on the nodes :mod:`.modules` found. Q, K and V cut from one fused projection by a
Split are written together by :func:`.fused.write` (one weight, one Split).

``padded=True`` writes the same numbers at the original sizes, zeros in the dropped
channels, and touches no shape: a model that must compute what the shrunk one computes.
The pass compares the two to prove the shape surgery (see ``decomposer._verify``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.analysis.zig import ZigReport
from graphopt.editing import add_initializer
from graphopt.passes.decomposition import fused
from graphopt.passes.decomposition.modules import Attention, Found, Mlp, Projection
from graphopt.passes.pruning.channel_removal import remove_channels, set_shape_entry

TAG = "graphopt.decompose.node"


@dataclass
class MlpPlan:
    mlp: Mlp
    keep: np.ndarray  # kept unit indices, ascending
    down: np.ndarray  # refit down projection [kept, out]


@dataclass
class QkPlan:
    att: Attention
    keep: np.ndarray  # kept flat column indices of Q and K (same in both)


@dataclass
class VoPlan:
    att: Attention
    rank: int  # kept dims per head
    v_weight: np.ndarray  # [in, H*D] rotated, dims of each head sorted by singular value
    v_bias: np.ndarray | None  # rotated V bias (None: V has no bias left after folding)
    o_weight: np.ndarray  # [H*D, out] rotated
    o_bias: np.ndarray | None  # O bias with the V bias folded in (None: unchanged)

    def kept(self) -> np.ndarray:
        d = self.att.head_dim
        return np.concatenate([h * d + np.arange(self.rank) for h in range(self.att.heads)])


@dataclass
class Plan:
    mlps: list[MlpPlan] = field(default_factory=list)
    qks: list[QkPlan] = field(default_factory=list)
    vos: list[VoPlan] = field(default_factory=list)


def build(
    model: ir.Model,
    report: ZigReport,
    found: Found,
    plan: Plan,
    padded: bool,
    keep_shapes: bool = False,
) -> ir.Model:
    """A copy of ``model`` with ``plan`` written in (``padded``: at the original sizes).

    ``keep_shapes``: the declared shapes stay, the resized dims re-inferred (for the model
    the pass hands on: the symbolic batch/sequence names and head counts are what ORT's
    attention fusions check). The trial builds of the search skip it (it doubled the pass's
    time); their FLOPs are counted at the inferred shapes."""
    wanted = _wanted_nodes(plan)
    nodes = list(model.graph)
    for i in wanted:
        nodes[i].metadata_props[TAG] = str(i)
    try:
        if padded:
            clone = model.clone()
        else:
            removed = {}
            for mp in plan.mlps:
                group = next(g for g in report.groups if g.id == mp.mlp.group)
                gone = [u for u in range(group.size) if u not in set(mp.keep.tolist())]
                removed.update(group.unit_indices(gone))
            clone = remove_channels(model, report.graph, removed, keep_shapes=keep_shapes)
    finally:
        for i in wanted:
            nodes[i].metadata_props.pop(TAG, None)
    tagged = {int(n.metadata_props.pop(TAG)): n for n in clone.graph if TAG in n.metadata_props}
    analysed = list(report.graph.model.graph)
    g = clone.graph
    for mp in plan.mlps:
        _write_mlp(g, tagged, mp, padded)
    ranges: dict[int, tuple[fused.FusedSource, dict[int, fused.Range]]] = {}
    for qp in plan.qks:
        for proj in (qp.att.q, qp.att.k):
            if proj.fused is not None:
                _add_range(ranges, proj, fused.Range(qp.keep, proj.weight, proj.bias))
                _write_head_split(g, tagged, analysed, report, proj, qp.keep, qp.att, padded)
            else:
                _write_projection(g, tagged, analysed, report, proj, qp.keep, proj.weight,
                                  proj.bias, qp.att.head_dim, padded)  # fmt: skip
    for vp in plan.vos:
        v = vp.att.v
        if v.fused is not None:
            _add_range(ranges, v, fused.Range(vp.kept(), vp.v_weight, vp.v_bias))
            _write_head_split(g, tagged, analysed, report, v, vp.kept(), vp.att, padded)
        _write_vo(g, tagged, analysed, report, vp, padded)
    for split in sorted(ranges):
        source, parts = ranges[split]
        fused.write(g, tagged, analysed, report, source, parts, padded)
    _drop_unused_initializers(g)
    if keep_shapes and not padded:
        from graphopt.analysis.shapes import reinfer_shapes

        reinfer_shapes(clone)  # the head ranks resized dims the declared shapes still state
    return clone


def _drop_unused_initializers(g: ir.Graph) -> None:
    """The weights and shape constants the rewrite replaced: nothing reads them any more, and
    a session built on the model should not have to carry (or look for) them."""
    for name in [n for n, v in g.initializers.items() if not v.uses()]:
        value = g.initializers[name]
        if not value.is_graph_output() and not value.is_graph_input():
            g.initializers.pop(name)


def _add_range(ranges, proj: Projection, part: fused.Range) -> None:
    source = proj.fused
    ranges.setdefault(source.split, (source, {}))[1][source.part] = part


def _wanted_nodes(plan: Plan) -> list[int]:
    wanted: set[int] = {mp.mlp.consumer.node_index for mp in plan.mlps}
    for att in [qp.att for qp in plan.qks] + [vp.att for vp in plan.vos]:
        for proj in (att.q, att.k, att.v):
            if proj is not None:
                found = (proj.matmul, proj.bias_add, proj.reshape)
                wanted.update(i for i in found if i is not None)
                if proj.fused is not None:
                    wanted.update((proj.fused.split, *proj.fused.reshapes))
        wanted.update(i for i in (att.merge, att.o_matmul, att.o_bias_add) if i is not None)
        wanted.update(i for i, _ in att.extra_merges)
    return sorted(wanted)


def _set_input(g: ir.Graph, node: ir.Node, slot: int, array: np.ndarray, base: str) -> None:
    """A fresh initializer for ``node``'s input ``slot``: exporters share weights (identical
    zero biases become one initializer), so nothing is ever edited in place."""
    fresh = add_initializer(g, f"{base}_decomposed", np.ascontiguousarray(array, np.float32))
    node.replace_input_with(slot, fresh)


def _write_mlp(g: ir.Graph, tagged: dict[int, ir.Node], mp: MlpPlan, padded: bool) -> None:
    node = tagged[mp.mlp.consumer.node_index]
    down = mp.down
    if padded:
        down = np.zeros_like(mp.mlp.down)
        down[mp.keep] = mp.down
    array = down.T if mp.mlp.consumer.trans_b else down
    _set_input(g, node, 1, array, node.inputs[1].name)


def _write_projection(
    g, tagged, analysed, report, proj: Projection, keep, weight, bias, head_dim, padded
) -> None:
    """Keep columns ``keep`` of a Q/K/V projection (and its bias); fix the head split."""
    if padded:
        mask = np.zeros(weight.shape[1], dtype=bool)
        mask[keep] = True
        new_w = np.where(mask, weight, 0.0)
        new_b = None if bias is None else np.where(mask, bias, 0.0)
    else:
        new_w = weight[:, keep]
        new_b = None if bias is None else bias[keep]
    matmul = tagged[proj.matmul]
    _set_input(g, matmul, 1, new_w, matmul.inputs[1].name)
    if proj.bias_add is not None and new_b is not None:
        add = tagged[proj.bias_add]
        _set_input(g, add, proj.bias_slot, new_b, add.inputs[proj.bias_slot].name)
    heads = weight.shape[1] // head_dim
    if not padded and proj.rewrite_entry:
        node = tagged[proj.reshape]
        set_shape_entry(g, node, analysed[proj.reshape], report.graph, 1, 3, len(keep) // heads)


def _write_head_split(g, tagged, analysed, report, proj: Projection, keep, att, padded) -> None:
    """The head dim of a fused projection's head-split Reshape (its columns: :mod:`.fused`)."""
    if not padded and proj.rewrite_entry:
        node = tagged[proj.reshape]
        set_shape_entry(g, node, analysed[proj.reshape], report.graph, 1, 3, len(keep) // att.heads)


def _write_vo(g, tagged, analysed, report, vp: VoPlan, padded: bool) -> None:
    att = vp.att
    keep = vp.kept()
    if att.v.fused is None:
        _write_projection(
            g, tagged, analysed, report, att.v, keep, vp.v_weight, vp.v_bias, att.head_dim, padded
        )
    if att.v.fused is None and att.v.bias_add is not None and vp.v_bias is None:
        # The V bias went into O's bias (softmax rows sum to 1): V's bias is zero now.
        add = tagged[att.v.bias_add]
        width = att.v.weight.shape[1] if padded else len(keep)
        _set_input(g, add, att.v.bias_slot, np.zeros(width), add.inputs[att.v.bias_slot].name)
    o = tagged[att.o_matmul]
    if padded:
        rows = np.zeros(vp.o_weight.shape[0], dtype=bool)
        rows[keep] = True
        o_weight = np.where(rows[:, None], vp.o_weight, 0.0)
    else:
        o_weight = vp.o_weight[keep]
    _set_input(g, o, 1, o_weight.T if att.o_trans_b else o_weight, o.inputs[1].name)
    if vp.o_bias is not None:
        add = tagged[att.o_bias_add]
        _set_input(g, add, att.o_bias_slot, vp.o_bias, add.inputs[att.o_bias_slot].name)
    if not padded and att.merge_entry:
        node = tagged[att.merge]
        position = att.merge_rank - 1
        set_shape_entry(g, node, analysed[att.merge], report.graph, 1, position, len(keep))
    for i, position in att.extra_merges if not padded else ():
        set_shape_entry(g, tagged[i], analysed[i], report.graph, 1, position, len(keep))
