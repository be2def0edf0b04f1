"""Compensation without training: fix each consumer layer after its input channels went.

For a consumer ``y = W x + b`` whose input lost channels (kept set K), with ``x_o`` its input
in the original model and ``x_p`` its input in the pruned model (K channels), over the
fitting part of the calibration data:

- ``bias`` (FLAP): keep ``W[:, K]`` and move the removed channels' mean contribution into
  the bias, ``b' = b + W μ_o − W[:, K] μ_p``.
- ``lsq``: the ridge-regularized least-squares reconstruction
  ``W' = argmin E‖W x_o − W' x_p‖² + λ‖W' − W[:, K]‖²``, i.e.
  ``W' = (W Cov(x_o, x_p) + λ W[:, K]) (Cov(x_p, x_p) + λI)⁻¹``, and
  ``b' = b + W μ_o − W' μ_p`` (the intercept is fitted exactly, not regularized);
  λ = ``ridge`` × mean variance. Ridge towards the plainly pruned weights (not zero) keeps a
  layer whose calibration rows are few close to the uncompensated solution.

A k×k Conv is fitted on its input patches (im2col, padding included), so the fit is the
exact least-squares solution; past ``MAX_LSQ_FEATURES`` patch features it is fitted kernel
position by kernel position on channel statistics instead. Layers are fitted in
stages in graph order, each stage on activations of the pruned model with the earlier
stages already compensated, so later layers also correct what earlier fits left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.analysis.dependency import DimKey
from graphopt.editing import (
    add_initializer,
    attribute,
    constant_array,
    insert_after,
    replace_value,
    single_user,
    unique_name,
)
from graphopt.passes.pruning.activations import channel_rows, observe, sequence_mask
from graphopt.passes.pruning.consumers import Consumer, tagged_nodes
from graphopt.passes.pruning.samples import CalibrationSet

MAX_STAGES = 8
# Above this many input features the statistics get too big: a k×k Conv falls back to
# per-position channel statistics, any other layer to bias compensation.
MAX_LSQ_CHANNELS = 4096
MAX_LSQ_FEATURES = 4608  # 512 channels × 3×3


@dataclass
class PairStats:
    """Moments of (x_o, x_p) at one consumer, accumulated over batches."""

    count: float = 0.0
    sum_o: np.ndarray | None = None
    sum_p: np.ndarray | None = None
    gram_pp: np.ndarray | None = None
    gram_po: np.ndarray | None = None
    patches: bool = False  # features are a k×k Conv's input patches (C·kh·kw), not channels

    def add(self, rows_o: np.ndarray, rows_p: np.ndarray, second_order: bool) -> None:
        rows_o = rows_o.astype(np.float64, copy=False)
        rows_p = rows_p.astype(np.float64, copy=False)
        if self.sum_o is None:
            self.sum_o, self.sum_p = np.zeros(rows_o.shape[1]), np.zeros(rows_p.shape[1])
            if second_order:
                self.gram_pp = np.zeros((rows_p.shape[1],) * 2)
                self.gram_po = np.zeros((rows_p.shape[1], rows_o.shape[1]))
        self.count += rows_o.shape[0]
        self.sum_o += rows_o.sum(axis=0)
        self.sum_p += rows_p.sum(axis=0)
        if second_order:
            self.gram_pp += rows_p.T @ rows_p
            self.gram_po += rows_p.T @ rows_o


def compensate(
    original: ir.Model,
    pruned: ir.Model,
    consumers: list[Consumer],
    calib: CalibrationSet,
    method: str,
    ridge: float,
    notes: list[str],
    removed: dict[DimKey, np.ndarray],
) -> int:
    """Refit the consumers of ``pruned`` in place; returns how many layers were refitted."""
    if not consumers:
        return 0
    stages = np.array_split(np.arange(len(consumers)), min(MAX_STAGES, len(consumers)))
    in_original = tagged_nodes(original)
    fitted = 0
    for stage in stages:
        batch = [consumers[i] for i in stage]
        in_pruned = tagged_nodes(pruned)
        live = [c for c in batch if c.tag in in_pruned and c.tag in in_original]
        if not live:
            continue
        stats = _pair_stats(original, pruned, live, in_original, in_pruned, calib, method)
        for consumer in live:
            node_o, node_p = in_original[consumer.tag], in_pruned[consumer.tag]
            pair = stats[consumer.tag]
            layer_method = method
            if method == "lsq" and pair.gram_pp is None:
                layer_method = "bias"
                notes.append(
                    f"{node_p.name or consumer.tag}: {len(pair.sum_o)} input channels is too many "
                    "for least squares here; bias compensation used"
                )
            gone = removed.get((consumer.weight_key[0], _out_axis(consumer)), np.zeros(0, int))
            if _refit(pruned, node_o, node_p, consumer, pair, layer_method, ridge, gone):
                fitted += 1
    return fitted


def _pair_stats(original, pruned, consumers, in_original, in_pruned, calib, method):
    names_o = [in_original[c.tag].inputs[0].name for c in consumers]
    names_p = [in_pruned[c.tag].inputs[0].name for c in consumers]
    stats = {c.tag: PairStats() for c in consumers}
    for (feeds, values_o), (_, values_p) in zip(
        observe(original, sorted(set(names_o)), calib),
        observe(pruned, sorted(set(names_p)), calib),
        strict=True,
    ):
        mask = sequence_mask(feeds)
        for consumer, name_o, name_p in zip(consumers, names_o, names_p, strict=True):
            pair = stats[consumer.tag]
            x_o, x_p = values_o[name_o], values_p[name_p]
            node = in_original[consumer.tag]
            if method == "lsq" and _patch_geometry(node, x_o) is not None:
                # Exact least squares for a k×k Conv: regress on its input patches.
                pair.patches = True
                geometry = _patch_geometry(node, x_o)
                pair.add(patch_rows(x_o, *geometry), patch_rows(x_p, *geometry), True)
                continue
            axis = consumer.data_key[1]
            rows_o = channel_rows(x_o, axis, mask)
            rows_p = channel_rows(x_p, axis, mask)
            second = method == "lsq" and rows_o.shape[1] <= MAX_LSQ_CHANNELS
            pair.add(rows_o, rows_p, second)
    return stats


def _patch_geometry(node: ir.Node, x: np.ndarray):
    """(kernel, pads, strides, dilations) of a 2-D k×k Conv whose patches fit the limits."""
    if node.op_type != "Conv" or x.ndim != 4:
        return None
    weight = constant_array(node.inputs[1])
    if weight is None or weight.shape[2] * weight.shape[3] == 1:
        return None
    if weight.shape[1] * weight.shape[2] * weight.shape[3] > MAX_LSQ_FEATURES:
        return None
    if attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    kernel = tuple(weight.shape[2:])
    pads = tuple(attribute(node, "pads", [0, 0, 0, 0]))
    strides = tuple(attribute(node, "strides", [1, 1]))
    dilations = tuple(attribute(node, "dilations", [1, 1]))
    return kernel, pads, strides, dilations


def patch_rows(x: np.ndarray, kernel, pads, strides, dilations) -> np.ndarray:
    """im2col: one row per output position, features ordered (channel, ky, kx) like W."""
    c = x.shape[1]
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = ((kernel[0] - 1) * dilations[0] + 1, (kernel[1] - 1) * dilations[1] + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    # (n, c, oh, ow, kh, kw) → (n, oh, ow, c, kh, kw)
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * kernel[0] * kernel[1])


def _as_positions(consumer: Consumer, weight: np.ndarray) -> np.ndarray:
    """Weight as (positions, out, in) matrices."""
    if consumer.op == "Conv":
        out, cin = weight.shape[:2]
        return weight.reshape(out, cin, -1).transpose(2, 0, 1)
    return (weight if consumer.trans_b else weight.T)[None]


def _from_positions(consumer: Consumer, mats: np.ndarray, like: np.ndarray) -> np.ndarray:
    if consumer.op == "Conv":
        out, cin = mats.shape[1], mats.shape[2]
        return mats.transpose(1, 2, 0).reshape(out, cin, *like.shape[2:])
    return mats[0] if consumer.trans_b else mats[0].T


def _out_axis(consumer: Consumer) -> int:
    if consumer.op == "Conv":
        return 0
    return 0 if consumer.trans_b else 1


def _refit(pruned, node_o, node_p, consumer, pair, method: str, ridge: float, gone) -> bool:
    w_orig = constant_array(node_o.inputs[1])
    w_pruned = constant_array(node_p.inputs[1])
    if w_orig is None or w_pruned is None or pair.count == 0:
        return False
    dtype = w_pruned.dtype
    if pair.patches:  # one matrix over (channel, ky, kx) features
        full = w_orig.astype(np.float64).reshape(w_orig.shape[0], -1)[None]
        kept = w_pruned.astype(np.float64).reshape(w_pruned.shape[0], -1)[None]
    else:
        full = _as_positions(consumer, w_orig.astype(np.float64))
        kept = _as_positions(consumer, w_pruned.astype(np.float64))
    # The layer's own output channels may be pruned too (by another group).
    full = np.delete(full, np.asarray(gone, dtype=np.int64), axis=1)
    mean_o, mean_p = pair.sum_o / pair.count, pair.sum_p / pair.count
    if method == "lsq":
        cov_pp = pair.gram_pp / pair.count - np.outer(mean_p, mean_p)
        cov_po = pair.gram_po / pair.count - np.outer(mean_p, mean_o)
        scale = max(float(np.mean(np.diag(cov_pp))), 1e-12)
        lam = ridge * scale
        system = cov_pp + lam * np.eye(len(cov_pp))
        # argmin ‖x_o W − x_p W'‖² + λ‖W' − W_K‖²: the ridge pulls towards the plainly pruned
        # weights, not towards zero, so few calibration rows cannot drag a layer off.
        rhs = np.einsum("kc,poc->pko", cov_po, full) + lam * kept.transpose(0, 2, 1)
        kept = np.stack([np.linalg.solve(system, r) for r in rhs]).transpose(0, 2, 1)
    shift = (full @ mean_o - kept @ mean_p).sum(axis=0)  # Σ over positions → per output
    refitted = kept[0].reshape(w_pruned.shape) if pair.patches else None
    if refitted is None:
        refitted = _from_positions(consumer, kept, w_pruned)
    _set_weight(pruned, node_p, refitted.astype(dtype))
    _add_to_bias(pruned, node_p, consumer, shift)
    return True


def _set_weight(model: ir.Model, node: ir.Node, array: np.ndarray) -> None:
    base = node.inputs[1].name or "weight"
    node.replace_input_with(1, add_initializer(model.graph, f"{base}_comp", array))


def _add_to_bias(model: ir.Model, node: ir.Node, consumer: Consumer, shift: np.ndarray) -> None:
    """Add ``shift`` (per output channel) to the layer's bias, creating one if needed."""
    if not np.any(shift):
        return
    dtype = constant_array(node.inputs[1]).dtype
    if consumer.op == "Conv":
        _add_to_input(model, node, 2, shift, dtype)
    elif consumer.op == "Gemm":
        alpha, beta = attribute(node, "alpha", 1.0), attribute(node, "beta", 1.0)
        if beta == 0:
            return
        _add_to_input(model, node, 2, shift * alpha / beta, dtype)
    else:
        add = single_user(node.outputs[0])
        if add is not None and add.op_type == "Add":
            other = 1 if add.inputs[0] is node.outputs[0] else 0
            bias = constant_array(add.inputs[other])
            if bias is not None and bias.shape[-1:] == shift.shape and bias.size == shift.size:
                fresh = (bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype)
                name = add.inputs[other].name or "bias"
                add.replace_input_with(other, add_initializer(model.graph, f"{name}_comp", fresh))
                return
        _insert_add(model, node, shift.astype(dtype))


def _add_to_input(model, node: ir.Node, index: int, shift: np.ndarray, dtype) -> None:
    has_input = len(node.inputs) > index and node.inputs[index] is not None
    current = constant_array(node.inputs[index]) if has_input else None
    if has_input and current is None:
        return  # a computed bias: leave it
    if current is None:
        fresh = shift
    else:
        # Broadcast along the last axis (a Gemm C may be [N], [1, N] or a scalar).
        fresh = current.astype(np.float64) + shift.reshape((1,) * max(current.ndim - 1, 0) + (-1,))
    value = add_initializer(model.graph, f"{node.name or 'layer'}_bias_comp", fresh.astype(dtype))
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _insert_add(model: ir.Model, node: ir.Node, shift: np.ndarray) -> None:

    bias = add_initializer(model.graph, f"{node.name or 'matmul'}_bias_comp", shift)
    out = node.outputs[0]
    add = ir.node("Add", [out, bias])
    add.outputs[0].name = unique_name(model.graph, f"{out.name}_comp")
    add.outputs[0].type = out.type
    insert_after(node, [add])
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, add.outputs[0])
    if out.is_graph_output():
        replace_value(out, add.outputs[0])
