"""Decomposed activations → HardSwish (14), HardSigmoid (6), Swish (24), Mish (18).

HardSigmoid: Clip(x + 3, 0, 6) / 6 (or · 1/6)                 → HardSigmoid(1/6, 0.5)
             Clip(x · 1/6 + 0.5, 0, 1) (or x / 6)              → HardSigmoid(1/6, 0.5)
HardSwish:   x · Clip(x + 3, 0, 6) / 6 in its three groupings, x · HardSigmoid(x; 1/6, 0.5)
(Paddle writes Clip(a, 0, 6) as Min(Relu(a), 6): the same values, NaN included.)
SiLU:        x · Sigmoid(x)                                    → Swish(x) (alpha 1)
Mish:        x · tanh(softplus(x))                             → Mish(x)

ONNX has had ``Swish`` only since opset 24 (checked against onnx 1.23's schemas), so SiLU
fuses only at opset ≥ 24 (``--opset 24``); below that the report counts what it missed.
onnxscript's ``_fuse_hardswish`` rules compare constants with rtol 1e-4 and do not check
that a [1]-shaped constant cannot broadcast the result up, nor the Clip's attribute form
(opset < 11); these rules read every constant strictly (see ``_rules.scalar``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from graphopt import editing
from graphopt.passes.fusion import _rules
from graphopt.registry import register

_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


def _clip_bounds(clipped: ir.Value, x: ir.Value) -> tuple[float, float] | None:
    """(min, max) of a Clip with both bounds constant, from inputs (≥ 11) or attributes."""
    clip = clipped.producer()
    if len(clip.inputs) == 3 and clip.inputs[1] is not None and clip.inputs[2] is not None:
        low, high = (_rules.scalar(v, None) for v in clip.inputs[1:])
        if low is None or high is None or clip.inputs[1].dtype != x.dtype:
            return None
        return low, high
    if len(clip.inputs) == 1 and "min" in clip.attributes and "max" in clip.attributes:
        return float(editing.attribute(clip, "min")), float(editing.attribute(clip, "max"))
    return None


class _HardRule(pattern.RewriteRuleClassBase):
    """HardSigmoid / HardSwish from Clip(x + 3, 0, 6) (or Min(Relu(x + 3), 6)) and 1/6 (Div
    by 6 or Mul by 1/6)."""

    def __init__(self, swish: str | None, divide: str, relu_min: bool = False) -> None:
        super().__init__(f"Hard(swish={swish}, {divide}, relu_min={relu_min})")
        self._swish, self._divide, self._relu_min = swish, divide, relu_min

    def _scale(self, op, value, six):
        return op.Div(value, six) if self._divide == "div" else op.Mul(value, six)

    def pattern(self, op, x, three, six, cap):
        if self._relu_min:
            clipped = op.Min(op.Relu(op.Add(x, three)), cap, _outputs=["clipped"])
        else:
            clipped = op.Clip(
                op.Add(x, three),
                _allow_other_inputs=True,
                _allow_other_attributes=True,
                _outputs=["clipped"],
            )
        if self._swish is None:
            return self._scale(op, clipped, six)
        if self._swish == "x_times_hsig":
            return op.Mul(x, self._scale(op, clipped, six))
        return self._scale(op, op.Mul(x, clipped), six)

    def check(self, context, x, three, six, clipped, cap=None, **_):
        result = pattern.MatchResult()
        if x.dtype not in _FLOATS:
            return result.fail("dtype")
        # Min(Relu(a), 6) is Clip(a, 0, 6) value for value (NaN stays NaN in both).
        bounded = _rules.is_scalar(cap, x, 6.0) if self._relu_min else True
        if not bounded or (not self._relu_min and _clip_bounds(clipped, x) != (0.0, 6.0)):
            return result.fail("not Clip(0, 6)")
        sixth = 6.0 if self._divide == "div" else 1.0 / 6.0
        if not (_rules.is_scalar(three, x, 3.0) and _rules.is_scalar(six, x, sixth)):
            return result.fail("constants differ")
        return result

    def rewrite(self, op, x, **_):
        if self._swish is None:
            return op.HardSigmoid(x, alpha=1.0 / 6.0, beta=0.5)
        return op.HardSwish(x)


class _AffineHardSigmoid(pattern.RewriteRuleClassBase):
    """Clip(x · 1/6 + 0.5, 0, 1), or with x / 6: HardSigmoid(1/6, 0.5) spelled out (Paddle).

    With · 1/6 it is the kernel's own arithmetic: bit-identical to HardSigmoid in ORT (and,
    times x, to HardSwish), checked at 500k points, ±3 and 0 neighbourhoods included; with
    / 6 it differs in the last bit as the Clip(x + 3, 0, 6) / 6 forms do.
    """

    def __init__(self, divide: str) -> None:
        super().__init__(f"AffineHardSigmoid({divide})")
        self._divide = divide

    def pattern(self, op, x, scale, half):
        scaled = op.Div(x, scale) if self._divide == "div" else op.Mul(x, scale)
        return op.Clip(
            op.Add(scaled, half),
            _allow_other_inputs=True,
            _allow_other_attributes=True,
            _outputs=["clipped"],
        )

    def check(self, context, x, scale, half, clipped, **_):
        result = pattern.MatchResult()
        if x.dtype not in _FLOATS:
            return result.fail("dtype")
        if _clip_bounds(clipped, x) != (0.0, 1.0):
            return result.fail("not Clip(0, 1)")
        sixth = 6.0 if self._divide == "div" else 1.0 / 6.0
        if not (_rules.is_scalar(scale, x, sixth) and _rules.is_scalar(half, x, 0.5)):
            return result.fail("constants differ")
        return result

    def rewrite(self, op, x, **_):
        return op.HardSigmoid(x, alpha=1.0 / 6.0, beta=0.5)


def _hardsigmoid_rules() -> list[pattern.RewriteRule]:
    return [
        *(_HardRule.rule(None, d, relu_min) for d in ("div", "mul") for relu_min in (False, True)),
        *(_AffineHardSigmoid.rule(d) for d in ("div", "mul")),
    ]


class _HardSwishFromHardSigmoid(pattern.RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.Mul(x, op.HardSigmoid(x, _allow_other_attributes=True, _outputs=["hsig"]))

    def check(self, context, x, hsig, **_):
        result = pattern.MatchResult()
        node = hsig.producer()
        alpha = editing.attribute(node, "alpha", 0.2)
        beta = editing.attribute(node, "beta", 0.5)
        # Exporters write 1/6 in float32 (0.16666667); the HardSwish kernel uses exactly 1/6.
        if not (np.isclose(alpha, 1.0 / 6.0, rtol=_rules.RTOL, atol=0) and beta == 0.5):
            return result.fail("HardSigmoid is not the HardSwish one")
        if x.dtype not in _FLOATS:
            return result.fail("dtype")
        return result

    def rewrite(self, op, x, **_):
        return op.HardSwish(x)


class _UnaryTimesX(pattern.RewriteRuleClassBase):
    """x · f(x) → op(x): SiLU (f = Sigmoid) and Mish (f = tanh ∘ softplus)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"x*{kind}(x)")
        self._kind = kind

    def pattern(self, op, x):
        if self._kind == "silu":
            return op.Mul(x, op.Sigmoid(x))
        return op.Mul(x, op.Tanh(op.Softplus(x)))

    def check(self, context, x, **_):
        result = pattern.MatchResult()
        return result if x.dtype in _FLOATS else result.fail("dtype")

    def rewrite(self, op, x, **_):
        return op.Swish(x) if self._kind == "silu" else op.Mish(x)


