"""Grouped-query attention (K/V heads repeated to Q's) → com.microsoft GroupQueryAttention.

LLaMA, Qwen2, Mistral… project K and V to fewer heads than Q and repeat each K/V head
``G = H / Hkv`` times (Unsqueeze → Expand → Reshape) before a plain scaled dot-product
attention. ORT's GroupQueryAttention reads the Hkv heads directly: no repeated copies of K/V,
no head transposes, one kernel.

What is matched (after onnxscript's SDPA rule has turned Q·Kᵀ·scale + mask → Softmax → ·V into
its private SDPA op): K and V of Hkv heads repeated to H = G·Hkv heads (Unsqueeze(2) →
Expand → Reshape), the output transposed back and reshaped to (B, S, H·Dh), and either

- Q, K and V as (B, S, ·) projections reshaped to (B, S, heads, Dh) and transposed to
  (B, heads, S, Dh), Q and K optionally through a com.microsoft RotaryEmbedding (``ort-rotary``
  runs before): GQA takes the projections directly; or
- any (B, heads, S, Dh) Q, K, V (e.g. rotated by a RoPE form ``ort-rotary`` did not fuse, as
  in the TorchScript LLaMA export): they are transposed back to (B, S, ·) for GQA.

Every shape is checked on the inferred shapes (the same symbolic batch and sequence
throughout, static head counts, H = G·Hkv, heads·Dh = hidden), so the repetition maps query
head h to K/V head h // G, which is GroupQueryAttention's grouping.

What it becomes, and why each choice keeps the outputs equal:

- **Rotary stays a separate RotaryEmbedding**, applied to the (B, S, H·Dh) projection (the
  contrib op reads 3-D input as (B, S, num_heads, head_size), the same rotation), with the
  model's own positions and cos/sin. GQA's built-in rotary (``do_rotary``) derives positions
  from the sequence offset, which is only equal when the model's positions are 0..S-1; keeping
  the op separate is exact for any positions. (Measured: folding it into GQA on llama_tiny,
  where the positions are 0..S-1, gained ~1%, within noise: not worth the proof.)
- **No KV cache**: patterns that concatenate past key/values are not matched (no ``past_key``),
  so GQA sees a first prompt: ``seqlens_k[b] = S - 1`` for every row, ``total_sequence_length
  = S``, both computed from V's shape at run time.
- **The model's mask is passed whole as ``attention_bias``** (broadcast to (1|B, 1|H, S, S))
  with ``causal=0``: softmax over all S keys of Q·Kᵀ·scale + bias, the original computation,
  so any padding (left, right, holes) and even fully masked rows come out as the model
  computes them. ``causal=1`` would also be exact wherever a query row keeps at least one key
  (the bias already sends later keys to exp(…) = 0), but on ORT 1.32's CPU kernel it is the
  slower variant: 275 µs vs 231 µs at B=1, S=128, 4/2 heads of 32 (CPU time, median of 30
  rounds, shared 2-core machine at load ≈ 9; S=512: 4.04 ms vs 3.64 ms), and it differs on
  fully masked rows (left padding).
- The scale is the SDPA's (Q·Kᵀ scale, or 1/√Dh), written explicitly.
- Head sizes that are not a multiple of 8 are left alone: ORT's kernel rejects them.
- Graphs with a NaN-guarded softmax (Where(IsNaN(p), 0, p), which onnxscript's SDPA rule
  absorbs) are left alone: it zeroes the rows a -inf mask masks entirely, GQA would not.

Afterwards two exact Shape rewrites let the old head transposes and the per-layer rotary
caches die: Shape(Transpose(x)) reads x where the permutation fixes the sliced axes, and
Shape(Reshape(x, Concat(b, …), allowzero=1))[0] is ``b``. On llama_tiny the ``--target ort``
output has 108 nodes (one cos/sin cache instead of four) where the MultiHeadAttention form
had 178.
"""

from __future__ import annotations

import math
from functools import partial

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graphopt.passes.fusion.ort._base import MS_DOMAIN, PRIVATE_DOMAIN_PREFIX, OrtFusionPass
from graphopt.passes.fusion.ort._sdpa import fuse_sdpa
from graphopt.private_apis import fusion_utils as _fusion_utils
from graphopt.registry import register

