"""Gelu formulas → com.microsoft Gelu / FastGelu, and a bias Add before Gelu → BiasGelu."""

from __future__ import annotations

import functools
import math

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu

from graphopt.passes.fusion.ort._base import MS_DOMAIN, OrtFusionPass
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