def _hardswish_rules() -> list[pattern.RewriteRule]:
    return [
        _HardRule.rule(swish, divide, relu_min)
        for swish in ("x_times_hsig", "product_scaled")
        for divide in ("div", "mul")
        for relu_min in (False, True)
    ] + [_HardSwishFromHardSigmoid.rule()]


@register
class FuseActivationsPass(_rules.RuleFusionPass):
    """Decomposed HardSwish (14), HardSigmoid (6), SiLU → Swish (24), Mish (18).

    Constants must match within 1e-6; refuses non-float inputs.
    """

    name = "fuse-activations"
    trigger_ops = ("Clip", "Min", "HardSigmoid", "Sigmoid", "Softplus")

    def groups(self) -> list[_rules.RuleGroup]:
        return [
            # HardSwish before HardSigmoid (whose pattern is part of HardSwish's), then once
            # more for x · HardSigmoid(x) pairs the HardSigmoid rules just created.
            _rules.RuleGroup("HardSwish", 14, _hardswish_rules),
            _rules.RuleGroup("HardSigmoid", 6, _hardsigmoid_rules),
            _rules.RuleGroup("HardSwish", 14, lambda: [_HardSwishFromHardSigmoid.rule()]),
            _rules.RuleGroup("Swish", 24, lambda: [_UnaryTimesX.rule("silu")]),
            _rules.RuleGroup("Mish", 18, lambda: [_UnaryTimesX.rule("mish")]),
        ]