# Element types ORT's CPU GroupQueryAttention kernel is registered for.
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class GroupQueryAttentionRule(pattern.RewriteRuleClassBase):
    """SDPA over K/V heads repeated to the query heads → GroupQueryAttention."""

    def __init__(self, name: str, has_mask: bool, projections: bool) -> None:
        # The Q/K projections' RotaryEmbedding may feed other users: only dead nodes go.
        super().__init__(name, remove_nodes=False)
        self._has_mask = has_mask
        # True: Q/K/V are (B, S, ·) projections split into heads here (then the pattern's
        # ``query``/``key``/``value`` are those projections). False: any (B, H|Hkv, S, Dh)
        # values, e.g. after a rotary the ORT fusion did not recognize; they are transposed
        # back to (B, S, ·) for GQA.
        self._projections = projections

    def _heads(self, op, x_bsd, name: str):
        """(B, S, D) → (B, S, H, Dh) → (B, H, S, Dh); bound as ``{name}_4d``."""
        split = op.Reshape(x_bsd, pattern.ANY_VALUE, _outputs=[f"{name}_4d"])
        return op.Transpose(split, perm=[0, 2, 1, 3])

    def _rotary(self, op, x_bhsd, name: str):
        """Optional com.microsoft RotaryEmbedding on (B, H, S, Dh); bound as ``{name}_rope``."""
        rotated = op.RotaryEmbedding(
            x_bhsd,
            pattern.ANY_VALUE,
            pattern.ANY_VALUE,
            pattern.ANY_VALUE,
            _domain=MS_DOMAIN,
            _outputs=[f"{name}_rope"],
        )
        return pattern.OrValue([rotated, x_bhsd])

    def _repeat(self, op, x_bhsd, name: str):
        """(B, Hkv, S, Dh) → Unsqueeze(2) → Expand (B, Hkv, G, S, Dh) → Reshape (B, H, S, Dh)."""
        expanded = op.Expand(op.Unsqueeze(x_bhsd, [2]), pattern.ANY_VALUE, _outputs=[f"{name}_g"])
        return op.Reshape(expanded, pattern.ANY_VALUE, _outputs=[f"{name}_rep"])

    def pattern(self, op, query, key, value, mask):
        if self._projections:
            query = self._rotary(op, self._heads(op, query, "q"), "q")
            key = self._rotary(op, self._heads(op, key, "k"), "k")
            value = self._heads(op, value, "v")
        inputs = [query, self._repeat(op, key, "k"), self._repeat(op, value, "v")]
        attention = op.SDPA(
            *inputs,
            *([mask] if self._has_mask else []),
            key_format="BHSd",
            _domain=PRIVATE_DOMAIN_PREFIX,
            _outputs=["attention"],
        )
        merged = op.Transpose(attention, perm=[0, 2, 1, 3])
        return op.Reshape(merged, pattern.ANY_VALUE, _outputs=["output_bsd"])

    def check(
        self, context, query, key, value, k_g, k_rep, v_g, v_rep, output_bsd, attention,
        mask=None, q_4d=None, k_4d=None, v_4d=None, **_,
    ) -> pattern.MatchResult:  # fmt: skip
        result = pattern.MatchResult()
        dims: dict[str, _fusion_utils.Dim] = {}
        if self._projections:
            expected = [
                (query, ["B", "S", "D"]),
                (q_4d, ["B", "S", "H", "Dh"]),
                (key, ["B", "S", "Dkv"]),
                (k_4d, ["B", "S", "Hkv", "Dh"]),
                (value, ["B", "S", "Dkv"]),
                (v_4d, ["B", "S", "Hkv", "Dh"]),
            ]
        else:
            expected = [
                (query, ["B", "H", "S", "Dh"]),
                (key, ["B", "Hkv", "S", "Dh"]),
                (value, ["B", "Hkv", "S", "Dh"]),
            ]
        expected += [
            (k_g, ["B", "Hkv", "G", "S", "Dh"]),
            (v_g, ["B", "Hkv", "G", "S", "Dh"]),
            (k_rep, ["B", "H", "S", "Dh"]),
            (v_rep, ["B", "H", "S", "Dh"]),
            (attention, ["B", "H", "S", "Dh"]),
            (output_bsd, ["B", "S", "D"]),
        ]
        for found, names in expected:
            if not _fusion_utils.check_shape_bool(dims, found, names):
                return result.fail(f"{found.name} is not {names} (or unknown)", found)
        ints = {k: dims.get(k) for k in ("D", "H", "Dh", "Hkv", "G")}
        if not all(isinstance(v, int) for v in ints.values()):
            return result.fail("head counts or sizes are not static", attention)
        if ints["H"] * ints["Dh"] != ints["D"]:
            return result.fail("heads do not make up the hidden size", output_bsd)
        if self._projections and ints["Hkv"] * ints["Dh"] != dims["Dkv"]:
            return result.fail("reshapes do not split the hidden axis into heads", k_4d)
        if ints["Dh"] % 8:
            # ORT's kernels reject it at run time ("head_size must be a multiple of 8").
            return result.fail("GroupQueryAttention needs a head size multiple of 8", attention)
        if ints["Hkv"] * ints["G"] != ints["H"] or ints["G"] < 2:
            return result.fail("K/V heads are not repeated to the query heads", k_rep)
        # Batch and sequence must be named dims (or equal ints) for the checks to mean anything.
        if dims["B"] is None or dims["S"] is None:
            return result.fail("batch or sequence dim unknown", query)
        if query.dtype not in FLOAT_TYPES:
            return result.fail("GroupQueryAttention on CPU takes float or float16", query)
        if mask is not None and mask.dtype != query.dtype:
            return result.fail("mask is not of the attention's type", mask)
        if mask is not None and not self._mask_broadcasts(mask, dims):
            return result.fail("mask does not broadcast to (B, H, S, S)", mask)
        # Already (1|B, 1|H, S, S), as GQA's attention_bias must be: no Expand (a copy) needed.
        self._mask_is_4d = (
            mask is not None
            and mask.shape.rank() == 4
            and mask.shape[2] == mask.shape[3] == dims["S"]
        )
        self._num_heads, self._kv_num_heads = ints["H"], ints["Hkv"]
        scale = attention.producer().attributes.get_float("scale", None)
        self._scale = scale if scale is not None else 1.0 / math.sqrt(ints["Dh"])
        return result

    @staticmethod
    def _mask_broadcasts(mask: ir.Value, dims: dict) -> bool:
        """Each dim of ``mask`` (right-aligned) is 1 or the score dim (B, H, S, S)."""
        if mask.shape is None or mask.shape.rank() > 4:
            return False
        scores = [dims["B"], dims["H"], dims["S"], dims["S"]][4 - mask.shape.rank() :]
        return all(d == 1 or d == s for d, s in zip(mask.shape.dims, scores, strict=True))

    def rewrite(self, op, query, key, value, mask=None, q_rope=None, k_rope=None, **_):
        if self._projections:
            query = self._rotate(op, query, q_rope, self._num_heads)
            key = self._rotate(op, key, k_rope, self._kv_num_heads)
        else:
            query, key, value = (self._merge_heads(op, x) for x in (query, key, value))
        # First prompt, no cache: every row sees all S keys (the bias does the masking).
        # B and S are read from V, which no rotary touches (Q and K may lose theirs later).
        length = op.Shape(value, start=1, end=2)
        batch = op.Shape(value, start=0, end=1)
        last = op.Sub(length, op.Constant(value_ints=[1]))
        seqlens_k = op.Cast(op.Expand(last, batch), to=ir.DataType.INT32)
        total = op.Cast(op.Squeeze(length), to=ir.DataType.INT32)
        bias = None
        if mask is not None and self._mask_is_4d:
            bias = mask
        elif mask is not None:
            # attention_bias must be 4-D (1|B, 1|H, S, S): broadcast whatever the model has.
            one = op.Constant(value_ints=[1])
            bias = op.Expand(mask, op.Concat(one, one, length, length, axis=0))
        return op.GroupQueryAttention(
            query,
            key,
            value,
            None,  # past_key
            None,  # past_value
            seqlens_k,
            total,
            None,  # cos_cache (rotary stays a separate op)
            None,  # sin_cache
            None,  # position_ids
            bias,
            num_heads=self._num_heads,
            kv_num_heads=self._kv_num_heads,
            scale=self._scale,
            causal=0,  # the bias carries the causal part too (see the module notes)
            _domain=MS_DOMAIN,
            _outputs=3,
        )[0]

    @staticmethod
    def _merge_heads(op, x_bhsd: ir.Value):
        """(B, H, S, Dh) → (B, S, H·Dh), the layout GroupQueryAttention reads."""
        merged = op.Transpose(x_bhsd, perm=[0, 2, 1, 3])
        return op.Reshape(merged, op.Constant(value_ints=[0, 0, -1]))

    @staticmethod
    def _rotate(op, x_bsd: ir.Value, rope: ir.Value | None, heads: int):
        """The model's RotaryEmbedding, applied to the (B, S, heads·Dh) form instead."""
        if rope is None:
            return x_bsd
        node = rope.producer()
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        attributes["num_heads"] = heads  # needed to split a 3-D input into heads
        return op.RotaryEmbedding(x_bsd, *node.inputs[1:], _domain=MS_DOMAIN, **attributes)


