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
position by kernel position on channel statistics instead. Layers are fitted in stages in
graph order, each stage on activations of the pruned model with the earlier stages already
compensated, so later layers also correct what earlier fits left; a stage never holds a
layer together with one it reads from (see ``_stages``). Both models are observed stage by
stage (:mod:`.incremental`): each stage runs only the nodes it adds.

With validation samples, each layer keeps whichever of plain pruning, bias compensation or
least squares at one of ``RIDGE_STEPS`` ridge strengths brings its output closest to the
original layer's on the validation rows; so a layer whose fit does not carry over to new
rows (too few rows for its features, as a classifier after global pooling has) stays as it
would have been without the refit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
from graphopt.passes.calibration.activations import channel_rows, sequence_mask
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.pruning.consumers import Consumer, tagged_nodes
from graphopt.passes.pruning.incremental import IncrementalObserver

# The pruned model runs once per stage (up to the stage's layers); see ``_stages``.
MAX_STAGES = 64
# Above this many input features the statistics get too big: a k×k Conv falls back to
# per-position channel statistics, any other layer to bias compensation.
MAX_LSQ_CHANNELS = 4096
MAX_LSQ_FEATURES = 4608  # 512 channels × 3×3
# Ridge strengths tried per layer, times ``ridge``, when validation rows can choose: the
# right strength depends on how many independent rows a layer has against its feature
# count (a classifier fed by global pooling has one row per sample), which one constant
# cannot fit both ways.
RIDGE_STEPS = (1 / 64, 1 / 16, 1 / 4, 1.0, 4.0, 16.0)
# Past this many features a solve costs seconds: fewer, wider-spaced strengths.
WIDE_FEATURES = 2048
WIDE_RIDGE_STEPS = (1 / 16, 1.0, 16.0)
# A k×k Conv early in a CNN has ~100 patch rows per feature: past this many, a seeded random
# subset of the rows gives the same fit at a fraction of the cost (neighbouring patches
# overlap, so the rows are far from independent anyway).
PATCH_ROWS_PER_FEATURE = 32


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
    validation: CalibrationSet | None = None,
) -> int:
    """Refit the consumers of ``pruned`` in place; returns how many layers were refitted.

    With ``validation`` samples, each layer keeps the candidate (plainly pruned, bias
    compensation, least squares at one of ``RIDGE_STEPS``) whose output is closest to the
    original layer's on the validation rows: a refit that does not generalise is not kept.
    """
    if not consumers:
        return 0
    in_original = tagged_nodes(original)
    stages = _stages(original, consumers, in_original)
    steps = RIDGE_STEPS if validation is not None else (1.0,)
    # Fitting and validation batches go through each model together, one stage at a time.
    batches = list(calib.batches()) + (list(validation.batches()) if validation else [])
    fit_batches = len(list(calib.batches()))
    observe_o = IncrementalObserver(original, batches, calib.source)
    observe_p = IncrementalObserver(pruned, batches, calib.source)
    fitted = tied = 0
    chosen: dict[str, int] = {}
    for number, stage in enumerate(stages):
        batch = [consumers[i] for i in stage]
        in_pruned = tagged_nodes(pruned)
        # Layers of this and later stages get new weights yet: observed, never kept.
        pending = {
            id(in_pruned[consumers[i].tag])
            for later in stages[number:]
            for i in later
            if consumers[i].tag in in_pruned
        }
        live = [c for c in batch if c.tag in in_pruned and c.tag in in_original]
        # A weight read by several layers stays one tensor: a refit for one layer would
        # untie it (a copy per layer, more parameters than before).
        shared = [c for c in live if _reads_shared(in_pruned[c.tag])]
        tied += len(shared)
        live = [c for c in live if c not in shared]
        if not live:
            continue
        names_o = [in_original[c.tag].inputs[0].name for c in live]
        names_p = [in_pruned[c.tag].inputs[0].name for c in live]
        observed = (
            (feeds, values_o, values_p)
            for (feeds, values_o), (_, values_p) in zip(
                observe_o.advance(sorted(set(names_o))),
                observe_p.advance(sorted(set(names_p)), pending),
                strict=True,
            )
        )
        held: list[tuple] = []
        stats = _pair_stats(
            live, in_original, names_o, names_p, observed, fit_batches, held, calib.count, method
        )
        plans: list[_Plan] = []
        for consumer in live:
            pair = stats.pop(consumer.tag)
            layer_method = method
            if method == "lsq" and pair.gram_pp is None:
                layer_method = "bias"
                notes.append(
                    f"{in_pruned[consumer.tag].name or consumer.tag}: {len(pair.sum_o)} input "
                    "channels is too many for least squares here; bias compensation used"
                )
            gone = removed.get((consumer.weight_key[0], _out_axis(consumer)), np.zeros(0, int))
            plan = _plan(in_original[consumer.tag], in_pruned[consumer.tag], consumer, pair, gone)
            if plan is not None:
                wide = steps is RIDGE_STEPS and plan.kept.shape[2] > WIDE_FEATURES
                ridges = [ridge * s for s in (WIDE_RIDGE_STEPS if wide else steps)]
                plan.candidates = _candidates(plan.full, plan.kept, pair, layer_method, ridges)
                plans.append(plan)
        if validation is not None:
            _score(plans, names_o, names_p, live, held)
        for plan in plans:
            label = _apply(pruned, plan)
            chosen[label] = chosen.get(label, 0) + 1
            fitted += label != "plain"
    if tied:
        notes.append(
            f"{tied} layer(s) whose weight other layers share were not refitted "
            "(a refit would untie the shared weight)"
        )
    if validation is not None and chosen:
        picked = ", ".join(f"{k} {v}" for k, v in sorted(chosen.items()))
        notes.insert(0, f"{method}: per layer, closest on the validation rows: {picked}")
    return fitted


