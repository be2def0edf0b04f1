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

Fully masked query rows (left padding in a batch, an empty prompt row) are where the op and the
subgraph differ: the subgraph's Softmax spreads a row whose scores all became float32's lowest
(transformers' ``finfo.min`` fill) evenly over the keys, and gives NaN for an all -inf row; ORT's
Attention (1.32, CPU) and the ONNX spec's errata give a zero row for both. The mask's values are
therefore read off its computation (:func:`_mask_values`: constants through Where and ops that
only move elements): a mask whose values are all above ``lowest / 2`` is fused as it is; one with
a single fill at or below it (``lowest`` itself) is passed through ``Max(mask, lowest / 2)``, a
fill that still sends every masked key's weight to 0 in a partly masked row and leaves a fully
masked row's scores all equal (|score| < 2¹⁰² rounds away), so the op's softmax is the same even
spread; anything else (a mask fed as a graph input, -inf or NaN fills, two fills that low,
values of unknown origin) is refused. Measured on tiny GPT-2/LLaMA/Qwen2 dynamo exports with a
KV cache, left-padded prefill: logits max abs error in the padded rows 0.22/0.73/0.82 before,
~2e-7 after (one Max per layer on the [B, 1, S, T] mask is the cost).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from graphopt import editing
from graphopt.passes.fusion import _rules
from graphopt.registry import register

# float32's lowest: transformers' masking fill, and the score ORT's Attention zeroes a row at.
LOWEST = float(np.finfo(np.float32).min)
# What ``lowest`` becomes in front of Attention (see the module notes).
GUARD = LOWEST / 2
# A mask with more distinct constant values than this is not a fill pattern: unknown.
MAX_MASK_VALUES = 16
# A constant mask larger than this is not read (its values stay unknown).
MAX_MASK_BYTES = 1 << 22
# Ops whose output elements are elements of these inputs (moved, copied, selected, chosen).
VALUE_KEEPING = {
    **dict.fromkeys(("Identity", "Expand", "Reshape", "Unsqueeze", "Squeeze"), (0,)),
    **dict.fromkeys(("Transpose", "Slice", "Tile", "Flatten"), (0,)),
    **dict.fromkeys(("Gather", "GatherND", "GatherElements"), (0,)),
    "Where": (1, 2),
}
# Deep enough for exporters' mask plumbing, shallow enough to stay cheap on odd graphs.
MAX_MASK_DEPTH = 24


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
        guard = _fill_guard(mask) if mask is not None else False
        if guard is None:
            return result.fail("mask may fully mask a row with a fill Attention treats otherwise")
        self._scale, self._perm, self._guard = scale, perm, guard
        return result

    def rewrite(self, op, q, k, v, mask=None, **_):
        if self._perm == (0, 2, 3, 1):
            k = op.Transpose(k, perm=[0, 2, 1, 3])
        if mask is not None and self._guard:
            mask = op.Max(mask, op.Constant(value=ir.tensor(np.array(GUARD, np.float32))))
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


def _mask_values(value: ir.Value, depth: int = 0) -> set[float] | None:
    """Every value ``value``'s elements can take, when its computation shows them: a small
    float constant, or ops that only move/select elements (Where's branches) down to one."""
    array = editing.constant_array(value, max_bytes=MAX_MASK_BYTES)
    if array is not None:
        found = np.unique(array) if array.dtype.kind == "f" else None
        if found is None or found.size > MAX_MASK_VALUES:
            return None
        return {float(x) for x in found}
    node = value.producer()
    if node is None or depth > MAX_MASK_DEPTH or node.domain not in ("", "ai.onnx"):
        return None
    sources = VALUE_KEEPING.get(node.op_type)
    if node.op_type == "Cast" and node.inputs[0] is not None:
        # A float32 → float32 Cast copies; from any other type the values are new.
        sources = (0,) if node.inputs[0].dtype == value.dtype == ir.DataType.FLOAT else None
    if sources is None or len(node.inputs) <= max(sources):
        return None
    values: set[float] = set()
    for index in sources:
        found = _mask_values(node.inputs[index], depth + 1) if node.inputs[index] else None
        if found is None:
            return None
        values |= found
    return values if len(values) <= MAX_MASK_VALUES else None


def _fill_guard(mask: ir.Value) -> bool | None:
    """False: the mask fuses as it is; True: it needs ``Max(mask, GUARD)`` first; None: refuse.

    Values above GUARD never bring a row's scores to lowest, so the op's softmax is the
    Softmax's. One fill at or below GUARD (lowest itself, typically) becomes GUARD: a row it
    masks entirely is an even spread in both, a key it masks weighs 0 in both. Two such fills
    would weigh differently in a fully masked row and the Max would make them equal; -inf,
    NaN or unknown values (e.g. a mask fed by the caller) could zero a row: all refused.
    """
    values = _mask_values(mask)
    if values is None or any(np.isnan(x) or x == -np.inf for x in values):
        return None
    low = [x for x in values if x <= GUARD]
    return None if len(low) > 1 else bool(low)


@register
class FuseAttentionPass(_rules.RuleFusionPass):
    """Softmax(Q·Kᵀ·s + mask)·V (4-D, float32) → Attention (opset 23).

    Refuses dims MatMul could broadcast, unsupported mask shapes, non-constant scale, masks
    whose values are unknown or could zero a fully masked row (see the module notes).
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