gqa_rules = pattern.RewriteRuleSet(
    [
        # Projections first: where both match, that form needs no transposes back.
        GroupQueryAttentionRule.rule("GqaMasked", has_mask=True, projections=True),
        GroupQueryAttentionRule.rule("Gqa", has_mask=False, projections=True),
        GroupQueryAttentionRule.rule("GqaHeadsMasked", has_mask=True, projections=False),
        GroupQueryAttentionRule.rule("GqaHeads", has_mask=False, projections=False),
    ]
)


def fuse_group_query_attention(model: ir.Model, **_) -> int:
    return gqa_rules.apply_to_model(model)


@register
class OrtGroupQueryAttentionPass(OrtFusionPass):
    """With --target ort: attention over repeated K/V heads (GQA) → GroupQueryAttention."""

    name = "ort-group-query-attention"
    ops = frozenset(("Softmax",))
    # SDPA (onnxscript's private op) first, shapes re-inferred for the nodes it adds; SDPAs
    # that are not GQA are inlined back by ``finish`` and left to ``ort-attention``.
    steps = (partial(fuse_sdpa, apply_shape_inference=True), fuse_group_query_attention)
    produces = ((MS_DOMAIN, "GroupQueryAttention"),)

    def repair(self, model: ir.Model) -> bool:
        # GQA reads the projections, but the rotary positions of the dynamo exports take the
        # batch size from Shape(Transpose(…)): read it before the Transpose so that the
        # head transposes die with the rest of the old attention.
        # Likewise Shape(Reshape(…, Concat(batch, …)))[0] is ``batch`` itself: the rotary
        # caches of every layer then share one source and CSE merges them.
        for node in list(model.graph):
            if node.op_type == "Shape" and node.domain == "":
                _shape_before_transpose(node)
                _shape_of_reshape_target(node)
        return True

    def rewrite(self, model: ir.Model) -> int:
        # Preparing the working copy (shape inference, folding, twice) costs seconds on a
        # transformer: skip graphs without a softmax and a K/V repetition chain.
        if not _has_head_repetition(model.graph):
            return 0
        return super().rewrite(model)


