"""Decomposed layer normalization → LayerNormalization (opset 17).

Matches (x - mean(x)) / sqrt(mean((x - mean(x))²) + eps) [* gamma] [+ beta], the square as
Pow(d, 2) or Mul(d, d), the division as Div, Mul(Reciprocal) or Mul(Div(1, ·)), both
ReduceMeans over the same axes (attribute or, from opset 18, input).

onnxscript's ``LayerNormFusion`` is the starting point, but it matches only a literal
``axes=[-1]`` input (not the attribute form of opset 17 exports, nor other trailing blocks),
does not check keepdims, Pow's exponent or the shapes of gamma and beta (ORT's kernel wants
them to span exactly the normalized dims), and fuses float64 into a float32 stash. Hence
these rules, written with its pattern language.

Refused: reductions over a block that does not end at the last axis (LayerNormalization
cannot express them; the report says so), keepdims=0, non-float32 inputs (the fused op
would compute in a different precision than the original), non-constant or wrongly shaped
gamma/beta, a negative or non-constant epsilon.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graphopt import editing
from graphopt.passes.fusion import _rules
from graphopt.registry import register


class _LayerNormRule(pattern.RewriteRuleClassBase):
    # onnxscript's OrValue cannot be combined with commute=True (0.7.2 raises), so each
    # alternative is its own rule.
    def __init__(self, scale: bool, bias: bool, square: str, divide: str, note) -> None:
        super().__init__(f"LayerNorm(scale={scale}, bias={bias}, {square}, {divide})")
        self._scale, self._bias, self._note = scale, bias, note
        self._square, self._divide = square, divide

    def pattern(self, op, x, two, one, eps, gamma, beta):
        mean = op.ReduceMean(
            x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["mean"]
        )
        dev = op.Sub(x, mean)
        square = op.Pow(dev, two) if self._square == "pow" else op.Mul(dev, dev)
        var = op.ReduceMean(
            square, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["var"]
        )
        std = op.Sqrt(op.Add(var, eps))
        if self._divide == "div":
            out = op.Div(dev, std)
        elif self._divide == "reciprocal":
            out = op.Mul(dev, op.Reciprocal(std))
        else:
            out = op.Mul(dev, op.Div(one, std))
        if self._scale:
            out = op.Mul(out, gamma)
        if self._bias:
            out = op.Add(out, beta)
        return out

    def check(self, context, x, mean, var, eps, two=None, one=None, gamma=None, beta=None, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("LayerNormalization fusion handles float32 only")
        if two is not None and not _rules.is_exponent(two, x, 2.0):
            return result.fail("square is not Pow(d, 2)")
        if one is not None and not _rules.is_scalar(one, x, 1.0):
            return result.fail("not a reciprocal")
        mean_node, var_node = mean.producer(), var.producer()
        for node in (mean_node, var_node):
            if editing.attribute(node, "keepdims", 1) != 1:
                return result.fail("keepdims=0")
        axes = _rules.reduce_axes(mean_node)
        if axes is None or axes != _rules.reduce_axes(var_node):
            return result.fail("the two reductions differ")
        axis = _rules.trailing_axis(axes, _rules.rank(x))
        if axis is None:
            self._note(
                f"fuse-layer-norm: a normalization over axes {axes} of a rank-"
                f"{_rules.rank(x) if _rules.rank(x) is not None else '?'} tensor is not a "
                "trailing block of axes; LayerNormalization cannot express it, left as is"
            )
            return result.fail("not a trailing block of axes")
        epsilon = _rules.scalar(eps, var)
        if epsilon is None or epsilon < 0:
            return result.fail("epsilon is not a constant non-negative scalar")
        self._axis, self._epsilon = axis, epsilon
        if gamma is not None:
            self._gamma = _rules.affine_param(gamma, x, axis)
        else:
            self._gamma = _rules.ones(x, axis)
        self._beta = _rules.affine_param(beta, x, axis) if beta is not None else None
        if self._gamma is None or (beta is not None and self._beta is None):
            return result.fail("gamma/beta do not span exactly the normalized dims")
        return result

    def rewrite(self, op, x, **_):
        inputs = [x, _rules.as_input(op, self._gamma)]
        if self._beta is not None:
            inputs.append(_rules.as_input(op, self._beta))
        return op.LayerNormalization(*inputs, axis=self._axis, epsilon=self._epsilon, stash_type=1)


@register
class FuseLayerNormPass(_rules.RuleFusionPass):
    """Decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div, ±gamma/beta) → LayerNormalization (17).

    Refuses non-trailing axes (noted in the report), non-float32, wrongly shaped gamma/beta.
    """

    name = "fuse-layer-norm"
    trigger_ops = ("ReduceMean",)
    required_ops = ("ReduceMean", "Sqrt", "Add")

    def groups(self) -> list[_rules.RuleGroup]:
        def rules(scale: bool, bias: bool):
            return lambda: [
                _LayerNormRule.rule(scale, bias, square, divide, self.context.note)
                for square in ("pow", "mul")
                for divide in ("div", "reciprocal", "one_div")
            ]

        return [
            _rules.RuleGroup("LayerNormalization", 17, rules(scale, bias))
            for scale, bias in ((True, True), (True, False), (False, True), (False, False))
        ]