def _stages(
    model: ir.Model, consumers: list[Consumer], nodes: dict[str, ir.Node]
) -> list[list[int]]:
    """Consumers (indices, graph order) in stages where no layer reads another's output.

    A layer is fitted on its input in the pruned model as it is when its stage starts; a
    refit upstream in the same stage would change that input afterwards and the fit would
    correct an error that is no longer there. Independent layers (the branches reading one
    tensor, Q/K/V) share a stage. Past ``MAX_STAGES`` neighbouring stages are merged.
    """
    bit = {id(nodes[c.tag]): 1 << i for i, c in enumerate(consumers) if c.tag in nodes}
    upstream: dict[int, int] = {}  # id(value) -> mask of the consumers it depends on
    reads: dict[int, int] = {}  # id(consumer node) -> mask of the consumers upstream of it
    for node in model.graph:
        mask = 0
        for value in node.inputs:
            if value is not None:
                mask |= upstream.get(id(value), 0)
        reads[id(node)] = mask
        mask |= bit.get(id(node), 0)
        for value in node.outputs:
            upstream[id(value)] = mask
    stages: list[list[int]] = []
    current = 0
    for i, consumer in enumerate(consumers):
        node = nodes.get(consumer.tag)
        depends = reads.get(id(node), 0) if node is not None else 0
        if not stages or depends & current:
            stages.append([])
            current = 0
        stages[-1].append(i)
        current |= 1 << i
    if len(stages) > MAX_STAGES:
        # Too many to run the model once per stage: merge runs of neighbouring stages.
        cuts = np.array_split(np.arange(len(stages)), MAX_STAGES)
        stages = [[i for s in cut for i in stages[s]] for cut in cuts]
    return stages


