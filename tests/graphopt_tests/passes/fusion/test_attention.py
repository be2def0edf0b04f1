"""fuse-attention: Softmax(Q·Kᵀ·s + mask)·V → Attention (opset 23), refusals, gating."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.attention import FuseAttentionPass
from graphopt.registry import PassContext
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

B, H, S, D = 2, 4, 6, 8
F = TensorProto.FLOAT
MIN = np.finfo(np.float32).min
mh = helper.make_node


def _model(k_layout="bshd", scale="mul", mask_shape=(B, 1, S, S), opset=23, kv_heads=H, fill=MIN):
    """``fill`` None: the float mask is a graph input; else Where(keep, 0, fill), a bool
    ``keep`` input, as exporters build it (transformers fills with float32's lowest)."""
    k_shape = (B, S, kv_heads, D) if k_layout == "bshd" else (B, kv_heads, S, D)
    perm = [0, 2, 3, 1] if k_layout == "bshd" else [0, 1, 3, 2]
    nodes = [mh("Transpose", ["k"], ["kt"], perm=perm), mh("MatMul", ["q", "kt"], ["sc"])]
    inits = {}
    if scale == "mul":
        nodes.append(mh("Mul", ["sc", "s"], ["scaled"]))
        inits["s"] = np.array(D**-0.5, np.float32)
    elif scale == "div":
        nodes.append(mh("Div", ["sc", "s"], ["scaled"]))
        inits["s"] = np.array(D**0.5, np.float32)
    else:  # a non-constant scale: refused
        nodes.append(mh("Mul", ["sc", "s"], ["scaled"]))
    inputs = [
        tensor_info("q", F, (B, H, S, D)),
        tensor_info("k", F, k_shape),
        tensor_info("v", F, (B, kv_heads, S, D)),
    ]
    if scale == "input":
        inputs.append(tensor_info("s", F, ()))
    if mask_shape is not None:
        if fill is None:
            inputs.append(tensor_info("mask", F, mask_shape))
        else:
            nodes.append(mh("Where", ["keep", "zero", "fill"], ["mask"]))
            inits.update(zero=np.array(0.0, np.float32), fill=np.array(fill, np.float32))
            inputs.append(tensor_info("keep", TensorProto.BOOL, mask_shape))
        nodes.append(mh("Add", ["scaled", "mask"], ["masked"]))
    nodes += [
        mh("Softmax", ["masked" if mask_shape is not None else "scaled"], ["p"], axis=-1),
        mh("MatMul", ["p", "v"], ["y"]),
    ]
    return make_model(
        nodes, inputs, [tensor_info("y", F, (B, H, S, D))], inits, opset=opset, ir_version=10
    )


def _feeds(model, mask_shape=(B, 1, S, S), fill=MIN):
    rng = np.random.default_rng(0)
    feeds = {
        v.name: rng.standard_normal([int(d) for d in v.shape.dims]).astype(np.float32)
        for v in model.graph.inputs
        if v.name not in ("mask", "keep")
    }
    if mask_shape is not None:
        # Causal, and batch row 1 left-padded by 2: its query rows 0 and 1 see no key at all.
        keep = np.broadcast_to(np.tril(np.ones((S, S), bool)), mask_shape).copy()
        if len(mask_shape) == 4 and mask_shape[0] == B:
            keep[1, ..., :2] = False
        if fill is None:
            feeds["mask"] = np.where(keep, np.float32(0), MIN).astype(np.float32)
        else:
            feeds["keep"] = keep
    return feeds


@pytest.mark.parametrize(
    ("k_layout", "scale", "mask_shape", "kv_heads"),
    [
        ("bshd", "mul", (B, 1, S, S), H),  # BERT/GPT-2 (dynamo)
        ("bhsd", "div", (S, S), H),  # TorchScript-style Div by sqrt(d)
        ("bhsd", "mul", None, H),  # ViT: no mask
        ("bhsd", "mul", (1, 1, S, S), 1),  # one KV head shared by all query heads (MQA)
    ],
)
def test_fuses_sdpa_core(k_layout, scale, mask_shape, kv_heads):
    model = _model(k_layout, scale, mask_shape, kv_heads=kv_heads)
    fused, hits = run_pass(model, FuseAttentionPass)
    assert hits == 1
    assert "Attention" in op_types(roundtrip(fused)) and "Softmax" not in op_types(fused)
    assert_same_outputs(model, fused, feeds=_feeds(model, mask_shape))


@pytest.mark.parametrize("fill", [MIN, -3e38, -1e9, -10000.0])
def test_fully_masked_rows_stay_exact(fill):
    # ORT's Attention zeroes a row whose scores are all float32's lowest; the Softmax spreads
    # it evenly. A fill at or below lowest / 2 goes through Max(mask, lowest / 2) first.
    model = _model(fill=fill)
    fused, hits = run_pass(model, FuseAttentionPass)
    assert hits == 1 and "Softmax" not in op_types(fused)
    assert ("Max" in op_types(fused)) == (fill <= MIN / 2)
    assert_same_outputs(model, fused, feeds=_feeds(model, fill=fill))


@pytest.mark.parametrize(
    ("fill", "why"),
    [
        (None, "a float mask fed by the caller: its values are unknown"),
        (-np.inf, "an all -inf row is NaN in the Softmax, zeros in Attention"),
        ([MIN, -3e38] * (S // 2), "two fills at or below lowest / 2: the Max would merge them"),
    ],
)
def test_refuses_masks_that_could_zero_a_row(fill, why):
    assert run_pass(_model(fill=fill), FuseAttentionPass)[1] == 0, why


def test_refuses_mask_ort_cannot_take():
    # [B, 1, 1, L] padding masks broadcast over queries; ORT's Attention rejects that shape.
    model = _model(mask_shape=(B, 1, 1, S))
    assert run_pass(model, FuseAttentionPass)[1] == 0


def test_refuses_non_constant_scale():
    assert run_pass(_model(scale="input"), FuseAttentionPass)[1] == 0


def test_low_opset_only_notes():
    context = PassContext()
    fused, hits = run_pass(_model(opset=21), FuseAttentionPass, context)
    assert hits == 0 and "Attention" not in op_types(fused)
    assert any("need opset 23" in n for n in context.notes)
