"""Decomposed RMS normalization → RMSNormalization (opset 23).

Matches gamma · cast_back(x' · rsqrt(mean(x'²) + eps)) with x' = Cast(x, float32) or x,
rsqrt as Reciprocal(Sqrt), Div(1, Sqrt) or a Div by the Sqrt, x'² as Pow(x', 2) or x'·x',
the output Cast optional: the LLaMA/Qwen form (dynamo and TorchScript exports).

RMSNormalization computes in ``stash_type`` and casts back to x's type before the scale,
which is exactly that form when the casts go float32 and back (or are no-ops on float32).

onnxscript's ``RmsNormFusion`` is the starting point, but it accepts any cast pair (a
compute cast to float16, or a final cast to another type than x's, which
RMSNormalization cannot express), matches only ``axes=[-1]`` as an input, checks neither
keepdims, Pow's exponent nor the scale's shape, and does not know Div(1, ·). Refused: casts
the op cannot express, non-trailing axes (noted), non-constant or wrongly shaped scale.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graphopt import editing
from graphopt.passes.fusion import _rules
from graphopt.registry import register

_CAST_VARIANTS = ((True, True), (True, False), (False, True), (False, False))
_INPUT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class _RmsNormRule(pattern.RewriteRuleClassBase):
    # One rule per variant: OrValue does not combine with commute in onnxscript 0.7.2.
    def __init__(
        self, scale: bool, cast_in: bool, cast_out: bool, square: str, divide: str, note
    ) -> None:
        super().__init__(
            f"RMSNorm(scale={scale}, cast_in={cast_in}, cast_out={cast_out}, {square}, {divide})"
        )
        self._with_scale, self._cast_in, self._cast_out = scale, cast_in, cast_out
        self._square, self._divide, self._note = square, divide, note

    def pattern(self, op, x, two, one, eps, gamma):
        xc = op.Cast(x, _outputs=["xc"]) if self._cast_in else x
        square = op.Pow(xc, two) if self._square == "pow" else op.Mul(xc, xc)
        mean = op.ReduceMean(
            square, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["mean"]
        )
        std = op.Sqrt(op.Add(mean, eps))
        if self._divide == "reciprocal":
            out = op.Mul(xc, op.Reciprocal(std))
        elif self._divide == "one_div":
            out = op.Mul(xc, op.Div(one, std))
        else:
            out = op.Div(xc, std)
        if self._cast_out:
            out = op.Cast(out, _outputs=["back"])
        return op.Mul(gamma, out) if self._with_scale else out

    def check(self, context, x, mean, eps, gamma=None, two=None, one=None, xc=None, back=None, **_):
        result = pattern.MatchResult()
        if x.dtype not in _INPUT_TYPES:
            return result.fail("input dtype")
        if _is_centered(x):
            return result.fail("x - mean(x): a LayerNorm, fuse-layer-norm's business")
        compute = _cast_target(xc) if xc is not None else x.dtype
        final = _cast_target(back) if back is not None else compute
        # stash_type float32, result cast back to x's type: what RMSNormalization computes.
        if compute != ir.DataType.FLOAT or final != x.dtype:
            return result.fail("casts not expressible with stash_type")
        if two is not None and not _rules.is_exponent(two, x, 2.0):
            return result.fail("square is not Pow(x, 2)")
        if one is not None and not _rules.is_scalar(one, mean, 1.0):
            return result.fail("not a reciprocal")
        reduce = mean.producer()
        if editing.attribute(reduce, "keepdims", 1) != 1:
            return result.fail("keepdims=0")
        axes = _rules.reduce_axes(reduce)
        axis = None if axes is None else _rules.trailing_axis(axes, _rules.rank(x))
        if axis is None:
            self._note(
                f"fuse-rms-norm: a normalization over axes {axes} of a rank-"
                f"{_rules.rank(x) if _rules.rank(x) is not None else '?'} tensor is not a "
                "trailing block of axes; RMSNormalization cannot express it, left as is"
            )
            return result.fail("not a trailing block of axes")
        epsilon = _rules.scalar(eps, mean)
        if epsilon is None or epsilon < 0:
            return result.fail("epsilon is not a constant non-negative scalar")
        # Without gamma (a unit gamma is often erased as a no-op Mul first): a unit scale.
        scale = _rules.affine_param(gamma, x, axis) if gamma is not None else _rules.ones(x, axis)
        if scale is None:
            return result.fail("scale does not span exactly the normalized dims")
        self._axis, self._epsilon, self._scale = axis, epsilon, scale
        return result

    def rewrite(self, op, x, **_):
        return op.RMSNormalization(
            x,
            _rules.as_input(op, self._scale),
            axis=self._axis,
            epsilon=self._epsilon,
            stash_type=int(ir.DataType.FLOAT),
        )


def _is_centered(x: ir.Value) -> bool:
    """x = a - ReduceMean(a): the variance half of a LayerNorm (fused or refused there)."""
    sub = x.producer()
    if sub is None or not editing.is_op(sub, "Sub") or len(sub.inputs) != 2:
        return False
    mean = sub.inputs[1].producer() if sub.inputs[1] is not None else None
    return (
        mean is not None and editing.is_op(mean, "ReduceMean") and mean.inputs[0] is sub.inputs[0]
    )


def _cast_target(value: ir.Value) -> ir.DataType | None:
    to = editing.attribute(value.producer(), "to")
    return None if to is None else ir.DataType(to)


@register
class FuseRmsNormPass(_rules.RuleFusionPass):
    """x · rsqrt(mean(x²) + eps) · gamma (± float32 casts) → RMSNormalization (opset 23).

    Refuses non-trailing axes (noted), casts stash_type cannot express, wrongly shaped gamma.
    """

    name = "fuse-rms-norm"
    trigger_ops = ("ReduceMean",)
    required_ops = ("ReduceMean", "Sqrt", "Add")

    def groups(self) -> list[_rules.RuleGroup]:
        def rules(scale: bool) -> list[pattern.RewriteRule]:
            # Casting variants first: all variants share the root (the gamma Mul), and the
            # first rule that matches there wins.
            return [
                _RmsNormRule.rule(scale, cast_in, cast_out, square, divide, self.context.note)
                for cast_in, cast_out in _CAST_VARIANTS
                for square in ("pow", "mul")
                for divide in ("reciprocal", "one_div", "div")
            ]

        # With gamma first: the gamma-less pattern's root comes first in the graph.
        return [
            _rules.RuleGroup("RMSNormalization", 23, lambda: rules(True)),
            _rules.RuleGroup("RMSNormalization", 23, lambda: rules(False)),
        ]
