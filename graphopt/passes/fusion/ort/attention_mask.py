"""An additive padding/causal mask built from the 2-D attention mask → Attention's mask_index.

transformers builds a float (batch, 1, seq, seq) bias from the (batch, seq) 0/1 mask with a
dozen shape, compare and Where ops, and Attention then reads that bias for every head. ORT's
Attention takes the raw 2-D mask itself (``mask_index``, int32) and, with ``unidirectional``,
the causal part; the mask-building subgraph then goes away as dead code.

The mask subgraph has no single shape across exporters and transformers versions, so instead
of matching it the pass probes it: it evaluates the bias (in ORT) for random 0/1 masks at a
few batch sizes and lengths and accepts only a bias that is 0 exactly where the 2-D mask keeps
a key (and, for the causal form, the key is not after the query) and ≤ -10000 elsewhere.
Those are the masks the rewrite reproduces exactly: softmax weights of masked keys underflow
to 0 in both. A query row whose keys are *all* masked (a fully padded row) is where the two
can differ; the probes (and the tests) keep the first key of every row unmasked.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt import editing
from graphopt.inputs import make_inputs
from graphopt.passes.fusion.ort._base import MS_DOMAIN
from graphopt.registry import GraphPass, Stage, register

# Attention inputs (com.microsoft): input, weights, bias, mask_index, past, attention_bias.
MASK_INDEX, PAST, ATTENTION_BIAS = 3, 4, 5
# (batch, sequence) of each probe; lengths differ so a bias cached for one length is caught.
PROBE_SHAPES = ((2, 7), (1, 5), (3, 12))
# A masked score must be at least this negative (ORT's default mask_filter_value).
MASKED = -10000.0
MASK_TYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL)
# Ops through which an input's shape, not its values, reaches the bias.
SHAPE_ONLY = ("Shape", "Size")


def _value_inputs(value: ir.Value) -> set[ir.Value]:
    """Graph inputs whose values (not only shapes) ``value`` depends on."""
    found: set[ir.Value] = set()
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.is_graph_input():
            found.add(current)
            continue
        node = current.producer()
        if node is None or editing.is_op(node, SHAPE_ONLY):
            continue
        stack.extend(v for v in node.inputs if v is not None)
    return found


def _bias_only_model(model: ir.Model, bias: ir.Value) -> ir.Model:
    """A copy of ``model`` whose only output is the bias, the rest of the graph pruned."""
    probe = model.clone()
    value = next(v for node in probe.graph for v in node.outputs if v.name == bias.name)
    probe.graph.outputs.clear()
    probe.graph.outputs.append(value)
    common_passes.RemoveUnusedNodesPass()(probe)
    return probe


def _probe_masks(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Random 0/1 masks whose first key is always kept (no fully masked query row)."""
    masks = rng.integers(0, 2, size=(batch, length))
    masks[:, 0] = 1
    return masks


def _kind(model: ir.Model, bias: ir.Value, mask: ir.Value) -> str | None:
    """'padding' or 'causal' when the probes show which mask ``bias`` is, else None."""
    from graphopt.verify import run_model  # ORT only when a candidate exists

    probe = _bias_only_model(model, bias)
    rng = np.random.default_rng(0)
    kinds = {"padding", "causal"}
    for batch, length in PROBE_SHAPES:
        shapes = {v.name: (batch, length) for v in probe.graph.inputs if v.shape.rank() == 2}
        if mask.name not in shapes:
            return None
        feeds = make_inputs(probe, shapes, seed=0)
        feeds[mask.name] = _probe_masks(rng, batch, length).astype(feeds[mask.name].dtype)
        try:
            (got,) = run_model(probe, feeds)
        except Exception:  # a bias that does not even run on these shapes is not the mask
            return None
        if got.ndim != 4 or got.shape[3] != length or got.shape[0] not in (1, batch):
            return None
        if got.shape[2] not in (1, length):
            return None
        got = np.broadcast_to(got, (batch, got.shape[1], length, length))  # heads kept
        keep = feeds[mask.name][:, None, None, :] != 0
        causal = np.tril(np.ones((length, length), dtype=bool))
        for kind in list(kinds):
            expected = keep & causal if kind == "causal" else np.broadcast_to(keep, got.shape)
            expected = np.broadcast_to(expected, got.shape)
            if not (np.all(got[expected] == 0) and np.all(got[~expected] <= MASKED)):
                kinds.discard(kind)
        if not kinds:
            return None
    return kinds.pop() if len(kinds) == 1 else None


@register
class OrtAttentionMaskPass(GraphPass):
    """With --target ort: Attention's additive padding/causal bias → its 2-D mask_index."""

    name = "ort-attention-mask"
    targets = frozenset(("ort",))
    stage = Stage.FUSION
    handles_subgraphs = False

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        groups: dict[int, list[ir.Node]] = {}
        biases: dict[int, ir.Value] = {}
        for node in graph:
            if node.domain != MS_DOMAIN or node.op_type != "Attention" or len(node.inputs) < 6:
                continue
            if any(node.inputs[i] is not None for i in (MASK_INDEX, PAST)):
                continue
            if node.inputs[ATTENTION_BIAS] is None or node.attributes.get("unidirectional"):
                continue
            bias = node.inputs[ATTENTION_BIAS]
            groups.setdefault(id(bias), []).append(node)
            biases[id(bias)] = bias
        hits = 0
        casts: dict[int, ir.Value] = {}
        for key, nodes in groups.items():
            bias = biases[key]
            sources = _value_inputs(bias)
            if len(sources) != 1:
                continue
            (mask,) = sources
            if mask.dtype not in MASK_TYPES or mask.shape is None or mask.shape.rank() != 2:
                continue
            kind = _kind(model, bias, mask)
            if kind is None:
                continue
            if id(mask) not in casts:
                cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32})
                cast.outputs[0].name = editing.unique_name(graph, f"{mask.name}_int32")
                cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.INT32, mask.shape
                graph.insert_before(graph.node(0), [cast])
                casts[id(mask)] = cast.outputs[0]
            for node in nodes:
                node.replace_input_with(MASK_INDEX, casts[id(mask)])
                node.replace_input_with(ATTENTION_BIAS, None)
                node.resize_inputs(MASK_INDEX + 1)  # no trailing empty inputs
                if kind == "causal":
                    node.attributes["unidirectional"] = ir.AttrInt64("unidirectional", 1)
                hits += 1
        return hits
