"""Calibration statistics of each layer's input, in the layer's canonical K order.

``H = XᵀX / rows`` (the layer's Hessian, for reconstruction and output errors) and its
diagonal (the mean squared input per reduction feature, Wanda's ``‖X_j‖²`` up to a constant).
A MatMul/Gemm's rows are its input's positions; a 2-D Conv's are its input patches (im2col,
the pruning compensation's :func:`~graphopt.passes.pruning.compensation.patch_rows`),
re-ordered to the canonical (ky, kx, channel) order and, past ``PATCH_ROWS_PER_FEATURE``
rows per feature in a batch, a seeded random subset of them (neighbouring patches overlap:
the subset gives the same statistics at a fraction of the cost). Grouped and non-2-D convs
get no statistics (their layers fall back to magnitude).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from graphopt.editing import attribute
from graphopt.passes.calibration.activations import channel_rows, sequence_mask
from graphopt.passes.sparsity.layers import Layer

# Widest input a Hessian is kept for (GPTQ's own limit); wider layers get energy only.
MAX_HESSIAN_FEATURES = 8192
PATCH_ROWS_PER_FEATURE = 16
SEED = 0


@dataclass
class InputStats:
    gram: np.ndarray | None = None  # Σ x xᵀ (float32), canonical order
    squares: np.ndarray | None = None  # Σ x² (float64)
    rows: int = 0

    @property
    def hessian(self) -> np.ndarray | None:
        return None if self.gram is None else self.gram / np.float32(max(self.rows, 1))

    @property
    def energy(self) -> np.ndarray | None:
        return None if self.squares is None else self.squares / max(self.rows, 1)


def supported(layer: Layer) -> bool:
    """Whether calibration statistics can be gathered for ``layer``."""
    if layer.op != "Conv":
        return True
    return (
        layer.groups == 1
        and len(layer.shape) == 4
        and attribute(layer.node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
    )


def gather(
    observations: Iterable[tuple[dict, dict[str, np.ndarray]]],
    layers: list[Layer],
    want_gram: bool,
) -> dict[int, InputStats]:
    """Per layer (by ``id(layer.node)``), statistics of its input over ``observations``
    (``(feeds, {input name: activation})`` per batch)."""
    stats = {id(layer.node): InputStats() for layer in layers if supported(layer)}
    rng = np.random.default_rng(SEED)
    for feeds, values in observations:
        mask = sequence_mask(feeds)
        for layer in layers:
            if id(layer.node) not in stats:
                continue
            rows = layer_rows(layer, values[layer.node.inputs[0].name], mask, rng)
            entry = stats[id(layer.node)]
            entry.rows += rows.shape[0]
            squares = np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
            entry.squares = squares if entry.squares is None else entry.squares + squares
            if want_gram and rows.shape[1] <= MAX_HESSIAN_FEATURES:
                gram = rows.T @ rows
                entry.gram = gram if entry.gram is None else entry.gram + gram
    return stats


def layer_rows(layer: Layer, x: np.ndarray, mask, rng: np.random.Generator) -> np.ndarray:
    """The layer's input as (rows × canonical features), float32."""
    if layer.op != "Conv":
        return channel_rows(x, x.ndim - 1, mask).astype(np.float32)
    from graphopt.passes.pruning.compensation import patch_rows

    node = layer.node
    kernel = tuple(layer.shape[2:])
    pads = tuple(attribute(node, "pads", [0, 0, 0, 0]))
    strides = tuple(attribute(node, "strides", [1, 1]))
    dilations = tuple(attribute(node, "dilations", [1, 1]))
    rows = patch_rows(x.astype(np.float32), kernel, pads, strides, dilations)
    limit = PATCH_ROWS_PER_FEATURE * rows.shape[1]
    if rows.shape[0] > limit:
        rows = rows[np.sort(rng.choice(rows.shape[0], limit, replace=False))]
    channels, positions = layer.shape[1], kernel[0] * kernel[1]
    # patch_rows orders features (channel, ky, kx); canonical is (ky, kx, channel).
    order = (np.arange(channels)[None, :] * positions + np.arange(positions)[:, None]).ravel()
    return np.ascontiguousarray(rows[:, order])


def relative_output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """``‖X(W − Ŵ)ᵀ‖² / ‖X Wᵀ‖²`` for ``W`` [N, K] from ``H = XᵀX``."""
    w = np.asarray(weight, np.float64)
    delta = w - np.asarray(approx, np.float64)
    h = np.asarray(hessian, np.float64)
    # (ΔH)·Δ summed: two BLAS products, where einsum's contraction path ran 100× slower.
    total = float(np.sum((w @ h) * w))
    moved = float(np.sum((delta @ h) * delta))
    return moved / total if total > 0 else 0.0


def relative_weight_error(weight: np.ndarray, approx: np.ndarray) -> float:
    total = float(np.sum(np.asarray(weight, np.float64) ** 2))
    return float(np.sum((np.asarray(weight, np.float64) - approx) ** 2)) / total if total else 0.0
