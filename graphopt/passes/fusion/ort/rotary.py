"""Rotary position embedding (RoPE) → com.microsoft RotaryEmbedding with its cos/sin cache."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
from onnxscript.rewriter.ort_fusions.rotary_embedding import (
    fuse_partial_rotary_embedding,
    fuse_rotary_embedding,
)

from graphopt.passes.fusion.ort._base import MS_DOMAIN, OrtFusionPass, adopt
from graphopt.private_apis import ir_utils as _ir_utils
from graphopt.registry import register

INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


class BroadcastFreqsCache(pattern.RewriteRuleClassBase):
    """RoPE angles as ``positions[..., None] * inv_freq`` (a broadcast Mul, no MatMul).

    onnxscript's cos/sin-cache rules expect transformers' ``inv_freq @ positions`` followed by a
    Transpose; recent exports of LLaMA/Qwen2 fold that into a broadcast Mul of the float
    positions, shape (1 or B, S, 1), by the constant ``inv_freq`` of shape (E,). The cache is
    then computed in the graph for positions 0..max(position)+1, which is exact for any length.
    """

    def __init__(self, name: str, commuted: bool) -> None:
        super().__init__(name, remove_nodes=False)  # cos/sin may be shared by q and k
        self._commuted = commuted

    def pattern(self, op, x, position_ids, axes, inv_freq, interleaved, num_heads):
        positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
        freqs = op.Mul(inv_freq, positions) if self._commuted else op.Mul(positions, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos_4d = op.Unsqueeze(op.Cos(emb), [1])
        sin_4d = op.Unsqueeze(op.Sin(emb), [1])
        return op.RotaryEmbedding(
            x,
            cos_4d,
            sin_4d,
            interleaved=interleaved,
            num_heads=num_heads,
            _domain="ai.onnxruntime._fusion",
        )

    def check(self, context, x, position_ids, axes, inv_freq, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if position_ids.dtype not in INT_TYPES:
            return result.fail("positions are not integers", position_ids)
        freq = inv_freq.const_value
        if freq is None or freq.dtype != ir.DataType.FLOAT or len(freq.shape) != 1:
            return result.fail("inv_freq is not a constant float vector", inv_freq)
        # positions (S,) unsqueezed at [0, 2], or (B, S) at [2] / [-1]: angles (1|B, S, E).
        if _ir_utils.has_rank(position_ids, 1) and _ir_utils.is_1d_value(axes, [0, 2]):
            return result
        if _ir_utils.has_rank(position_ids, 2) and (
            _ir_utils.is_1d_value(axes, [2]) or _ir_utils.is_1d_value(axes, [-1])
        ):
            return result
        return result.fail("positions are not (S,) or (B, S) unsqueezed to (., S, 1)", axes)

    def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, **_):
        positions = op.Cast(position_ids, to=ir.DataType.INT64)
        if _ir_utils.has_rank(position_ids, 1):
            positions = op.Unsqueeze(positions, op.Constant(value_ints=[0]))
        # The contrib op wants (B, S) positions; broadcast a shared row over the batch.
        batch = op.Shape(x, start=0, end=1)
        positions = op.Expand(positions, op.Concat(batch, op.Constant(value_ints=[1]), axis=0))
        count = op.Add(op.ReduceMax(positions, keepdims=0), op.Constant(value_int=1))
        rows = op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1))
        rows = op.Cast(op.Reshape(rows, op.Constant(value_ints=[-1, 1])), to=ir.DataType.FLOAT)
        freq = inv_freq.const_value.numpy().reshape(1, -1).astype(np.float32)
        angles = op.MatMul(rows, op.Constant(value=ir.tensor(freq)))
        return op.RotaryEmbedding(
            x,
            positions,
            op.Cos(angles),
            op.Sin(angles),
            interleaved=interleaved,
            num_heads=num_heads,
            _domain=MS_DOMAIN,
        )


broadcast_freqs_rules = pattern.RewriteRuleSet(
    [
        BroadcastFreqsCache.rule("RopeBroadcastFreqs", commuted=False),
        BroadcastFreqsCache.rule("RopeBroadcastFreqsCommuted", commuted=True),
    ]
)


def fuse_broadcast_freqs_cache(model: ir.Model, **_) -> int:
    return broadcast_freqs_rules.apply_to_model(model)


@register
class OrtRotaryEmbeddingPass(OrtFusionPass):
    """With --target ort: RoPE (rotate-half · cos/sin from positions) → RotaryEmbedding."""

    name = "ort-rotary"
    # Only rotations whose cos/sin computation is recognized become the contrib op.
    ops = frozenset(("Sin", "Cos"))
    # The rotation itself becomes a private RotaryEmbedding first; only the ones whose cos/sin
    # computation is recognized too become the contrib op, the others are inlined back.
    steps = (
        fuse_rotary_embedding,
        fuse_broadcast_freqs_cache,
        fuse_cos_sin_cache,
        fuse_partial_rotary_embedding,
    )
    produces = ((MS_DOMAIN, "RotaryEmbedding"),)

    def rewrite(self, model: ir.Model) -> int:
        # GroupQueryAttention runs after this pass and usually matches the fused rotation, but
        # not on every export: on TorchScript's LLaMA, RotaryEmbedding leaves a layout the GQA
        # rule does not know (0 GQA after it, 2 without). GQA is the larger gain, so the
        # rotation stays unfused where fusing it is what stops GQA.
        from graphopt.passes.fusion.ort.group_query_attention import OrtGroupQueryAttentionPass

        if any(_gqa_rotating_outside(node) for node in model.graph):
            # That choice, made on an earlier run: GQA now reads the unfused rotation. Fusing
            # it then gains nothing (1.00x on TorchScript LLaMA int4, 13 more nodes) and would
            # make optimizing our own output again change it.
            self.context.note(
                "ort-rotary: RoPE left unfused: the model's GroupQueryAttention (do_rotary=0) "
                "reads it as it is"
            )
            return 0
        trial = model.clone()
        hits = super().rewrite(trial)
        if hits == 0:
            return 0
        gqa = OrtGroupQueryAttentionPass(self.context)
        if gqa.rewrite(trial.clone()) == 0 and gqa.rewrite(model.clone()) > 0:
            self.context.note(
                "ort-rotary: RoPE left unfused: GroupQueryAttention matches this model only "
                "without RotaryEmbedding"
            )
            return 0
        adopt(model, trial)
        return hits


def _gqa_rotating_outside(node: ir.Node) -> bool:
    """A com.microsoft GroupQueryAttention that does not rotate q/k itself."""
    if node.domain != MS_DOMAIN or node.op_type != "GroupQueryAttention":
        return False
    rotary = node.attributes.get("do_rotary")
    return rotary is None or rotary.as_int() == 0
