"""PyTorch's exported ``scaled_dot_product_attention`` → the attention form the ORT rules fuse.

transformers' default attention (``attn_implementation="sdpa"``) calls
``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask, which the
TorchScript exporter decomposes as::

    scores = (Q·√s) · (Kᵀ·√s) + Where(mask, 0, -inf)
    p      = Softmax(scores)
    p      = Where(IsNaN(p), [0.0], p)        # NaN guard: rows the mask masks entirely
    out    = Reshape(Transpose(p · V, [0, 2, 1, 3]), (B, S, H·Dv))

onnxscript's SDPA rule accepts the split scale and the additive mask, but only a *scalar*
0 in the NaN guard: the exporter's ``[0.0]`` (shape [1]) stops it, and the attention of
RoBERTa, DistilBERT, ALBERT, BART, GPT-2 (with cache), Mistral/LLaMA… was never fused.
Absorbing the guard would not be exact either: ORT's MultiHeadAttention, Attention and
GroupQueryAttention return NaN on a row whose bias is -inf everywhere (ORT 1.32, CPU),
where the model returns 0 (e.g. a batch row whose attention mask is all 0, or left-padded
query rows of a causal decoder).

This pass moves the guard to where the fused op leaves it alone: it drops
``Where(IsNaN(p), 0, p)`` and zeroes the fully masked rows of each merged output instead::

    out' = Where(IsInf(ReduceMax(A, axes=[1, 3]), detect_positive=0)[..., None], 0, out)

with ``A`` the additive mask, (B|1, 1, S|1, T|1). The merge is a Reshape to (B, S, X), or to
(B·S, H·Dv) as GPT-2's Conv1D export writes it (the rows are then expanded and flattened in
the same (b, s) order). When neither mask constant is -inf (the dynamo exporter's
``Where(mask, 0, finfo.min)``), no row can be NaN and the guard just goes.

Why it is exact: for finite scores Q·Kᵀ·s and finite V (a model whose scores overflow
computes garbage either way; the guard would zero such a row, the fused op keeps its NaN),
``A`` being a ``Where`` of two constants each finite or -inf (checked), a score row is -inf
everywhere iff ``A``'s row is, iff its ``ReduceMax`` over the key axis is -inf. Such a row
is NaN after Softmax, zeroed by the guard, and p·V's row is then 0; every other row holds no
NaN and the guard was the identity. Softmax rows are per (b, h, s) and the mask has one head,
so "fully masked" is per (b, s); the head transpose and the merge keep (b, s) as the leading
axes (checked on the inferred shapes), so zeroing row (b, s) of the merged output is zeroing
each head's row (b, ·, s) before it. ``Where`` selects the 0 whatever the other branch
holds, NaN included. With a finite mask (finfo.min) scores of magnitude below ~1e31 keep
every row finite (score + finfo.min does not round to -inf), so the guard never fires.

Nothing else changes here. The split scale √s on Q and on Kᵀ is left to onnxscript's SDPA
rule, which already folds it into one scale s: (Q·√s)·(Kᵀ·√s) and s·(Q·Kᵀ) differ by float
rounding only (bit-equal when √s is a power of two, i.e. head sizes 16, 256…; a few ulps of
the scores otherwise, e.g. head size 64): within the verifier's tolerance, not an exact
identity, and the SDPA rule's doing, as on the eager exports before this pass.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt import editing
from graphopt.passes.fusion.ort._base import (
    OrtFusionPass,
    adopt,
    clean,
    prepare,
    reset_shapes,
    value_shapes,
)
from graphopt.passes.fusion.ort._dims import dims, same_dim
from graphopt.passes.fusion.ort._opset import legalize
from graphopt.registry import register

HEAD_MERGE = (0, 2, 1, 3)
# Softmax's axis defaults to -1 (and means that axis only) from this opset on.
SOFTMAX_AXIS_OPSET = 13
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The default-domain node of ``op_type`` that computes ``value``."""
    node = value.producer() if value is not None else None
    return node if node is not None and editing.is_op(node, op_type) else None


def _is_zero(value: ir.Value | None, rank: int) -> bool:
    """A constant 0 of one element whose shape broadcasts into rank ``rank`` unchanged."""
    array = editing.constant_array(value, max_bytes=64)
    return array is not None and array.size == 1 and array.ndim <= rank and array.item() == 0


def _finite_or_minus_inf(value: ir.Value | None) -> bool:
    """A small float constant whose elements are all finite or -inf (no NaN, no +inf)."""
    array = editing.constant_array(value, max_bytes=1 << 16)
    if array is None or array.dtype.kind != "f":
        return False
    return not (np.isnan(array).any() or np.isposinf(array).any())


