"""Scaled dot-product attention → Attention (opset 23), the 4-D (per-head) form.

Matches Softmax((Q @ Transpose(K)) · s + mask) @ V, the scale as Mul(s), Div(1/s) or
absent, the mask Add optional: the core every exporter emits for BERT/MiniLM/GPT-2/LLaMA/
ViT once the head reshapes are done (causal masks arrive precomputed in the mask).
Transpose(K) is either perm (0, 1, 3, 2) of a [B, H, L, D] key or perm (0, 2, 3, 1) of a
[B, L, H, D] one, which becomes a (0, 2, 1, 3) Transpose in front of the Attention.

Only what ONNX Attention and ORT's kernel compute identically is fused: float32 rank-4
Q/K/V whose batch, sequence and head-size dims are provably equal (the same static or
symbolic dim, so MatMul does not broadcast them), K/V heads equal and dividing Q's heads
(GQA), softmax over the last axis, a constant scalar scale (``scale`` is set explicitly,
1.0 when absent, since the op's default is 1/√D), and a float mask of shape [S, L] or
[B|1, H|1, S, L] (ORT wants the mask's query length to equal Q's, no broadcasting there).
onnxscript's ``ort_fusions`` SDPA/MHA rules target com.microsoft ops and 3-D inputs; none
produces the standard op, hence these rules.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graphopt import editing
from graphopt.passes.fusion import _rules
from graphopt.registry import register


class _AttentionRule(pattern.RewriteRuleClassBase):
    # One rule per (scale, mask) form: OrValue does not combine with commute.
    def __init__(self, scale: str, masked: bool) -> None:
        super().__init__(f"Attention(scale={scale}, mask={masked})")
        self._scale_form, self._masked = scale, masked

    def pattern(self, op, q, k, v, s, mask):
        kt = op.Transpose(k, _allow_other_attributes=True, _outputs=["kt"])
        scores = op.MatMul(q, kt)
        if self._scale_form == "mul":
            scores = op.Mul(scores, s)
        elif self._scale_form == "div":
            scores = op.Div(scores, s)
        if self._masked:
            scores = op.Add(scores, mask)
        probs = op.Softmax(scores, _allow_other_attributes=True, _outputs=["probs"])
        return op.MatMul(probs, v)

    def check(self, context, q, k, v, kt, probs, s=None, mask=None, **_):
        result = pattern.MatchResult()
        if any(t.dtype != ir.DataType.FLOAT for t in (q, k, v)):
            return result.fail("float32 only")
        perm = editing.attribute(kt.producer(), "perm")
        perm = tuple(perm) if perm is not None else None
        if perm not in ((0, 1, 3, 2), (0, 2, 3, 1)):
            return result.fail("K transpose is not a per-head key layout")
        shapes = [t.shape for t in (q, k, v)]
        if any(shape is None or len(shape) != 4 for shape in shapes):
            return result.fail("Q/K/V not rank 4")
        qd, kd, vd = (list(shape.dims) for shape in shapes)
        if perm == (0, 2, 3, 1):
            kd = [kd[0], kd[2], kd[1], kd[3]]  # [B, L, H, D] → [B, H, L, D]
        batch, heads = (qd[0], kd[0], vd[0]), (qd[1], kd[1], vd[1])
        if not _same(*batch) or not _same(kd[2], vd[2]) or not _same(qd[3], kd[3]):
            return result.fail("batch / sequence / head-size dims not provably equal")
        if not all(isinstance(h, int) for h in heads):
            return result.fail("head counts not static")
        if heads[1] != heads[2] or heads[0] % heads[1] != 0:
            return result.fail("K/V heads do not divide Q heads")
        axis = editing.attribute(probs.producer(), "axis", -1)
        if axis not in (-1, 3):
            return result.fail("softmax not over the keys")
        scale = 1.0
        if s is not None:
            value = _rules.scalar(s, q)
            if value is None or value == 0.0:
                return result.fail("scale is not a constant scalar")
            scale = value if self._scale_form == "mul" else 1.0 / value
        if mask is not None and not _mask_ok(mask, q, qd, kd):
            return result.fail("mask shape or dtype not supported by Attention")
        self._scale, self._perm = scale, perm
        return result

    def rewrite(self, op, q, k, v, mask=None, **_):
        if self._perm == (0, 2, 3, 1):
            k = op.Transpose(k, perm=[0, 2, 1, 3])
        inputs = [q, k, v] + ([mask] if mask is not None else [])
        return op.Attention(*inputs, scale=self._scale)


def _same(*dims) -> bool:
    """Dims provably equal: the same int, or the same named symbolic dim."""
    first = dims[0]
    if isinstance(first, int):
        return all(isinstance(d, int) and d == first for d in dims)
    name = getattr(first, "value", None)
    return name is not None and all(
        not isinstance(d, int) and getattr(d, "value", None) == name for d in dims
    )


def _mask_ok(mask: ir.Value, q: ir.Value, qd: list, kd: list) -> bool:
    if mask.dtype != q.dtype or mask.shape is None:
        return False
    md = list(mask.shape.dims)
    if len(md) not in (2, 4):
        return False
    # The last two dims must be exactly [S, L]; leading ones 1 or equal to [B, H].
    if not (_same(md[-2], qd[2]) and _same(md[-1], kd[2])):
        return False
    return all(d == 1 or _same(d, want) for d, want in zip(md[:-2], qd[:2], strict=False))


@register
class FuseAttentionPass(_rules.RuleFusionPass):
    """Softmax(Q·Kᵀ·s + mask)·V (4-D, float32) → Attention (opset 23).

    Refuses dims MatMul could broadcast, unsupported mask shapes, non-constant scale.
    """

    name = "fuse-attention"
    trigger_ops = ("Softmax",)
    required_ops = ("Softmax", "MatMul")

    def groups(self) -> list[_rules.RuleGroup]:
        def rules() -> list[pattern.RewriteRule]:
            return [
                _AttentionRule.rule(scale, masked)
                for masked in (True, False)
                for scale in ("mul", "div", "none")
            ]

        return [_rules.RuleGroup("Attention", 23, rules)]
