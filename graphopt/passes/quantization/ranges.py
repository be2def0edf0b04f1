"""Activation statistics and the calibration methods that turn them into int8 ranges.

One pass over the calibration batches feeds every observed tensor into a :class:`TensorStats`:
its min and max, a histogram of its magnitudes (positive and negative side apart), optional
per-channel means (bias correction) and the first few samples (``auto`` replays consumers on
them). The histogram streams: it covers ``[0, edge]`` with ``edge`` a power of two, and when
a batch exceeds it the edge doubles and adjacent bins merge pairwise, which is exact, so
memory stays one batch of activations plus a fixed number of bins per tensor and the result
does not depend on batch order beyond the first batch's peak.

The methods, given a tensor's statistics and the number of quantization steps:

- ``minmax``: the observed range;
- ``percentile``: the 99.99th percentile of ``|x|`` (for one-sided u8 ranges, of each side);
- ``entropy``: TensorRT's threshold, the clip whose 128-level requantized histogram is
  closest to the clipped reference in KL divergence;
- ``mse``: the clip that minimises expected squared quantization error on the histogram
  (rounding noise ``step²/12`` inside the range, clipping error outside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.passes.calibration.samples import CalibrationSet

BINS = 2048
PERCENTILE = 99.99
# Entropy calibration requantizes the reference histogram into this many levels (TensorRT).
ENTROPY_LEVELS = 128
# Candidate thresholds an entropy search tries at most (every k-th bin above the levels).
ENTROPY_CANDIDATES = 480
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class TensorStats:
    """Streaming statistics of one activation tensor."""

    lo: float = math.inf
    hi: float = -math.inf
    edge: float = 0.0  # the histograms cover [0, edge]
    counts: np.ndarray = field(default_factory=lambda: np.zeros(2 * BINS, dtype=np.int64))
    channel_axis: int | None = None  # per-channel means along this axis, when asked
    channel_sum: np.ndarray | None = None
    channel_count: int = 0
    samples: np.ndarray | None = None  # the first samples seen (``auto`` replays them)

    @property
    def positive(self) -> np.ndarray:
        return self.counts[:BINS]

    @property
    def negative(self) -> np.ndarray:
        """Counts of ``-x`` for the negative values, on the same bins."""
        return self.counts[BINS:]

    @property
    def magnitude(self) -> np.ndarray:
        return self.positive + self.negative

    @property
    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or not self.channel_count:
            return None
        return self.channel_sum / self.channel_count

    def add(self, array: np.ndarray, keep: int = 0) -> None:
        values = np.asarray(array, dtype=np.float32)
        if keep and self.samples is None:
            self.samples = values[:keep].copy() if values.ndim else values.copy()
        if self.channel_axis is not None and values.ndim > self.channel_axis:
            moved = np.moveaxis(values, self.channel_axis, -1).reshape(
                -1, values.shape[self.channel_axis]
            )
            total = moved.sum(axis=0, dtype=np.float64)
            self.channel_sum = total if self.channel_sum is None else self.channel_sum + total
            self.channel_count += moved.shape[0]
        flat = values.reshape(-1)
        flat = flat[np.isfinite(flat)]
        if not flat.size:
            return
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        peak = max(abs(self.lo), abs(self.hi))
        if peak == 0.0:
            self.counts[0] += flat.size
            return
        if self.edge == 0.0:
            self.edge = 2.0 ** math.ceil(math.log2(peak))
        while peak > self.edge:
            self._widen()
        index = np.minimum((np.abs(flat) * (BINS / self.edge)).astype(np.int64), BINS - 1)
        index += BINS * (flat < 0)
        self.counts += np.bincount(index, minlength=2 * BINS)

    def _widen(self) -> None:
        """Double the edge: bin pairs merge into one (exact), the upper half starts empty."""
        for side in (self.positive, self.negative):
            merged = side.reshape(-1, 2).sum(axis=1)
            side[: BINS // 2] = merged
            side[BINS // 2 :] = 0
        self.edge *= 2.0


@dataclass(frozen=True)
class Range:
    """A calibrated activation range (``lo <= 0 <= hi`` is not required here)."""

    lo: float
    hi: float
    method: str


def one_sided(stats: TensorStats) -> bool:
    """Whether the tensor never goes negative (a Relu output): a u8 range starts at 0."""
    return stats.lo >= 0.0


def calibrate(stats: TensorStats, method: str, activation_type: str) -> Range:
    """The range ``method`` gives for the tensor, for ``activation_type`` (u8 or s8)."""
    if not math.isfinite(stats.lo):
        return Range(0.0, 0.0, method)
    if method == "minmax" or stats.edge == 0.0:
        return Range(stats.lo, stats.hi, method)
    width = stats.edge / BINS
    if activation_type == "u8" and one_sided(stats):
        # The whole [0, 255] grid covers [0, T]: one side, twice the steps.
        top = _threshold(stats.positive, width, method, 255)
        return Range(stats.lo, min(stats.hi, top), method)
    if activation_type == "u8" and method == "percentile":
        # Asymmetric: each side clipped at its own percentile.
        return Range(
            max(stats.lo, -_threshold(stats.negative, width, method, 127)),
            min(stats.hi, _threshold(stats.positive, width, method, 127)),
            method,
        )
    top = _threshold(stats.magnitude, width, method, 127)
    return Range(max(stats.lo, -top), min(stats.hi, top), method)


def _threshold(hist: np.ndarray, width: float, method: str, steps: int) -> float:
    """The clip threshold on a magnitude histogram (bins of ``width`` from 0)."""
    total = int(hist.sum())
    used = int(np.flatnonzero(hist)[-1]) + 1 if total else 0
    if used == 0:
        return 0.0
    if method == "percentile":
        cdf = np.cumsum(hist)
        index = int(np.searchsorted(cdf, total * PERCENTILE / 100.0))
        return (min(index, used - 1) + 1) * width
    if method == "entropy":
        return entropy_threshold(hist[:used]) * width
    if method == "mse":
        return mse_threshold(hist[:used], width, steps)
    raise ValueError(f"unknown calibration method {method!r}")


def entropy_threshold(hist: np.ndarray, levels: int = ENTROPY_LEVELS) -> int:
    """TensorRT's entropy calibration: the bin count ``i`` whose clipped reference ``P`` (the
    tail folded into bin ``i-1``) and its ``levels``-level requantization ``Q`` have the
    smallest KL divergence. Returns ``i`` (the threshold is ``i`` bins)."""
    hist = hist.astype(np.float64)
    used = len(hist)
    if used <= levels:
        return used
    stride = max(1, (used - levels) // ENTROPY_CANDIDATES)
    best, best_div = used, math.inf
    for i in range(levels, used + 1, stride):
        reference = hist[:i].copy()
        reference[i - 1] += hist[i:].sum()
        nonzero = hist[:i] > 0
        bounds = (np.arange(levels) * i) // levels
        chunk_sum = np.add.reduceat(hist[:i], bounds)
        chunk_nonzero = np.add.reduceat(nonzero.astype(np.float64), bounds)
        lengths = np.diff(np.append(bounds, i))
        spread = np.repeat(chunk_sum / np.maximum(chunk_nonzero, 1.0), lengths)
        candidate = np.where(nonzero, spread, 0.0)
        div = _kl(reference, candidate)
        if div < best_div:
            best, best_div = i, div
    return best


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum <= 0 or q_sum <= 0:
        return math.inf
    p, q = p / p_sum, q / q_sum
    keep = p > 0
    if np.any(q[keep] <= 0):
        # A reference bin the candidate cannot represent: smoothed, as TensorRT does.
        q = np.where(keep & (q <= 0), 1e-4 / max(int(keep.sum()), 1), q)
        q = q / q.sum()
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def mse_threshold(hist: np.ndarray, width: float, steps: int) -> float:
    """The threshold ``T`` (a bin edge) minimising the expected squared error of quantizing
    the histogram's values with ``steps`` levels over ``[0, T]`` and clipping above."""
    hist = hist.astype(np.float64)
    centers = (np.arange(len(hist)) + 0.5) * width
    thresholds = (np.arange(len(hist)) + 1) * width
    inside = np.cumsum(hist)  # values at or below each threshold
    # Tail sums above each threshold of h, h·c and h·c², for Σ h (c - T)².
    s0 = inside[-1] - inside
    s1 = (hist * centers).sum() - np.cumsum(hist * centers)
    s2 = (hist * centers**2).sum() - np.cumsum(hist * centers**2)
    clip = s2 - 2 * thresholds * s1 + thresholds**2 * s0
    rounding = inside * (thresholds / steps) ** 2 / 12.0
    error = np.maximum(clip, 0.0) + rounding
    return float(thresholds[int(np.argmin(error))])