def _softmax_last_axis(node: ir.Node, rank: int, opset: int) -> bool:
    """Softmax over the last axis only (before opset 13 the default axis is 1, and the op
    flattens from its axis on: the same thing only for the last axis)."""
    axis = node.attributes.get_int("axis", -1 if opset >= SOFTMAX_AXIS_OPSET else 1)
    return axis in (-1, rank - 1)


def _is_scores(value: ir.Value | None) -> bool:
    """Q·Kᵀ, optionally scaled by a constant: finite for finite Q and K (no -inf of its own)."""
    node = value.producer() if value is not None else None
    if node is not None and editing.is_op(node, ("Mul", "Div")):
        if not editing.is_constant(node.inputs[1]):
            return False
        node = _producer(node.inputs[0], "MatMul")
    return node is not None and editing.is_op(node, "MatMul")


class _Site:
    """One NaN-guarded attention, matched: what the rewrite needs."""

    def __init__(
        self,
        guard: ir.Node,
        mask: ir.Value,
        heads: ir.Value | None,
        merges: list[tuple[ir.Node, bool]],
    ) -> None:
        self.guard, self.mask = guard, mask
        self.heads = heads  # (B, S, H, Dv), the transposed p·V (None: no rows to zero)
        self.merges = merges  # each Reshape of ``heads`` that is read, flattened to (B·S, ·)?


def _merge_kind(reshape: ir.Node, heads: tuple) -> bool | None:
    """How ``reshape`` merges (B, S, H, Dv): False for (B, S, X), True for (B·S, H·Dv),
    None when neither is proven on the inferred shapes."""
    after = dims(reshape.outputs[0])
    if after is None or reshape.outputs[0].is_graph_output():
        return None
    if len(after) == 3 and same_dim(heads[0], after[0]) and same_dim(heads[1], after[1]):
        return False
    # (X, H·Dv) with H·Dv static: by element count X = B·S, rows in (b, s) row-major order.
    static = all(isinstance(d, int) for d in (*heads[2:], after[-1]))
    if len(after) == 2 and static and after[1] == heads[2] * heads[3]:
        return True
    return None


def _match(guard: ir.Node, opset: int) -> _Site | None:
    """``guard`` = Where(IsNaN(p), 0, p) of the decomposed SDPA; None unless every condition
    the module docstring names holds."""
    if not editing.is_op(guard, "Where") or len(guard.inputs) != 3:
        return None
    condition, zero, weights = guard.inputs
    is_nan = _producer(condition, "IsNaN")
    softmax = _producer(weights, "Softmax")
    if is_nan is None or softmax is None or is_nan.inputs[0] is not weights:
        return None
    shape = dims(weights)
    if shape is None or len(shape) != 4 or weights.dtype not in FLOAT_TYPES:
        return None
    if not _is_zero(zero, 4) or not _softmax_last_axis(softmax, 4, opset):
        return None
    # Scores + mask (either order); the mask is the operand that is not the Q·Kᵀ MatMul.
    add = _producer(softmax.inputs[0], "Add")
    if add is None:
        return None
    first, second = add.inputs
    mask = second if _is_scores(first) else first
    if not _is_scores(second if mask is first else first):
        return None
    where = _producer(mask, "Where")
    if where is None or not all(map(_finite_or_minus_inf, where.inputs[1:])):
        return None
    if not any(np.isneginf(editing.constant_array(v)).any() for v in where.inputs[1:]):
        # A finite mask (the dynamo exporter's finfo.min): finite scores, no NaN, the
        # guard is the identity and simply goes.
        return _Site(guard, mask, None, [])
    mask_dims = dims(mask)
    # One head (index 1) so that "row fully masked" is a (b, s) property.
    if mask_dims is None or len(mask_dims) != 4 or mask_dims[1] != 1:
        return None
    # p·V → Transpose (B, S, H, Dv) → Reshapes that merge the heads (or only Shape users).
    matmul = editing.single_user(guard.outputs[0])
    if matmul is None or not editing.is_op(matmul, "MatMul"):
        return None
    if matmul.inputs[0] is not guard.outputs[0]:
        return None
    transpose = editing.single_user(matmul.outputs[0])
    if transpose is None or not editing.is_op(transpose, "Transpose"):
        return None
    if tuple(transpose.attributes.get_ints("perm", ())) != HEAD_MERGE:
        return None
    heads = transpose.outputs[0]
    found = dims(heads)
    if found is None or len(found) != 4 or heads.is_graph_output():
        return None
    merges = []
    for user in {use.node for use in heads.uses()}:
        if not editing.is_op(user, "Reshape") or user.inputs[0] is not heads:
            return None
        # A Reshape only Shape ops read: its values are never used, nothing to zero.
        if all(editing.is_op(use.node, "Shape") for use in user.outputs[0].uses()):
            continue
        flat = _merge_kind(user, found)
        if flat is None:
            return None
        merges.append((user, flat))
    return _Site(guard, mask, heads, merges) if merges else None