def _pair_stats(
    consumers, in_original, names_o, names_p, observed, fit_batches, held, count, method
):
    """Moments of each consumer's (original, pruned) inputs over the first ``fit_batches``
    batches of ``observed``; the later (validation) batches' inputs go to ``held``."""
    stats = {c.tag: PairStats() for c in consumers}
    for index, (feeds, values_o, values_p) in enumerate(observed):
        if index >= fit_batches:
            held.append((feeds, values_o, values_p))
            continue
        mask = sequence_mask(feeds)
        for consumer, name_o, name_p in zip(consumers, names_o, names_p, strict=True):
            pair = stats[consumer.tag]
            x_o, x_p = values_o[name_o], values_p[name_p]
            node = in_original[consumer.tag]
            if method == "lsq" and _patch_geometry(node, x_o) is not None:
                # Exact least squares for a k×k Conv: regress on its input patches.
                pair.patches = True
                geometry = _patch_geometry(node, x_o)
                rows_o, rows_p = patch_rows(x_o, *geometry), patch_rows(x_p, *geometry)
                share = PATCH_ROWS_PER_FEATURE * rows_o.shape[1] * len(x_o) / count
                if len(rows_o) > share:
                    keep = np.random.default_rng(index).choice(len(rows_o), int(share), False)
                    rows_o, rows_p = rows_o[np.sort(keep)], rows_p[np.sort(keep)]
                pair.add(rows_o, rows_p, True)
                continue
            axis = consumer.data_key[1]
            rows_o = channel_rows(x_o, axis, mask)
            rows_p = channel_rows(x_p, axis, mask)
            second = method == "lsq" and rows_o.shape[1] <= MAX_LSQ_CHANNELS
            pair.add(rows_o, rows_p, second)
    return stats


def _patch_geometry(node: ir.Node, x: np.ndarray, limit: int | None = MAX_LSQ_FEATURES):
    """(kernel, pads, strides, dilations) of a 2-D k×k Conv with at most ``limit`` patch
    features (``None``: any)."""
    if node.op_type != "Conv" or x.ndim != 4:
        return None
    weight = constant_array(node.inputs[1])
    if weight is None or weight.shape[2] * weight.shape[3] == 1:
        return None
    if limit is not None and weight.shape[1] * weight.shape[2] * weight.shape[3] > limit:
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


@dataclass
class _Plan:
    """One layer's refit: its weights by kernel position and the candidates to pick from."""

    consumer: Consumer
    node_o: ir.Node
    node_p: ir.Node
    full: np.ndarray  # (positions, out, in_o): the original weights, own removed outputs gone
    kept: np.ndarray  # (positions, out, in_p): the plainly pruned weights
    patches: bool
    candidates: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    errors: np.ndarray | None = None  # Σ squared error per candidate on validation rows


def _plan(node_o, node_p, consumer: Consumer, pair: PairStats, gone) -> _Plan | None:
    w_orig = constant_array(node_o.inputs[1])
    w_pruned = constant_array(node_p.inputs[1])
    if w_orig is None or w_pruned is None or pair.count == 0:
        return None
    if pair.patches:  # one matrix over (channel, ky, kx) features
        full = w_orig.astype(np.float64).reshape(w_orig.shape[0], -1)[None]
        kept = w_pruned.astype(np.float64).reshape(w_pruned.shape[0], -1)[None]
    else:
        full = _as_positions(consumer, w_orig.astype(np.float64))
        kept = _as_positions(consumer, w_pruned.astype(np.float64))
    # The layer's own output channels may be pruned too (by another group).
    full = np.delete(full, np.asarray(gone, dtype=np.int64), axis=1)
    return _Plan(consumer, node_o, node_p, full, kept, pair.patches)


