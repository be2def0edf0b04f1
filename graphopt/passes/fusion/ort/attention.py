"""Scaled dot-product attention → com.microsoft MultiHeadAttention / Attention."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.attention import fuse_attention
from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

from graphopt import editing
from graphopt.passes.fusion.ort._base import MS_DOMAIN, OrtFusionPass
from graphopt.registry import register

ATTENTION_OPS = ("MultiHeadAttention", "Attention")


def constants_second(model: ir.Model, **_) -> int:
    """Put the constant operand of commutative Adds second: Add(bias, MatMul) → Add(MatMul, bias).

    TorchScript exports write Linear's bias first; onnxscript's MHA-bias rule only matches the
    bias second, so without this the Q/K/V projections never merge into one packed Attention.
    """
    swapped = 0
    for node in model.graph:
        if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
            continue
        first, second = node.inputs
        if editing.is_constant(first) and not editing.is_constant(second):
            node.replace_input_with(0, second)
            node.replace_input_with(1, first)
            swapped += 1
    return swapped


@register
class OrtAttentionPass(OrtFusionPass):
    """With --target ort: Q·Kᵀ/scale(+mask)→Softmax→·V → MultiHeadAttention / Attention."""

    name = "ort-attention"
    ops = frozenset(("Softmax",))  # every attention pattern the rules match has one
    # onnxscript's chain: SDPA (private op) → MHA with its reshapes/transposes absorbed → the
    # Q/K/V bias Adds → one packed-QKV Attention when Q, K and V share an input; an SDPA that
    # found no MHA context is still expressed as an MHA. Shapes are re-inferred after SDPA
    # because its rules add nodes the MHA rules must see shapes for.
    steps = (
        constants_second,
        partial(fuse_sdpa, apply_shape_inference=True),
        fuse_mha1,
        fuse_mha2,
        fuse_mha_scale,
        fuse_mha_bias,
        fuse_attention,
        replace_sdpa_by_mha,
    )
    produces = tuple((MS_DOMAIN, op) for op in ATTENTION_OPS)

    def repair(self, model: ir.Model) -> bool:
        # onnxscript's MHA rule absorbs the Reshape after the attention output without checking
        # its target: GPT-2's Conv1D export reshapes to (B*S, D) for a Gemm, and the (B, S, D)
        # MHA output would then stand for that 2-D value. Put the reshape back where that
        # happened; refuse the whole result when the intended shape cannot be rebuilt.
        graph = model.graph
        for node in list(graph):
            if node.domain != MS_DOMAIN or node.op_type not in ATTENTION_OPS:
                continue
            out = node.outputs[0]
            if out.shape is None or out.shape.rank() == 3:
                continue
            dims = [d if isinstance(d, int) else -1 for d in out.shape.dims]
            if dims.count(-1) > 1 or out.is_graph_output():
                return False
            users = list(out.uses())  # before the new Reshape becomes a user too
            target = editing.add_initializer(graph, f"{out.name}_shape", np.array(dims, np.int64))
            reshape = ir.node("Reshape", [out, target], name=f"{node.name}_restore_shape")
            restored = reshape.outputs[0]
            restored.name = editing.unique_name(graph, f"{out.name}_restored")
            restored.dtype, restored.shape = out.dtype, out.shape
            for user, index in users:
                user.replace_input_with(index, restored)
            out.shape = None
            editing.insert_after(node, [reshape])
        return True
