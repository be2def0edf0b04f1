"""Decomposed GELU → Gelu (opset 20), exact erf form and tanh approximation.

erf:  0.5 · x · (1 + erf(x / √2))                        → Gelu(x)
tanh: 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))   → Gelu(x, approximate="tanh")

The three ways exporters associate the product (0.5·(x·t), x·(0.5·t), (0.5·x)·t), x/√2 as
Div or as Mul by 1/√2, and x³ as Pow(x, 3) or x·x·x; operand order of Add/Mul is free.

onnxscript's ``ort_fusions.gelu``/``erfgelu`` rules target com.microsoft ops and match the
constants through the pattern's own literal comparison; here every constant is read and
compared within a relative 1e-6 (float32 roundings of the exact numbers pass, anything else
does not), must be a scalar that cannot broadcast the result up, and the input must be
float32 (the only dtype whose fused kernel was checked against the decomposition).
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graphopt.passes.fusion import _rules
from graphopt.registry import register

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715


class _GeluRule(pattern.RewriteRuleClassBase):
    # One rule per (kind, product form, inner form): OrValue does not combine with commute.
    def __init__(self, kind: str, outer: str, inner: str) -> None:
        super().__init__(f"Gelu({kind}, {outer}, {inner})")
        self._kind, self._outer, self._inner = kind, outer, inner

    def pattern(self, op, x, half, one, s, c, k, three):
        if self._kind == "erf":
            scaled = op.Div(x, s) if self._inner == "div" else op.Mul(x, s)
            t = op.Add(op.Erf(scaled), one)
        else:
            cube = op.Pow(x, three) if self._inner == "pow" else op.Mul(op.Mul(x, x), x)
            t = op.Add(op.Tanh(op.Mul(c, op.Add(x, op.Mul(k, cube)))), one)
        if self._outer == "half_of_product":
            return op.Mul(half, op.Mul(x, t))
        if self._outer == "x_times_half_t":
            return op.Mul(x, op.Mul(half, t))
        return op.Mul(op.Mul(x, half), t)

    def check(self, context, x, half, one, s=None, c=None, k=None, three=None, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("Gelu fusion handles float32 only")
        if not (_rules.is_scalar(half, x, 0.5) and _rules.is_scalar(one, x, 1.0)):
            return result.fail("0.5 / 1 constants differ")
        if self._kind == "erf":
            expected = _SQRT_2 if self._inner == "div" else 1.0 / _SQRT_2
            if not _rules.is_scalar(s, x, expected):
                return result.fail("x is not scaled by 1/sqrt(2)")
            return result
        if not (_rules.is_scalar(c, x, _SQRT_2_OVER_PI) and _rules.is_scalar(k, x, _TANH_CUBIC)):
            return result.fail("tanh-approximation constants differ")
        if three is not None and not _rules.is_exponent(three, x, 3.0):
            return result.fail("not a cube")
        return result

    def rewrite(self, op, x, **_):
        if self._kind == "erf":
            return op.Gelu(x)
        return op.Gelu(x, approximate="tanh")


def _rules_for(kind: str) -> list[pattern.RewriteRule]:
    inners = ("div", "mul") if kind == "erf" else ("pow", "mul")
    return [
        _GeluRule.rule(kind, outer, inner)
        for outer in ("half_of_product", "x_times_half_t", "half_x_times_t")
        for inner in inners
    ]


@register
class FuseGeluPass(_rules.RuleFusionPass):
    """Decomposed GELU (erf form, tanh approximation) → Gelu (opset 20); float32 only.

    Refuses constants more than 1e-6 (relative) off the exact ones.
    """

    name = "fuse-gelu"
    trigger_ops = ("Erf", "Tanh")

    def groups(self) -> list[_rules.RuleGroup]:
        return [
            _rules.RuleGroup("Gelu", 20, lambda: _rules_for("erf")),
            _rules.RuleGroup("Gelu", 20, lambda: _rules_for("tanh")),
        ]
