"""Residual Add + LayerNormalization → com.microsoft SkipLayerNormalization (and the RMS form)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import RmsNormFusion
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    SkipLayerNormFusion,
    SkipRmsNormFusion,
)

from graphopt import editing
from graphopt.passes.fusion.ort._base import MS_DOMAIN, OrtFusionPass
from graphopt.passes.fusion.ort._dims import dims, same_dim, same_shape
from graphopt.registry import GraphPass, PassOption, Stage, register

# Measured with ORT 1.32 on CPU (1 thread, [1, 128, 384] float): SkipLayerNormalization takes
# ~270 us where Add + LayerNormalization take ~50-80 us, so on the CPU target the fusion is a
# slowdown; it stays available (``force``) for execution providers where the kernel pays off.
FORCE = PassOption(
    "force",
    bool,
    False,
    "fuse although ORT's CPU SkipLayerNormalization kernel is slower than Add+LayerNorm",
)


class CheckedRmsNorm(RmsNormFusion):
    """onnxscript's RMSNorm → SimplifiedLayerNormalization rule, with the shapes its op keeps.

    SimplifiedLayerNormalization's output has x's shape, and its scale is read per element
    of the normalized (last) axis. onnxscript takes any one-element epsilon and any scale:
    epsilon [1, 1, 1] on x [N, 8] raised the original's rank ((1, N, 8)), and a scale of
    [3, 1, 8] broadcast it to (3, N, 8); the fused op gives (N, 8) in both. Epsilon must not
    have more axes than x, and the scale must be [D] for x's last dim D.
    """

    def check(self, context, x, scale, epsilon, **bindings):
        result = super().check(context, x=x, scale=scale, epsilon=epsilon, **bindings)
        if not result:
            return result
        x_dims = dims(x)
        array = editing.constant_array(epsilon)
        # Every x has at least the normalized axis, so a scalar or [1] never adds one.
        if array is None or np.ndim(array) > (1 if x_dims is None else max(len(x_dims), 1)):
            return result.fail("epsilon has more axes than x", epsilon)
        scale_dims = dims(scale)
        if not x_dims or scale_dims is None or len(scale_dims) != 1:
            return result.fail("scale is not a vector", scale)
        if not same_dim(scale_dims[0], x_dims[-1]):
            return result.fail("scale is not one value per normalized element", scale)
        return result


class CheckedSkipRmsNorm(SkipRmsNormFusion):
    """onnxscript's residual Add + SimplifiedLayerNormalization → SkipSimplifiedLayerNorm;
    the fused op adds skip to input without broadcasting, so both must have provably the same
    shape (onnxscript called two unknown batch dims equal: batch 3 + batch 1 gave batch 1)."""

    def check(self, context, input, skip, **bindings):
        result = super().check(context, input=input, skip=skip, **bindings)
        if result and not same_shape(input, skip):
            return result.fail("input and skip not provably the same shape", skip)
        return result


class CheckedSkipLayerNorm(SkipLayerNormFusion):
    """As :class:`CheckedSkipRmsNorm`, for LayerNormalization → SkipLayerNormalization."""

    def check(self, context, input, skip, **bindings):
        result = super().check(context, input=input, skip=skip, **bindings)
        if result and not same_shape(input, skip):
            return result.fail("input and skip not provably the same shape", skip)
        return result


def _skip_rules(rule: type[pattern.RewriteRuleClassBase], prefix: str) -> pattern.RewriteRuleSet:
    """onnxscript's three variants of a skip-norm rule (bias before, after, none)."""
    return pattern.RewriteRuleSet(
        [
            rule.rule(f"{prefix}PreBias", has_bias=True, bias_pre_add=True),
            rule.rule(f"{prefix}Bias", has_bias=True, bias_pre_add=False),
            rule.rule(prefix, has_bias=False),
        ]
    )


