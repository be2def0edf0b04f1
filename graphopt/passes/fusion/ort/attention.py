"""Scaled dot-product attention → com.microsoft MultiHeadAttention / Attention."""

from __future__ import annotations

from functools import partial

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.attention import fuse_attention
from onnxscript.rewriter.ort_fusions.mha import MultiHeadAttention
from onnxscript.rewriter.ort_fusions.mha_bias import FuseBiasMHA
from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import SDPAImplementation

from graphopt import editing
from graphopt.passes.fusion.ort._base import MS_DOMAIN, OrtFusionPass
from graphopt.passes.fusion.ort._dims import dims, matches, one_or, same_dim
from graphopt.passes.fusion.ort._sdpa import fuse_sdpa
from graphopt.registry import register

ATTENTION_OPS = ("MultiHeadAttention", "Attention")


def _mask_fits(mask: ir.Value, scores: tuple) -> bool:
    """``mask`` is what ORT's attention_bias takes for scores (B, H, S, T): each leading dim 1
    or the score's, the last one exactly T (ORT does not broadcast the key axis)."""
    found = dims(mask)
    if not found or len(found) > len(scores):
        return False
    scores = scores[len(scores) - len(found) :]
    if not same_dim(found[-1], scores[-1]):
        return False
    return all(one_or(d, s) for d, s in zip(found[:-1], scores[:-1], strict=True))


class CheckedMHA(MultiHeadAttention):
    """onnxscript's SDPA → MultiHeadAttention rule, with the mask and output Reshape checked.

    - The mask must be (1|B, 1|H, S|1, T) or (S|1, T) with T the total key length: a mask
      of (1, 1, S, 1), which the Add broadcast over the keys, failed in ORT ("attention_bias
      dimension 3 should be same as total_sequence_length").
    - The rule absorbs the Reshape after the heads are merged without reading its target:
      (B, S, H, Dv) reshaped to (B, S·H, Dv) became an MHA output of (B, S, H·Dv). Unless the
      Reshape provably gives (B, S, H·Dv), the same Reshape is applied to the MHA output
      (a Reshape keeps row-major order, so this is the original value), for a constant
      target whose 0s ("copy this dim") only name the B and S axes both forms share. GPT-2's
      Conv1D export, which reshapes to (B·S, D) for a Gemm, keeps its Reshape this way.
    """

    def check(self, context, **bindings):
        self._restore = None
        result = super().check(context, **bindings)
        if not result:
            return result
        query, query_4d = dims(bindings["query_BSD"]), dims(bindings["query_BSHDh"])
        key, value = dims(bindings["key"]), dims(bindings["value"])
        batch, length, heads = query[0], query[1], query_4d[2]
        if self._has_past_present:  # keys after the past ones: (B, H, Spast + Skv, Dh)
            key_seq = dims(context.output_values[1])
            total = key_seq[2] if key_seq is not None and len(key_seq) == 4 else None
        else:
            total = key[2] if self._is_cross_attention else key[1]
        if self.mask is not None and not _mask_fits(self.mask, (batch, heads, length, total)):
            return result.fail("mask is not (1|B, 1|H, S|1, total length)", self.mask)
        if self._is_cross_attention:  # value (B, H, Skv, Dv)
            static = isinstance(heads, int) and isinstance(value[3], int)
            hidden = heads * value[3] if static else None
        else:
            hidden = value[2]
        output = context.output_values[0]
        if matches(output, (batch, length, hidden)):
            return result
        reshape = output.producer()
        target = editing.const_ints(reshape.inputs[1])
        allowzero = reshape.attributes.get_int("allowzero", 0)
        if target is None or (not allowzero and 0 in target[2:]):
            return result.fail("output Reshape target not provably kept", reshape)
        self._restore = (reshape.inputs[1], allowzero)
        return result

    def rewrite(self, op, **bindings):
        result = super().rewrite(op, **bindings)
        if result is None or self._restore is None:
            return result
        target, allowzero = self._restore
        attributes = {"allowzero": allowzero} if allowzero else {}
        if isinstance(result, ir.Value):
            return op.Reshape(result, target, **attributes)
        first, *rest = result
        return (op.Reshape(first, target, **attributes), *rest)


