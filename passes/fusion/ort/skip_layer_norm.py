"""Residual Add + LayerNormalization → com.microsoft SkipLayerNormalization (and the RMS form)."""

from __future__ import annotations

from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    fuse_skip_layer_normalization,
    fuse_skip_rms_normalization,
)

from graphopt.passes.fusion.ort._base import MS_DOMAIN, OrtFusionPass
from graphopt.registry import register


@register
class OrtSkipLayerNormPass(OrtFusionPass):
    """With --target ort: Add(+bias) feeding LayerNormalization → SkipLayerNormalization."""

    name = "ort-skip-layer-norm"
    steps = (fuse_skip_layer_normalization,)
    produces = ((MS_DOMAIN, "SkipLayerNormalization"),)


@register
class OrtSkipRmsNormPass(OrtFusionPass):
    """With --target ort: RMSNorm (Pow/Mean/Sqrt/Div/Mul) + residual Add → SkipSimplifiedLN."""

    name = "ort-skip-rms-norm"
    # RMSNorm first becomes ORT's SimplifiedLayerNormalization (registered by ORT in the default
    # domain); only the ones that also absorb a residual Add count as hits, but the plain ones
    # are kept too when the pass fires, as they are the same contrib kernel family.
    steps = (fuse_rms_normalization, fuse_skip_rms_normalization)
    produces = (
        (MS_DOMAIN, "SkipSimplifiedLayerNormalization"),
        ("", "SimplifiedLayerNormalization"),
    )