def _rewrite(site: _Site, constants: dict[str, ir.Value]) -> None:
    """Drop the guard; zero the fully masked (b, s) rows of each merged output."""
    graph = editing.owning_graph(site.guard)
    ir.convenience.replace_all_uses_with(site.guard.outputs[0], site.guard.inputs[2])
    if site.heads is None:
        return

    def constant(name: str, array: np.ndarray) -> ir.Value:
        key = f"{name}_{array.dtype}_{array.tolist()}"
        if key not in constants:
            constants[key] = editing.add_initializer(graph, name, array)
        return constants[key]

    int64 = partial(np.array, dtype=np.int64)
    # max over the head (size 1) and key axes: -inf exactly where every key is masked.
    row_max = ir.node("ReduceMax", [site.mask, constant("sdpa_axes", int64([1, 3]))])
    row_max.attributes["keepdims"] = ir.AttrInt64("keepdims", 0)
    masked = ir.node("IsInf", row_max.outputs)
    masked.attributes["detect_positive"] = ir.AttrInt64("detect_positive", 0)
    # (B|1, S|1, 1): broadcasts over (B, S, X).
    rows = ir.node("Unsqueeze", [masked.outputs[0], constant("sdpa_axis", int64([2]))])
    nodes = [row_max, masked, rows]
    flat_rows = None
    if any(flat for _, flat in site.merges):
        # (B·S, 1): the rows expanded to (B, S, 1), then flattened in (b, s) order.
        lead = ir.node("Shape", [site.heads], attributes={"start": 0, "end": 2})
        target = ir.node("Concat", [lead.outputs[0], constant("sdpa_one", int64([1]))])
        target.attributes["axis"] = ir.AttrInt64("axis", 0)
        full = ir.node("Expand", [rows.outputs[0], target.outputs[0]])
        flat_rows = ir.node("Reshape", [full.outputs[0], constant("sdpa_flat", int64([-1, 1]))])
        nodes += [lead, target, full, flat_rows]
    editing.insert_after(site.heads.producer(), nodes)
    for reshape, flat in site.merges:
        output = reshape.outputs[0]
        users = list(output.uses())  # before the new Where becomes one of them
        zero = constant("sdpa_zero", np.array(0, output.dtype.numpy()))
        condition = (flat_rows if flat else rows).outputs[0]
        zeroed = ir.node("Where", [condition, zero, output])
        zeroed.outputs[0].dtype = output.dtype
        zeroed.outputs[0].shape = output.shape
        editing.insert_after(reshape, [zeroed])
        for user, index in users:
            user.replace_input_with(index, zeroed.outputs[0])


def canonicalize(model: ir.Model) -> int:
    """Rewrite every matched NaN-guarded SDPA of the main graph; returns how many."""
    opset = editing.opset_version(model)
    sites = [site for node in list(model.graph) if (site := _match(node, opset)) is not None]
    constants: dict[str, ir.Value] = {}
    for site in sites:
        _rewrite(site, constants)
    return len(sites)


@register
class OrtSdpaFormsPass(OrtFusionPass):
    """With --target ort: exported SDPA's NaN guard → a row zeroing the fused attention keeps."""

    name = "ort-sdpa-forms"
    # The exporter's NaN guard of scaled_dot_product_attention.
    ops = frozenset(("IsNaN",))

    def rewrite(self, model: ir.Model) -> int:
        if not any(editing.is_op(node, "IsNaN") for node in model.graph):
            return 0
        # Shapes prove the head-merge Reshape keeps (B, S). The pipeline's cleanup has
        # folded the exporter's shape arithmetic, so ONNX's inference on a copy usually
        # shows it; failing that, the fusions' own preparation with ONNX's shapes, then with
        # ORT's symbolic ones (dropped afterwards, as the fusions do: see ``prepare``).
        onnx_shapes: dict[str, ir.Shape | None] = {}
        for attempt in ("plain", "onnx", "symbolic"):
            if attempt == "plain":
                work = model.clone()
                common_passes.ShapeInferencePass()(work)
            else:
                work = prepare(model.clone(), self.context, attempt == "symbolic")
            if attempt != "symbolic":
                onnx_shapes = value_shapes(work)
            hits = canonicalize(work)
            if not hits:
                continue
            clean(work, self.context)
            # ReduceMax/Unsqueeze are written with axes inputs: respell for older opsets.
            if not legalize(work):
                return 0
            if attempt == "symbolic":
                reset_shapes(work, onnx_shapes)
            adopt(model, work)
            return hits
        return 0
