"""Finding the modules MoDeGPT decomposes in an exported transformer graph.

* MLP: a zero-invariant group of single-element units (the intermediate width: the up and
  gate columns, their biases, the down rows) with exactly one linear consumer (the down
  projection), from the ZIG analysis pruning uses (:mod:`graphopt.analysis.zig`).
* Attention: from each ``Softmax``, back to the score ``MatMul`` (Q·Kᵀ) and forward to the
  ``MatMul`` with V; each of Q, K and V traced back through Transpose, one head-split
  Reshape and scalar scaling to its projection ``MatMul`` (and bias ``Add``); the output
  traced forward through Transpose and the head-merge Reshape to the O projection.

A fused QKV projection (GPT-2: one MatMul/Gemm whose columns a Split cuts into q, k, v) is
followed through the Split by :mod:`.fused`; the O projection may be a Gemm, and the head
merge may flatten to 2-D (``[B·S, H·D]``). Anything else on those paths (rotary
Slice/Neg/Concat, an Expand repeating K/V heads for grouped-query attention, a shape computed
at run time) leaves the module as it is, with the reason: the rewrite only handles what it
can prove.
Nodes are referred to by their position in the analysed graph's node list, which has the
same order as the model's (:func:`graphopt.analysis.dependency.build_on_inferred`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.analysis.shape_entries import DimRef, constant_piece, shape_source
from graphopt.analysis.zig import ZigReport
from graphopt.editing import attribute, constant_array
from graphopt.passes.decomposition.fused import FusedSource, readers, shared, through_split
from graphopt.passes.pruning.consumers import Consumer, find_consumers

# Ops that may stand between the score and the Softmax (scaling, masking, dtype changes).
SCORE_OPS = frozenset({"Add", "Mul", "Div", "Sub", "Where", "Cast"})
# What a path op means when it stops a trace: the reason reported.
WHY = {
    "Slice": "rotary embedding (Slice/Neg/Concat) between projection and score",
    "Neg": "rotary embedding (Slice/Neg/Concat) between projection and score",
    "Concat": "rotary embedding (Slice/Neg/Concat) between projection and score",
    "Add": "rotary embedding (or another Add) between the head split and the score",
    "Expand": "grouped-query attention (K/V heads repeated by Expand)",
    "Unsqueeze": "grouped-query attention (K/V heads repeated)",
}


@dataclass
class Projection:
    """One of Q, K, V: ``X @ W (+ b)`` then a head-split Reshape to ``[.., H, D]``."""

    matmul: int  # node index of the projection MatMul
    weight: np.ndarray  # [in, H*D]
    bias_add: int | None  # node index of the bias Add
    bias_slot: int  # which input of the Add is the bias
    bias: np.ndarray | None
    reshape: int  # node index of the head-split Reshape
    rewrite_entry: bool  # whether the Reshape's D entry is a number to rewrite (not -1)
    input_name: str  # the projection's data input (its correlation drives the choice)
    fused: FusedSource | None = None  # q/k/v as a column range of a fused projection


@dataclass
class Attention:
    """One attention block: Q, K, V projections, heads, head dim, the O projection."""

    layer: int
    heads: int
    head_dim: int
    q: Projection | None = None
    k: Projection | None = None
    v: Projection | None = None
    merge: int | None = None  # head-merge Reshape
    merge_entry: bool = False  # its H*D entry is a number to rewrite
    merge_rank: int = 3  # the head merge's output rank (2 when it also flattens B·S)
    extra_merges: tuple[tuple[int, int], ...] = ()  # other head merges: (node, width entry)
    o_matmul: int | None = None
    o_weight: np.ndarray | None = None  # [H*D, out]
    o_trans_b: bool = False  # O is a Gemm with transB (weight stored [out, H*D])
    o_bias_add: int | None = None
    o_bias_slot: int = 1
    o_bias: np.ndarray | None = None
    qk_reason: str = ""  # why Q/K is left as it is ("" when it can be decomposed)
    vo_reason: str = ""


@dataclass
class Mlp:
    """One MLP: the ZIG group of its intermediate units and the down projection."""

    layer: int
    group: int  # ZIG group id
    consumer: Consumer
    down: np.ndarray  # [units, out] (MatMul layout, transposed from a transB Gemm)
    width: int


@dataclass
class Found:
    mlps: list[Mlp] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (where, kind, why)


def find_modules(report: ZigReport) -> Found:
    """The MLPs and attention blocks of the analysed model, in graph order."""
    graph = report.graph.model.graph
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    found = Found()
    _find_mlps(report, index, found)
    for node in nodes:
        if node.op_type == "Softmax":
            found.attentions.append(_attention(report, node, index, len(found.attentions)))
    for att in found.attentions:
        where = f"attention {att.layer}"
        if att.qk_reason:
            found.skipped.append((where, "qk", att.qk_reason))
        if att.vo_reason:
            found.skipped.append((where, "vo", att.vo_reason))
    return found


def _find_mlps(report: ZigReport, index: dict[int, int], found: Found) -> None:
    groups = [g for g in report.prunable if all(len(m.units[0]) == 1 for m in g.members)]
    for group in groups:
        consumers = find_consumers(report, [group])
        if len(consumers) != 1:
            continue  # not an up → nonlinearity → down chain (e.g. a Conv channel group)
        consumer = consumers[0]
        weight = constant_array(report.graph.dims[consumer.weight_key].value)
        if weight is None or weight.ndim != 2:
            continue
        down = weight.T if consumer.trans_b else weight
        found.mlps.append(
            Mlp(len(found.mlps), group.id, consumer, down.astype(np.float64), group.size)
        )
    found.mlps.sort(key=lambda m: m.consumer.node_index)
    for i, mlp in enumerate(found.mlps):
        mlp.layer = i


def _attention(report: ZigReport, softmax: ir.Node, index: dict[int, int], n: int) -> Attention:
    ctx = report.graph.context
    att = Attention(n, 0, 0)
    score = _score_matmul(softmax)
    av = _av_matmul(softmax)
    if score is None or av is None:
        att.qk_reason = att.vo_reason = "Softmax not between a Q·Kᵀ MatMul and a MatMul with V"
        return att
    q, why_q = _projection(ctx, score.inputs[0], index, want_last=True)
    k, why_k = _projection(ctx, score.inputs[1], index, want_last=False)
    v, why_v = _projection(ctx, av.inputs[1], index, want_last=True)
    att.q, att.k, att.v = (p[0] if p else None for p in (q, k, v))
    dims = [p[1] for p in (q, k, v) if p]
    if dims:
        att.heads, att.head_dim = dims[0]
    att.qk_reason = why_q or why_k
    if not att.qk_reason and q[1] != k[1]:
        att.qk_reason = f"Q heads×dim {q[1]} differ from K's {k[1]}"
    att.vo_reason = why_v or _output(ctx, av, index, att, v[1] if v else None)
    if not att.vo_reason and v[1] != dims[0]:
        # V/O's plan reads the block's head dim: a V whose heads x dim differ from Q's (a
        # model decomposed once already, whose V kept fewer dims per head) is left alone.
        att.vo_reason = f"V heads×dim {v[1]} differ from Q's {dims[0]}"
    return att


def _score_matmul(softmax: ir.Node) -> ir.Node | None:
    frontier = [softmax.inputs[0]]
    for _ in range(6):
        following = []
        for value in frontier:
            node = value.producer() if value is not None else None
            if node is None:
                continue
            if node.op_type == "MatMul" and not any(_const(x) for x in node.inputs):
                return node
            if node.op_type in SCORE_OPS:
                following.extend(node.inputs)
        frontier = following
    return None


def _av_matmul(softmax: ir.Node) -> ir.Node | None:
    value = softmax.outputs[0]
    for _ in range(3):
        uses = [u.node for u in value.uses()]
        if len(uses) != 1:
            return None
        node = uses[0]
        if node.op_type == "MatMul" and node.inputs[0] is value:
            return node
        if node.op_type not in ("Cast", "Dropout", "Identity"):
            return None
        value = node.outputs[0]
    return None


def _const(value: ir.Value | None) -> bool:
    return value is not None and constant_array(value, max_bytes=1 << 30) is not None


def _projection(ctx, value: ir.Value, index: dict[int, int], want_last: bool):
    """Trace a Q/K/V operand back to its projection: ((Projection, (H, D)), "") or
    (None, reason). ``want_last``: D must be the operand's last axis (Q, V), else the one
    before it (K, transposed)."""
    reshape = None
    axis = -1 if want_last else -2  # where D sits in the current value, from the end
    first = True
    while True:
        node = value.producer()
        if node is None:
            return None, "operand is not computed from a projection"
        if not first and shared(value):
            return None, f"{value.name} has other readers"
        first = False
        op = node.op_type
        if op == "Transpose" and reshape is None:
            perm = attribute(node, "perm")
            if not perm:
                return None, "Transpose without perm"
            axis = perm[len(perm) + axis] - len(perm)  # output axis j reads input perm[j]
            value = node.inputs[0]
        elif op in ("Mul", "Div") and reshape is None and _scalar(node.inputs[1]):
            value = node.inputs[0]
        elif op == "Reshape" and reshape is None:
            shape = ctx.shape(node.outputs[0])
            if shape is None or len(shape) != 4 or axis != -1:
                return None, "head-split Reshape is not to [.., heads, head_dim]"
            heads, dim = shape[2], shape[3]
            if not isinstance(heads, int) or not isinstance(dim, int):
                return None, "head count or head dim not known"
            entry = shape_source(ctx, node.inputs[1], 3)
            if entry == -1:
                rewrite = False
            elif entry == dim and constant_piece(ctx, node.inputs[1], 3) is not None:
                rewrite = True
            else:
                return None, "head dim of the head-split Reshape is computed at run time"
            reshape = (node, heads, dim, rewrite)
            value = node.inputs[0]
        elif op in ("Add", "MatMul") and reshape is not None:
            return _projection_at(node, reshape, index)
        elif op == "Split" and reshape is not None:
            return _fused_at(ctx, node, value, reshape, index)
        else:
            return None, WHY.get(op, f"{op} between the projection and the attention product")


def _projection_at(node: ir.Node, reshape, index):
    split, heads, dim, rewrite = reshape
    bias_add, bias_slot, bias = None, 1, None
    if node.op_type == "Add":
        for slot in (1, 0):
            array = constant_array(node.inputs[slot])
            if array is not None and array.ndim == 1 and array.shape[0] == heads * dim:
                bias_add, bias_slot, bias = node, slot, array.astype(np.float64)
                break
        if bias_add is None:
            return None, "Add after the projection is not a bias"
        data = node.inputs[1 - bias_slot]
        if shared(data):
            return None, "projection output has other readers"
        node = data.producer()
        if node is None or node.op_type != "MatMul":
            return None, "no projection MatMul before the bias"
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.shape[1] != heads * dim:
        return None, "projection weight is not a constant [in, heads*head_dim] matrix"
    projection = Projection(
        index[id(node)],
        weight.astype(np.float64),
        index[id(bias_add)] if bias_add is not None else None,
        bias_slot,
        bias,
        index[id(split)],
        rewrite,
        node.inputs[0].name,
    )
    return (projection, (heads, dim)), ""


def _fused_at(ctx, split: ir.Node, value: ir.Value, reshape, index):
    head_split, heads, dim, rewrite = reshape
    found, why = through_split(ctx, split, value, heads, dim, index)
    if found is None:
        return None, why
    source, input_name = found
    cols = slice(source.offset, source.offset + heads * dim)
    projection = Projection(
        source.matmul,
        source.weight[:, cols],
        source.bias_node,
        source.bias_slot,
        None if source.bias is None else source.bias[cols],
        index[id(head_split)],
        rewrite,
        input_name,
        source,
    )
    return (projection, (heads, dim)), ""


def _scalar(value: ir.Value | None) -> bool:
    array = constant_array(value)
    return array is not None and array.size == 1


def _output(ctx, av: ir.Node, index: dict[int, int], att: Attention, hd) -> str:
    """Trace the attention output to the O projection; "" when found (``att`` filled)."""
    if hd is None:
        return "no V projection"
    heads, dim = hd
    value = av.outputs[0]
    axis_h, axis_d = 1, 3  # [B, H, S, D]
    while True:
        if value.is_graph_output():
            return "attention output has several readers"
        uses = readers(value)
        if len(uses) > 1 and axis_d == 3 and axis_h == 2:
            uses, why = _extra_merges(ctx, value, uses, heads * dim, index, att)
            if why:
                return why
        if len(uses) != 1:
            return "attention output has several readers"
        node = uses[0]
        if node.op_type == "Transpose":
            perm = list(attribute(node, "perm") or [])
            if not perm:
                return "Transpose without perm"
            axis_h, axis_d = perm.index(axis_h), perm.index(axis_d)
            value = node.outputs[0]
            continue
        if node.op_type != "Reshape" or axis_d != 3 or axis_h != 2:
            return f"{node.op_type} between the attention product and the head merge"
        rank, rewrite, why = _merge_width(ctx, node, heads * dim)
        if why:
            return why
        att.merge_rank, att.merge_entry = rank, rewrite
        att.merge = index[id(node)]
        out, why = _flattened(ctx, node.outputs[0], heads * dim)
        if out is None:
            return why
        uses = readers(out)
        if len(uses) != 1 or uses[0].op_type not in ("MatMul", "Gemm"):
            return "head merge is not read by one O projection MatMul"
        o = uses[0]
        if o.inputs[0] is not out or not _plain_gemm(o):
            return "head merge is not read by one O projection MatMul"
        weight = constant_array(o.inputs[1])
        if weight is None or weight.ndim != 2:
            return "O projection weight is not a constant matrix"
        att.o_trans_b = o.op_type == "Gemm" and bool(attribute(o, "transB", 0))
        weight = weight.T if att.o_trans_b else weight
        att.o_matmul, att.o_weight = index[id(o)], weight.astype(np.float64)
        if o.op_type == "Gemm" and len(o.inputs) > 2 and o.inputs[2] is not None:
            array = constant_array(o.inputs[2])
            if array is None or array.shape != (weight.shape[1],):
                return "O projection Gemm bias is not a constant vector"
            att.o_bias_add, att.o_bias_slot = index[id(o)], 2
            att.o_bias = array.astype(np.float64)
            return ""
        after = [u.node for u in o.outputs[0].uses()]
        if len(after) == 1 and after[0].op_type == "Add":
            add = after[0]
            for slot in (1, 0):
                array = constant_array(add.inputs[slot])
                if array is not None and array.shape == (weight.shape[1],):
                    att.o_bias_add, att.o_bias_slot = index[id(add)], slot
                    att.o_bias = array.astype(np.float64)
                    break
        return ""


def _merge_width(ctx, node: ir.Node, width: int) -> tuple[int, bool, str]:
    """A head-merge Reshape's output rank and whether its width entry is a constant to
    rewrite (not when -1 or read at run time), or why it cannot be rewritten."""
    shape = ctx.shape(node.outputs[0])
    if shape is None or len(shape) not in (2, 3) or shape[-1] != width:
        return 0, False, "head-merge Reshape is not to [.., heads*head_dim]"
    entry = shape_source(ctx, node.inputs[1], len(shape) - 1)
    if entry == -1 or isinstance(entry, DimRef):
        return len(shape), False, ""
    if entry == width and constant_piece(ctx, node.inputs[1], len(shape) - 1) is not None:
        return len(shape), True, ""
    return 0, False, "width of the head-merge Reshape is computed at run time"


def _extra_merges(ctx, value, uses, width, index, att: Attention):
    """Several head-merge Reshapes of one attention output (TorchScript exports once folded:
    one feeds O, the others only Shape reads): the one to follow, the others' constant width
    entries noted in ``att.extra_merges`` to rewrite too."""
    if not all(u.op_type == "Reshape" and u.inputs[0] is value for u in uses):
        return uses, "attention output has several readers"
    main = [u for u in uses if readers(u.outputs[0]) or u.outputs[0].is_graph_output()]
    if len(main) != 1:
        return uses, "attention output has several readers"
    for node in uses:
        rank, rewrite, why = _merge_width(ctx, node, width)
        if why:
            return uses, why
        if rewrite and node is not main[0]:
            att.extra_merges += ((index[id(node)], rank - 1),)
    return main, ""


def _flattened(ctx, value: ir.Value, width: int) -> tuple[ir.Value | None, str]:
    """Past Reshapes that only flatten the leading axes (the TorchScript exporter's 2-D Gemm
    input) and state the last one as -1 or read it at run time: nothing to rewrite there."""
    while True:
        if value.is_graph_output():
            return None, "head merge is a model output"
        uses = readers(value)
        if len(uses) != 1 or uses[0].op_type != "Reshape" or uses[0].inputs[0] is not value:
            return value, ""
        node = uses[0]
        shape = ctx.shape(node.outputs[0])
        if not shape or shape[-1] != width:
            return None, "Reshape between the head merge and O changes the width"
        entry = shape_source(ctx, node.inputs[1], len(shape) - 1)
        if isinstance(entry, int) and entry != -1:
            return None, "Reshape between the head merge and O states the width as a constant"
        value = node.outputs[0]


def _plain_gemm(node: ir.Node) -> bool:
    """A MatMul, or a Gemm that is one: no transA, alpha and beta 1."""
    if node.op_type == "MatMul":
        return True
    plain = not attribute(node, "transA", 0) and attribute(node, "alpha", 1.0) == 1.0
    return plain and attribute(node, "beta", 1.0) == 1.0
