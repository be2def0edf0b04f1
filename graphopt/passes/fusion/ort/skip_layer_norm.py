"""Residual Add + LayerNormalization → com.microsoft SkipLayerNormalization (and the RMS form)."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    fuse_skip_layer_normalization,
    fuse_skip_rms_normalization,
)

from graphopt import editing
from graphopt.passes.fusion.ort._base import MS_DOMAIN, OrtFusionPass
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
        for node in list(model.graph):
            if not editing.is_op(node, "LayerNormalization"):
                continue
            add = node.inputs[0].producer() if node.inputs[0] is not None else None
            if add is None or not editing.is_op(add, "Add") or len(add.inputs) != 2:
                continue
            # No dtype check: LayerNormalization's X types (float16/32/64, bfloat16) are all
            # Sum types, and TorchScript exports often carry no value types at all.
            total = ir.node("Sum", list(add.inputs), name=f"{add.name}_sum")
            total.outputs[0].name = editing.unique_name(model.graph, f"{add.outputs[0].name}_sum")
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