def _has_head_repetition(graph: ir.Graph) -> bool:
    """A Softmax (without a NaN guard), and an Unsqueeze → Expand → Reshape chain (how K/V
    heads get repeated)."""
    ops = {node.op_type for node in graph if node.domain == ""}
    if "Softmax" not in ops:
        return False
    # onnxscript's SDPA rule also absorbs Where(IsNaN(softmax), 0, softmax), which zeroes the
    # rows of a -inf mask that masks every key; GQA would not: leave such graphs alone.
    if "IsNaN" in ops:
        return False
    for node in graph:
        if node.op_type != "Expand" or node.domain != "" or node.inputs[0] is None:
            continue
        source = node.inputs[0].producer()
        if source is None or source.op_type != "Unsqueeze":
            continue
        if any(user.op_type == "Reshape" for user, _ in node.outputs[0].uses()):
            return True
    return False


def _shape_before_transpose(node: ir.Node) -> None:
    """Shape(Transpose(x, perm), start, end) → Shape(x, start, end) if perm fixes [start, end)."""
    source = node.inputs[0].producer() if node.inputs[0] is not None else None
    if source is None or source.op_type != "Transpose" or source.domain != "":
        return
    perm = source.attributes.get_ints("perm", None)
    if perm is None:  # the default reverses every axis
        return
    rank = len(perm)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    # ONNX Shape: negative bounds count from the end, then both are clamped to [0, rank].
    start, end = (min(max(b + rank if b < 0 else b, 0), rank) for b in (start, end))
    if all(perm[axis] == axis for axis in range(start, end)):
        node.replace_input_with(0, source.inputs[0])


def _shape_of_reshape_target(node: ir.Node) -> None:
    """Shape(Reshape(x, Concat(t0, t1, …), allowzero=1), i, i+1) → t_i, t_0..t_i one-element.

    With ``allowzero=1`` a Reshape's output dims are its target's values verbatim; a target
    piece that is itself a Shape output is a dim (≥ 0, never the -1 placeholder).
    """
    source = node.inputs[0].producer() if node.inputs[0] is not None else None
    if source is None or source.op_type != "Reshape" or source.domain != "":
        return
    if source.attributes.get_int("allowzero", 0) != 1 or len(source.inputs) != 2:
        return
    concat = source.inputs[1].producer() if source.inputs[1] is not None else None
    if concat is None or concat.op_type != "Concat" or concat.domain != "":
        return
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    if start < 0 or end != start + 1 or start >= len(concat.inputs):
        return
    pieces = concat.inputs[: start + 1]
    if any(p is None or p.shape is None or p.shape.dims != (1,) for p in pieces):
        return
    piece = pieces[start]
    producer = piece.producer()
    if producer is None or producer.op_type != "Shape" or producer.domain != "":
        return
    if node.outputs[0].is_graph_output():
        return
    ir.convenience.replace_all_uses_with(node.outputs[0], piece)