def _mha_rules(has_past_present: bool) -> pattern.RewriteRuleSet:
    """onnxscript's MHA rule variants (``mha._make_rule_set``) as :class:`CheckedMHA`."""
    rules = []
    for rotary in (False, True):
        for cross in (False,) if has_past_present else (False, True):
            name = "MHA" + "_Rotary" * rotary + "_Past" * has_past_present + "_Cross" * cross
            rules.append(
                CheckedMHA.rule(
                    name,
                    is_rotary=rotary,
                    has_past_present=has_past_present,
                    is_cross_attention=cross,
                )
            )
    return pattern.RewriteRuleSet(rules)


class CheckedBiasMHA(FuseBiasMHA):
    """onnxscript's rule packing the Q/K/V bias Adds into MHA's bias input, which ORT reads
    as the concatenation of three vectors: each bias must be one vector of its hidden size
    (a broadcast bias of shape [1] or [S, D] is something else)."""

    def check(self, context, q_bias=None, k_bias=None, v_bias=None, **bindings):
        biases = {"q_bias": q_bias, "k_bias": k_bias, "v_bias": v_bias}
        result = super().check(context, **biases, **bindings)
        if not result:
            return result
        for bias, size in zip(biases.values(), (self.Dh_q, self.Dh_k, self.Dh_v), strict=True):
            if bias is not None and dims(bias) != (size,):
                return result.fail("bias is not a vector of the hidden size", bias)
        return result


class CheckedSDPAImplementation(SDPAImplementation):
    """onnxscript's fallback SDPA → MultiHeadAttention; its mask must fit attention_bias
    (see :func:`_mask_fits`) once expanded over the query axis."""

    def check(self, context, query, key, value, key_format, sdpa_output):
        result = super().check(context, query, key, value, key_format, sdpa_output)
        if not result:
            return result
        node = sdpa_output.producer()
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        if mask is None:
            return result
        query_dims, value_dims = dims(query), dims(value)  # (B, H, S, Dh), (B, H, Skv, Dv)
        scores = (*query_dims[:3], value_dims[2])
        if not _mask_fits(mask, scores):
            return pattern.MatchResult().fail("mask is not (…, 1|S, total length)", mask)
        return result


def _apply(rules: pattern.RewriteRuleSet):
    def step(model: ir.Model, **_) -> int:
        return rules.apply_to_model(model)

    return step


fuse_mha1 = _apply(_mha_rules(has_past_present=True))
fuse_mha2 = _apply(_mha_rules(has_past_present=False))
fuse_mha_bias = _apply(pattern.RewriteRuleSet([CheckedBiasMHA.rule()]))
replace_sdpa_by_mha = _apply(pattern.RewriteRuleSet([CheckedSDPAImplementation.rule()]))


def constants_second(model: ir.Model, **_) -> int:
    """Put the constant operand of commutative Adds second: Add(bias, MatMul) → Add(MatMul, bias).

    TorchScript exports write Linear's bias first; onnxscript's MHA-bias rule only matches the
    bias second, so without this the Q/K/V projections never merge into one packed Attention.
    """
    swapped = 0
    for node in model.graph:
        if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
            continue
        first, second = node.inputs
        if editing.is_constant(first) and not editing.is_constant(second):
            node.replace_input_with(0, second)
            node.replace_input_with(1, first)
            swapped += 1
    return swapped


@register
class OrtAttentionPass(OrtFusionPass):
    """With --target ort: Q·Kᵀ/scale(+mask)→Softmax→·V → MultiHeadAttention / Attention."""

    name = "ort-attention"
    ops = frozenset(("Softmax",))  # every attention pattern the rules match has one
    # onnxscript's chain: SDPA (private op) → MHA with its reshapes/transposes absorbed → the
    # Q/K/V bias Adds → one packed-QKV Attention when Q, K and V share an input; an SDPA that
    # found no MHA context is still expressed as an MHA. Shapes are re-inferred after SDPA
    # because its rules add nodes the MHA rules must see shapes for. The SDPA, MHA, bias and
    # fallback rules are onnxscript's with graphopt's own checks (the ``Checked*`` classes).
    steps = (
        constants_second,
        partial(fuse_sdpa, apply_shape_inference=True),
        fuse_mha1,
        fuse_mha2,
        fuse_mha_scale,
        fuse_mha_bias,
        fuse_attention,
        replace_sdpa_by_mha,
    )
    produces = tuple((MS_DOMAIN, op) for op in ATTENTION_OPS)
