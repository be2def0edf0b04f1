"""Gelu formulas → com.microsoft Gelu / FastGelu, and a bias Add before Gelu → BiasGelu."""

from __future__ import annotations

import functools
import math

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.bias_gelu import BiasGeluFusion
from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu

from graphopt.passes.fusion.ort._base import MS_DOMAIN, OrtFusionPass
from graphopt.passes.fusion.ort._dims import dims
from graphopt.registry import register


def _tanh_gelu_half_first(op, x):
    """GPT-2's ``gelu_new`` as exported: (0.5·x) · (1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    inner = op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715))
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(op.Mul(inner, math.sqrt(2 / math.pi))), 1.0))


def _fast_gelu(op, x):
    return op.FastGelu(x, _domain=MS_DOMAIN)


@functools.cache
def _half_first_rules() -> pattern.RewriteRuleSet:
    # onnxscript's tanh rule fixes one association (x · (0.5 · (1 + tanh …))); commute=True
    # adds the operand orders of every Add/Mul here. Built on first use: expanding the
    # variants costs ~0.15 s, which every run would otherwise pay at import.
    return pattern.RewriteRuleSet(
        [pattern.RewriteRule(_tanh_gelu_half_first, _fast_gelu, name="TanhGeluHalfFirst")],
        commute=True,
    )


def fuse_tanh_gelu_half_first(model: ir.Model, **_) -> int:
    return _half_first_rules().apply_to_model(model)


class CheckedBiasGelu(BiasGeluFusion):
    """onnxscript's Add(x, bias) → Gelu rule, which only asks for a 1-D bias.

    ORT's BiasGelu adds one vector along x's last axis and keeps x's shape: it fails at run
    time on a bias of another length (Add(x[N], b[M]) with M = 1) and an Add that broadcasts
    x ([N, 1] + [8]) or the bias ([N, 8] + [1]) is not that op. The bias must be [D] with D
    x's static last dim; then the Add is exactly BiasGelu's.
    """

    def check(self, context, input, bias, **bindings):
        result = super().check(context, input=input, bias=bias, **bindings)
        if not result:
            return result
        found, x = dims(bias), dims(input)
        if found is None or len(found) != 1 or not isinstance(found[0], int):
            return result.fail("bias length not static", bias)
        if not x or x[-1] != found[0] or not isinstance(x[-1], int):
            return result.fail("bias is not one value per element of x's last axis", bias)
        return result


@functools.cache
def _bias_gelu_rules() -> pattern.RewriteRuleSet:
    # onnxscript's ``bias_gelu_rules``: the ONNX-20 and the contrib Gelu, both Add orders.
    return pattern.RewriteRuleSet(
        [
            *CheckedBiasGelu.rule("gelu_onnx_op", contrib_op=False).commute(),
            *CheckedBiasGelu.rule("gelu_contrib_op", contrib_op=True).commute(),
        ]
    )


def fuse_bias_gelu(model: ir.Model, **_) -> int:
    return _bias_gelu_rules().apply_to_model(model)


@register
class OrtGeluPass(OrtFusionPass):
    """With --target ort: erf Gelu → Gelu, tanh Gelu → FastGelu, Add(x, bias)→Gelu → BiasGelu."""

    name = "ort-gelu"
    # The erf and tanh formulas, or a Gelu (ONNX 20 or contrib) that a bias Add feeds.
    ops = frozenset(("Erf", "Tanh", "Gelu"))
    # erf-Gelu (both association orders) and the tanh approximation first, so that the bias
    # rule sees a Gelu node (contrib or ONNX-20 Gelu, whichever the portable pass left).
    steps = (fuse_erfgelu, fuse_gelu, fuse_tanh_gelu_half_first, fuse_bias_gelu)
    produces = (
        (MS_DOMAIN, "Gelu"),
        (MS_DOMAIN, "FastGelu"),
        (MS_DOMAIN, "BiasGelu"),
    )