_RMS_RULES = pattern.RewriteRuleSet(
    [CheckedRmsNorm.rule("RmsNormFusion1", False), CheckedRmsNorm.rule("RmsNormFusion2", True)]
)
_SKIP_RMS_RULES = _skip_rules(CheckedSkipRmsNorm, "SkipRmsNorm")
_SKIP_LAYER_RULES = _skip_rules(CheckedSkipLayerNorm, "SkipLayerNorm")


def fuse_rms_normalization(model: ir.Model, **_) -> int:
    return _RMS_RULES.apply_to_model(model)


def fuse_skip_rms_normalization(model: ir.Model, **_) -> int:
    return _SKIP_RMS_RULES.apply_to_model(model)


def fuse_skip_layer_normalization(model: ir.Model, **_) -> int:
    return _SKIP_LAYER_RULES.apply_to_model(model)


@register
class OrtSkipLayerNormPass(OrtFusionPass):
    """With --target ort: Add(+bias) feeding LayerNormalization → SkipLayerNormalization."""

    name = "ort-skip-layer-norm"
    ops = frozenset(("LayerNormalization",))
    options = (FORCE,)
    steps = (fuse_skip_layer_normalization,)
    produces = ((MS_DOMAIN, "SkipLayerNormalization"),)

    def rewrite(self, model: ir.Model) -> int:
        if not self.settings["force"]:
            return 0
        return super().rewrite(model)


@register
class OrtSkipRmsNormPass(OrtFusionPass):
    """With --target ort: RMSNorm (Pow/Mean/Sqrt/Div/Mul) + residual Add → SkipSimplifiedLN."""

    name = "ort-skip-rms-norm"
    # The decomposed RMSNorm: its mean of squares (the rule makes the Simplified op itself).
    ops = frozenset(("ReduceMean",))
    # RMSNorm first becomes ORT's SimplifiedLayerNormalization (registered by ORT in the default
    # domain); only the ones that also absorb a residual Add count as hits, but the plain ones
    # are kept too when the pass fires, as they are the same contrib kernel family.
    steps = (fuse_rms_normalization, fuse_skip_rms_normalization)
    produces = (
        (MS_DOMAIN, "SkipSimplifiedLayerNormalization"),
        ("", "SimplifiedLayerNormalization"),
    )


@register
class OrtResidualSumPass(GraphPass):
    """With --target ort: an Add feeding LayerNormalization → Sum, so ORT keeps them unfused."""

    name = "ort-residual-sum"
    targets = frozenset(("ort",))
    stage = Stage.FUSION
    # ORT's level-2 optimizer fuses Add(+Add bias)→LayerNormalization into the slow CPU
    # SkipLayerNormalization (see FORCE) by matching the op type "Add"; a two-input Sum is the
    # same elementwise addition with the same broadcasting, and that fusion does not match it.

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        # One table for node and value names: unnamed Adds gave every Sum the name "_sum".
        names = editing.NameTable(model.graph)
        for node in list(model.graph):
            if not editing.is_op(node, "LayerNormalization"):
                continue
            add = node.inputs[0].producer() if node.inputs[0] is not None else None
            if add is None or not editing.is_op(add, "Add") or len(add.inputs) != 2:
                continue
            # No dtype check: LayerNormalization's X types (float16/32/64, bfloat16) are all
            # Sum types, and TorchScript exports often carry no value types at all.
            total = ir.node("Sum", list(add.inputs), name=names.take(f"{add.name or 'add'}_sum"))
            total.outputs[0].name = names.take(f"{add.outputs[0].name}_sum")
            if add.outputs[0].dtype is not None:
                total.outputs[0].dtype = add.outputs[0].dtype
            total.outputs[0].shape = add.outputs[0].shape
            editing.insert_after(add, [total])
            if not editing.replace_value(add.outputs[0], total.outputs[0]):
                model.graph.remove(total, safe=True)
                continue
            editing.remove_if_dead(add)
            hits += 1
        return hits