def collect(
    model: ir.Model,
    names: list[str],
    calib: CalibrationSet,
    channel_axes: dict[str, int] | None = None,
    keep: int = 0,
) -> dict[str, TensorStats]:
    """Statistics of the named tensors over every calibration batch (one model run each);
    ``channel_axes`` asks for per-channel means, ``keep`` keeps that many first samples."""
    from graphopt.passes.calibration.activations import observe

    channel_axes = channel_axes or {}
    stats = {name: TensorStats(channel_axis=channel_axes.get(name)) for name in names}
    if not names:
        return stats
    for _, values in observe(model, sorted(names), calib):
        for name in names:
            stats[name].add(values[name], keep)
    return stats


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one int8 tensor."""

    scale: float
    zero_point: int
    dtype: str  # "u8" or "s8"

    @property
    def qmin(self) -> int:
        return 0 if self.dtype == "u8" else -128

    @property
    def qmax(self) -> int:
        return 255 if self.dtype == "u8" else 127

    @property
    def numpy_dtype(self) -> type:
        return np.uint8 if self.dtype == "u8" else np.int8


# ONNX Runtime removes a Clip before a QuantizeLinear whose domain lies inside the clip
# range, compared with an absolute epsilon (FLT_EPSILON, its ClipQuantRewrite): a symmetric
# scale below epsilon / 128 makes the domain's negative half look empty, so a ReLU6 went
# and ORT's optimized run read negative values (random-weight MobileNetV2, portable s8:
# cosine 0.55 against 0.9997 unoptimized). A Clip's output keeps its symmetric scale above
# twice that (``min_scale``): a range that small keeps fewer levels instead. Only there:
# elsewhere the floor would only cost levels (random-weight EfficientNet-B0's activations
# are ~1e-15 throughout, and every one of them would round to 0).
SYMMETRIC_MIN_SCALE = 2.0 * float(np.finfo(np.float32).eps) / 128.0


def params_for(
    lo: float, hi: float, dtype: str, symmetric: bool, min_scale: float = 0.0
) -> QuantParams:
    """Scale and zero point covering ``[lo, hi]`` (widened to include 0, as ONNX requires);
    a symmetric scale is at least ``min_scale``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        peak = max(-lo, hi)
        scale = max(peak / 127.0, min_scale) if peak > 0 else 1.0
        return QuantParams(float(np.float32(scale)), 128 if dtype == "u8" else 0, dtype)
    qmin, qmax = (0, 255) if dtype == "u8" else (-128, 127)
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    scale = float(np.float32(scale))
    zero = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return QuantParams(scale, zero, dtype)


def fake_quantize(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """Quantize and dequantize as QuantizeLinear/DequantizeLinear do (round half to even)."""
    scale = np.float32(params.scale)
    q = np.clip(np.rint(values / scale) + params.zero_point, params.qmin, params.qmax)
    return ((q - params.zero_point) * scale).astype(np.float32)
