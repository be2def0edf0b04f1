"""Data-aware rounding of static INT8 weights (``--int8-weights gptq``).

Round-to-nearest (``rtn``) rounds every weight on its own: each error is small, but they add
up in the layer's output along the directions its inputs actually take. ``gptq`` keeps the
per-channel symmetric scales of ``rtn`` (``max|w| / 127``, the same int8 format and kernels)
and chooses the codes by GPTQ's error feedback (Frantar et al. 2022): input features are
rounded one at a time, largest mean square first, and each one's rounding error is spread over
the features not yet rounded through the inverse of the layer's input Gram matrix
``H = XᵀX``, so that what reaches the output, ``‖X(W − Ŵ)‖²``, is minimized rather than the
weight error. ``H`` comes from the calibration samples the activation ranges are measured on:

* MatMul/Gemm: the input's positions are the rows (padded positions of a masked sequence
  left out);
* Conv (2-D): its input patches (im2col), one Gram matrix per group (a depthwise Conv's
  groups have ``kh·kw`` features each); past ``ROWS_PER_FEATURE`` rows per feature in a batch,
  a seeded random subset of them (picked before the patches are copied).

A weight that is exactly 0 (pruned, e.g. by ``--sparsity``) keeps code 0: the error feedback
never moves it, so a sparsity pattern survives quantization.

Layers it cannot handle (a shared weight, a non-2-D Conv, an input wider than
``MAX_FEATURES``) keep ``rtn``; the record says how many. The Cholesky factor of the
dampened inverse is :mod:`graphopt.passes.quantization.gptq`'s (the int4 path's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import attribute, constant_array
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.gptq import DAMPENING, inverse_cholesky_upper
from graphopt.passes.quantization.qdq import QuantizedWeight, quantize_weight

QMAX = 127
# Patch rows kept per batch, per feature of a Conv group (neighbouring patches overlap).
ROWS_PER_FEATURE = 32
# Widest layer input a Gram matrix is built for (K×K float32).
MAX_FEATURES = 8192
# Features rounded together before their accumulated error reaches the later ones.
BATCH = 128
SEED = 0


@dataclass
class Target:
    """One weight to round: the node reading it and the weight as ``[groups, K, N]``."""

    node: ir.Node
    weight: ir.Value
    axis: int | None  # the per-channel axis of the stored weight (None: one scale)
    groups: int

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.weight.name or "", self.axis)


@dataclass
class Rounded:
    """The data-aware weights of a run, by ``(weight name, axis)``, and what they gained."""

    weights: dict[tuple[str, int | None], QuantizedWeight]
    error_rtn: float = 0.0  # Σ over layers of ‖X(W − Ŵ)‖² / ‖XW‖², round-to-nearest
    error_gptq: float = 0.0  # the same with the data-aware codes
    # Σ over layers of the relative output error ‖X(W − Ŵ)‖ / ‖XW‖ (the square roots): what
    # the note shows. The squared sums read as relative errors overstated the gain (6.76x
    # where the relative errors differ 2.6x).
    relative_rtn: float = 0.0
    relative_gptq: float = 0.0
    skipped: int = 0  # weighted layers left to round-to-nearest

    def note(self) -> str:
        count = len(self.weights)
        if not count:
            return f"int8 weights: gptq found no layer to round ({self.skipped} kept rtn)"
        gptq, rtn = self.relative_gptq, self.relative_rtn
        skipped = f"; {self.skipped} kept rtn" if self.skipped else ""
        if gptq <= 0:
            # Zero error: inputs all 0 on the calibration data; "infx lower" would read as a
            # gain.
            return (
                f"int8 weights: gptq on {count} layers, no output error on calibration data "
                f"for either rounding (their inputs are 0 there){skipped}"
            )
        ratio = rtn / gptq
        return (
            f"int8 weights: gptq on {count} layers, their relative output error ‖ΔY‖/‖Y‖ on "
            f"calibration data {ratio:.2f}x lower than round-to-nearest (mean "
            f"{gptq / count:.2e} vs {rtn / count:.2e}){skipped}"
        )


def targets(
    model: ir.Model, weights: dict[str, tuple[int, int]], per_channel: bool
) -> tuple[list[Target], int]:
    """The placement's weighted nodes (``node -> (input index, axis)``) GPTQ can round, in
    graph order, and how many it cannot."""
    found: list[Target] = []
    skipped = 0
    for node in model.graph:
        if node.name not in weights:
            continue
        index, axis = weights[node.name]
        target = _target(node, index, axis if per_channel else None)
        if target is None:
            skipped += 1
        else:
            found.append(target)
    return found, skipped


def _target(node: ir.Node, index: int, axis: int | None) -> Target | None:
    weight = node.inputs[index] if index < len(node.inputs) else None
    if index != 1 or weight is None or len(weight.uses()) != 1:
        return None
    array = constant_array(weight)
    if array is None:
        return None
    if node.op_type == "Conv":
        padding = attribute(node, "auto_pad", "NOTSET")
        if array.ndim != 4 or padding not in ("NOTSET", "VALID") or axis not in (0, None):
            return None
        groups = int(attribute(node, "group", 1))
        if int(np.prod(array.shape[1:])) > MAX_FEATURES:
            return None
        return Target(node, weight, axis, groups)
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return None
    if array.ndim != 2 or node.op_type not in ("MatMul", "Gemm"):
        return None
    trans = node.op_type == "Gemm" and attribute(node, "transB", 0)
    if axis not in ((0 if trans else 1), None) or array.shape[1 if trans else 0] > MAX_FEATURES:
        return None
    return Target(node, weight, axis, 1)


def as_groups(target: Target, array: np.ndarray) -> np.ndarray:
    """The stored weight as ``[groups, K, N]``: K the features of one group's input rows
    (a Conv's in (channel, ky, kx) order, as im2col lays them out), N its outputs."""
    if target.node.op_type == "Conv":
        out = array.shape[0]
        g = target.groups
        return array.reshape(g, out // g, -1).transpose(0, 2, 1)
    if target.node.op_type == "Gemm" and attribute(target.node, "transB", 0):
        return array.T[None]
    return array[None]


def from_groups(target: Target, grouped: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """:func:`as_groups`' inverse."""
    if target.node.op_type == "Conv":
        return grouped.transpose(0, 2, 1).reshape(shape)
    if target.node.op_type == "Gemm" and attribute(target.node, "transB", 0):
        return grouped[0].T
    return grouped[0]


def input_rows(target: Target, x: np.ndarray, mask, rng: np.random.Generator) -> np.ndarray:
    """The layer's input as ``[rows, groups, K]`` float32."""
    from graphopt.passes.calibration.activations import channel_rows

    node = target.node
    if node.op_type != "Conv":
        return channel_rows(x, x.ndim - 1, mask).astype(np.float32)[:, None, :]
    shape = ir.convenience.get_const_tensor(target.weight).shape
    features = int(np.prod(shape[1:]))
    rows = conv_patches(
        x.astype(np.float32),
        (int(shape[2]), int(shape[3])),
        tuple(attribute(node, "pads", [0, 0, 0, 0])),
        tuple(attribute(node, "strides", [1, 1])),
        tuple(attribute(node, "dilations", [1, 1])),
        max(ROWS_PER_FEATURE * features, 1024),
        rng,
    )
    return rows.reshape(rows.shape[0], target.groups, features)


def conv_patches(
    x: np.ndarray, kernel, pads, strides, dilations, limit: int, rng: np.random.Generator
) -> np.ndarray:
    """Input patches of a 2-D Conv, features in (channel, ky, kx) order like its weight: at
    most ``limit`` output positions, a seeded random subset when there are more, gathered
    from a strided view so that the unpicked patches are never copied."""
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = ((kernel[0] - 1) * dilations[0] + 1, (kernel[1] - 1) * dilations[1] + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    # (n, c, out_y, out_x, ky, kx), still a view
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, channels, height, width = windows.shape[:4]
    total = n * height * width
    picked = np.arange(total)
    if total > limit:
        picked = np.sort(rng.choice(total, limit, replace=False))
    sample, position = np.divmod(picked, height * width)
    y, x_ = np.divmod(position, width)
    # Advanced indices around a slice: the picked positions come first, (rows, c, ky, kx).
    return windows[sample, :, y, x_].reshape(len(picked), channels * kernel[0] * kernel[1])


def gram_matrices(
    model: ir.Model, found: list[Target], calib: CalibrationSet
) -> dict[tuple[str, int | None], np.ndarray]:
    """``XᵀX / rows`` per target and group, ``[groups, K, K]`` float32 (GPTQ's precision,
    half the memory of float64 when every layer's matrix is held at once), over ``calib``."""
    from graphopt.passes.calibration.activations import observe, sequence_mask

    names = sorted({t.node.inputs[0].name for t in found})
    sums: dict[tuple[str, int | None], np.ndarray] = {}
    counts: dict[tuple[str, int | None], int] = {}
    rng = np.random.default_rng(SEED)
    for feeds, values in observe(model, names, calib):
        mask = sequence_mask(feeds)
        for target in found:
            rows = input_rows(target, values[target.node.inputs[0].name], mask, rng)
            # BLAS products on contiguous operands (a strided batch falls to slow loops).
            if target.groups == 1:
                gram = (rows[:, 0].T @ rows[:, 0])[None]
            else:
                grouped = np.ascontiguousarray(rows.transpose(1, 0, 2))
                across = np.ascontiguousarray(grouped.transpose(0, 2, 1))
                gram = across @ grouped
            key = target.key
            sums[key] = gram if key not in sums else sums[key] + gram
            counts[key] = counts.get(key, 0) + rows.shape[0]
    return {key: sums[key] / np.float32(max(counts[key], 1)) for key in sums}


def round_codes(w: np.ndarray, h: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """GPTQ codes in [-127, 127] of ``w`` [G, K, N] with per-column ``scale`` [G, N] for
    inputs whose Gram matrices are ``h`` [G, K, K]; the G groups (a grouped Conv's) are
    independent problems, rounded together."""
    g, k, _ = w.shape
    diagonal = np.diagonal(h, axis1=1, axis2=2).astype(np.float64)
    dead = diagonal <= 0
    # Largest inputs first (act-order): their errors then have the most rows to land on. The
    # scales are per output channel, so any order gives the same format.
    order = np.argsort(-diagonal, axis=1, kind="stable")
    index = np.arange(g)[:, None]
    hessian = np.asarray(h, np.float64)[index[:, :, None], order[:, :, None], order[:, None, :]]
    # A feature that is 0 on every sample decouples; it rounds to nearest.
    hessian[:, np.arange(k), np.arange(k)] += np.where(dead[index, order], 1.0, 0.0)
    mean = np.diagonal(hessian, axis1=1, axis2=2).mean(axis=1)
    hessian[:, np.arange(k), np.arange(k)] += DAMPENING * mean[:, None]
    upper = _upper_factors(hessian)
    work = np.asarray(w, dtype=np.float64)[index, order]
    # Weights that are exactly 0 (pruned: a sparsity pattern, whatever pass made it) keep
    # code 0 whatever error earlier features pushed onto them; the error of holding them
    # there moves on to the later features (SparseGPT's mask). None on a dense weight, whose
    # rounding is then unchanged.
    held = work == 0
    held = held if held.any() else None
    scale = np.asarray(scale, dtype=np.float64)
    codes = np.empty(work.shape, dtype=np.float64)
    for start in range(0, k, BATCH):
        stop = min(start + BATCH, k)
        for i in range(start, stop):
            codes[:, i] = np.clip(np.rint(work[:, i] / scale), -QMAX, QMAX)
            if held is not None:
                codes[:, i][held[:, i]] = 0.0
            # The row's error, scaled by its pivot, moves the rows of this batch now ...
            work[:, i] = (work[:, i] - codes[:, i] * scale) / upper[:, i, i, None]
            work[:, i + 1 : stop] -= upper[:, i, i + 1 : stop, None] * work[:, i, None, :]
        # ... and the later rows once per batch (``work[:, start:stop]`` holds the errors).
        work[:, stop:] -= upper[:, start:stop, stop:].transpose(0, 2, 1) @ work[:, start:stop]
    restored = np.empty_like(codes)
    restored[index, order] = codes
    return restored.astype(np.int8)


def _upper_factors(hessian: np.ndarray) -> np.ndarray:
    """``R`` with ``H⁻¹ = RᵀR`` per group (what the row updates read): one stacked
    factorization for many small Hessians (a depthwise Conv's), the int4 path's
    :func:`~graphopt.passes.quantization.gptq.inverse_cholesky_upper` (more dampening while
    not positive definite) for a single one or when the stacked one fails."""
    if len(hessian) > 1:
        try:
            return np.linalg.cholesky(np.linalg.inv(hessian)).transpose(0, 2, 1)
        except np.linalg.LinAlgError:
            pass
    return np.stack([inverse_cholesky_upper(one) for one in hessian])


def relative_error(w: np.ndarray, approx: np.ndarray, h: np.ndarray) -> float:
    """``‖X(W − Ŵ)‖² / ‖XW‖²`` from ``H = XᵀX``, for ``[groups, K, N]`` weights: the squared
    relative error (its square root is what reports show)."""
    delta = np.asarray(w, np.float64) - approx
    moved = float(np.sum((h @ delta) * delta))
    total = float(np.sum((h @ w) * w))
    return moved / total if total > 0 else 0.0


def round_weights(
    model: ir.Model,
    weights: dict[str, tuple[int, int]],
    calib: CalibrationSet,
    per_channel: bool = True,
) -> Rounded:
    """GPTQ-rounded int8 weights of the placement's weighted nodes (``node -> (input index,
    axis)``), from the Gram matrices of their inputs on ``calib``."""
    found, skipped = targets(model, weights, per_channel)
    result = Rounded({}, skipped=skipped)
    if not found:
        return result
    grams = gram_matrices(model, found, calib)
    for target in found:
        array = np.asarray(constant_array(target.weight), dtype=np.float32)
        nearest = quantize_weight(array, target.axis)
        grouped = as_groups(target, array).astype(np.float64)
        g, _, n = grouped.shape
        scale = np.broadcast_to(nearest.scale, (g * n,)).reshape(g, n)
        h = grams[target.key]
        if not np.isfinite(h).all():
            # Inputs past the float range (the caller refuses such a result): no error
            # feedback through an infinite or NaN matrix, which would make the codes garbage.
            result.skipped += 1
            continue
        codes = round_codes(grouped, h, scale)
        stored = from_groups(target, codes, array.shape)
        rounded = QuantizedWeight(stored, nearest.scale, target.axis)
        squared_rtn = relative_error(grouped, as_groups(target, nearest.dequantized()), h)
        squared_gptq = relative_error(grouped, as_groups(target, rounded.dequantized()), h)
        result.error_rtn += squared_rtn
        result.error_gptq += squared_gptq
        result.relative_rtn += float(np.sqrt(squared_rtn))
        result.relative_gptq += float(np.sqrt(squared_gptq))
        result.weights[target.key] = rounded
    return result