def _candidates(full, kept, pair: PairStats, method: str, ridges: list[float]):
    """(label, weight matrices by position, bias shift) per candidate; the asked one last.

    ``lsq`` at ridge λ (relative to the mean input variance) solves
    ``W'ᵀ = (Cov_pp + λI)⁻¹ (Cov_po Wᵀ + λ W_Kᵀ)`` for every kernel position at once.
    """
    mean_o, mean_p = pair.sum_o / pair.count, pair.sum_p / pair.count

    def shifted(label: str, mats: np.ndarray):
        # The intercept is fitted exactly: b' = b + W μ_o − W' μ_p (Σ over positions).
        return label, mats, (full @ mean_o - mats @ mean_p).sum(axis=0)

    found = [("plain", kept, np.zeros(full.shape[1])), shifted("bias", kept)]
    if method != "lsq" or pair.gram_pp is None:
        return found
    cov_pp = pair.gram_pp / pair.count - np.outer(mean_p, mean_p)
    cov_po = pair.gram_po / pair.count - np.outer(mean_p, mean_o)
    scale = max(float(np.mean(np.diag(cov_pp))), 1e-12)
    positions, out, width = kept.shape
    # Right-hand sides of every position side by side: one factorisation per ridge.
    target = np.concatenate([cov_po @ f.T for f in full], axis=1)
    start = kept.transpose(2, 0, 1).reshape(width, positions * out)
    for ridge in ridges:
        lam = ridge * scale
        # argmin ‖x_o W − x_p W'‖² + λ‖W' − W_K‖²: the ridge pulls towards the plainly pruned
        # weights, not towards zero, so few calibration rows cannot drag a layer far off.
        solved = np.linalg.solve(cov_pp + lam * np.eye(width), target + lam * start)
        mats = solved.reshape(width, positions, out).transpose(1, 2, 0)
        found.append(shifted(f"lsq {ridge:g}", mats))
    return found


def _score(plans: list[_Plan], names_o, names_p, live: list[Consumer], held) -> None:
    """Each candidate's squared error against the original layer output, on the validation
    rows (a k×k Conv on its exact input patches, whatever its size)."""
    inputs = {c.tag: (o, p) for c, o, p in zip(live, names_o, names_p, strict=True)}
    for feeds, values_o, values_p in held:
        mask = sequence_mask(feeds)
        for plan in plans:
            name_o, name_p = inputs[plan.consumer.tag]
            x_o, x_p = values_o[name_o], values_p[name_p]
            geometry = _patch_geometry(plan.node_o, x_o, None)
            if geometry is not None:
                rows_o, rows_p = patch_rows(x_o, *geometry), patch_rows(x_p, *geometry)
            elif plan.full.shape[0] == 1:
                axis = plan.consumer.data_key[1]
                rows_o, rows_p = channel_rows(x_o, axis, mask), channel_rows(x_p, axis, mask)
            else:  # a k×k Conv with auto_pad: no exact rows to judge on
                continue
            target = rows_o @ _flat(plan, plan.full).T
            errors = []
            for _, mats, shift in plan.candidates:
                residual = target - rows_p @ _flat(plan, mats).T - shift
                errors.append(float(np.einsum("ij,ij->", residual, residual)))
            plan.errors = np.asarray(errors) + (0.0 if plan.errors is None else plan.errors)


def _flat(plan: _Plan, mats: np.ndarray) -> np.ndarray:
    """Position matrices as one (out, features) matrix in the layout of the rows judged."""
    if plan.full.shape[0] == 1 and (plan.patches or plan.consumer.op != "Conv"):
        return mats[0]
    # Per-position matrices of a Conv: back to (out, in, kh, kw) → (out, in·kh·kw).
    like = constant_array(plan.node_o.inputs[1])
    return mats.transpose(1, 2, 0).reshape(mats.shape[1], -1) if like.ndim == 4 else mats[0]


def _apply(pruned, plan: _Plan) -> str:
    """Put the chosen candidate in place; returns its label ("plain": nothing changed)."""
    if plan.errors is not None:
        label, mats, shift = plan.candidates[int(np.argmin(plan.errors))]
    else:  # no validation rows: the asked method at the asked ridge
        label, mats, shift = plan.candidates[-1]
    if label == "plain":
        return label
    w_pruned = constant_array(plan.node_p.inputs[1])
    if plan.patches:
        refitted = mats[0].reshape(w_pruned.shape)
    else:
        refitted = _from_positions(plan.consumer, mats, w_pruned)
    _set_weight(pruned, plan.node_p, refitted.astype(w_pruned.dtype))
    _add_to_bias(pruned, plan.node_p, plan.consumer, shift)
    return label


def _reads_shared(node: ir.Node) -> bool:
    """Whether the layer's weight is also read by another node (a tied weight)."""
    return len({id(u.node) for u in node.inputs[1].uses()}) > 1


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
