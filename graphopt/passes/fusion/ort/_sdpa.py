"""onnxscript's scaled dot-product attention rule (→ its private SDPA op), with the key's
3-D detour checked.

The rule accepts Kᵀ computed three ways; one of them goes through 3-D: Reshape(K, ·) →
Transpose(perm [0, 2, 1]) → Reshape(·, ·). onnxscript takes both Reshape targets on trust,
and a detour that flattens the wrong axes ([B, H, S, Dh] → [B, H·S, Dh] → … →
[B, H, Dh, S]) mixes the heads' keys while the rule still calls it Kᵀ. The detour is Kᵀ
exactly when the first Reshape merges the leading (B, H) axes, keeping (Skv, Dh), and the
second splits them again, giving (H, Dh, Skv): both shown by their inferred output shapes.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.sdpa import SDPA

from graphopt.passes.fusion.ort._dims import dims, same_dim


def _key_detour(nodes, key: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """The (first, second) Reshape of the 3-D Kᵀ detour among the matched ``nodes``."""
    for first in nodes:
        if first.op_type != "Reshape" or first.inputs[0] is not key:
            continue
        for second in nodes:
            source = second.inputs[0].producer() if second.op_type == "Reshape" else None
            if (
                source is not None
                and source.op_type == "Transpose"
                and (source.inputs[0] is first.outputs[0])
            ):
                return first, second
    return None


class CheckedSDPA(SDPA):
    """onnxscript's SDPA rule; the 3-D key detour must provably compute Kᵀ per head."""

    def check(self, context, query, key, value, mask, key_format, **bindings):
        result = super().check(context, query, key, value, mask, key_format, **bindings)
        if not result:
            return result
        guard = next((node for node in context.nodes if node.op_type == "IsNaN"), None)
        if guard is not None:
            # Softmax's NaN guard (Where(IsNaN(p), 0, p)) makes a fully masked row 0; ORT's
            # fused attention returns NaN there. ort-sdpa-forms moves the guard past the
            # head merge where it can; any other stays unfused.
            return pattern.MatchResult().fail("softmax NaN guard", guard)
        detour = _key_detour(context.nodes, key)
        if detour is None:
            return result  # Kᵀ by one Transpose: its perm is in the pattern
        first, second = detour
        key_dims = dims(key)  # [B, H, Skv, Dh], as the parent check has shown
        flat, back = dims(first.outputs[0]), dims(second.outputs[0])
        if key_dims is None or flat is None or back is None:
            return pattern.MatchResult().fail("key detour shapes unknown", key)
        _, heads, length, size = key_dims
        # [X, Skv, Dh]: by element count X = B·H, the leading axes merged in order.
        if len(flat) != 3 or not (same_dim(flat[1], length) and same_dim(flat[2], size)):
            return pattern.MatchResult().fail("key detour does not merge (B, H)", first)
        # [Y, H, Dh, Skv] from [B·H, Dh, Skv]: Y = B, the merged axes split back.
        expected = (heads, size, length)
        if len(back) != 4 or not all(map(same_dim, back[1:], expected)):
            return pattern.MatchResult().fail("key detour does not split (B, H)", second)
        return result


sdpa_rules = pattern.RewriteRuleSet([CheckedSDPA.rule()])


def fuse_sdpa(model: ir.Model, apply_shape_inference: bool = False, **_) -> int:
    """onnxscript's ``fuse_sdpa`` with :class:`CheckedSDPA`."""
    count = sdpa_rules.apply_to_model(model)
    if apply_shape_inference:
        common_passes.ShapeInferencePass()(model)
    return count
