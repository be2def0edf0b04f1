"""INT4 block rounding of one weight matrix: round-to-nearest with a clipping search, and GPTQ.

A weight ``W[K, N]`` (K input rows, N output columns) is cut into blocks of ``block`` rows
along K; each (block, column) pair has one scale (and, asymmetric, one zero point).

* :func:`block_params` picks each block's scale by a clipping search: the range is shrunk by
  a grid of ratios and the ratio whose rounding error (weighted by how large each input row's
  activations are, when calibration data says so) is lowest wins. Clipping a rare outlier
  costs less than coarsening every other value of the block.
* :func:`rtn` rounds every value to the nearest level of its block.
* :func:`gptq` rounds rows one at a time and spreads each row's rounding error over the rows
  not yet rounded, through the inverse Hessian ``H = XᵀX`` of the layer input (GPTQ, Frantar
  et al. 2022): the error that reaches the output, ``‖X(W − Ŵ)‖²``, is what it minimizes,
  not the error of the weights. Scales are fixed up front from the original weights ("static
  groups"), so that rows may be rounded in any order (act-order: largest activations first)
  and still share contiguous blocks, as MatMulNBits and blockwise DequantizeLinear expect.
  A weight that is exactly 0 (pruned, e.g. by ``--sparsity``) keeps the zero point as its
  code (an exact 0 in either form: the asymmetric range always holds 0), so a sparsity
  pattern survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Shrink ratios of the clipping search (1.0 = the block's full range).
CLIP_RATIOS = np.linspace(1.0, 0.6, 17)
# Elements of a weight the clipping search works on at a time (its temporaries' size).
SEARCH_ELEMENTS = 1 << 22
# GPTQ's dampening: this share of the Hessian's mean diagonal is added to its diagonal.
DAMPENING = 0.01
# Rows updated together before their accumulated error reaches the remaining rows.
GPTQ_BATCH = 128


@dataclass
class Int4Weight:
    """A [K, N] weight as int4 blocks along K.

    ``q``: [K, N] int8, in [-8, 7] (symmetric) or [0, 15] (asymmetric); ``scales``:
    [n_blocks, N] float32; ``zero_points``: [n_blocks, N] uint8 in [0, 15], or None
    (symmetric: the zero point is 0).
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block: int

    @property
    def k(self) -> int:
        return self.q.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[0]

    def dequantize(self) -> np.ndarray:
        """The float weight the quantized one stands for, [K, N] float32."""
        scales = np.repeat(self.scales, self.block, axis=0)[: self.k]
        q = self.q.astype(np.float32)
        if self.zero_points is not None:
            q = q - np.repeat(self.zero_points, self.block, axis=0)[: self.k]
        return q * scales


def levels(asymmetric: bool) -> tuple[int, int]:
    """The int4 code range: [-8, 7] signed, [0, 15] with zero points."""
    return (0, 15) if asymmetric else (-8, 7)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """[K, N] as [n_blocks, block, N], the last block padded with zeros."""
    k, n = w.shape
    n_blocks = -(-k // block)
    padded = np.zeros((n_blocks * block, n), dtype=np.float32)
    padded[:k] = w
    return padded.reshape(n_blocks, block, n)


def block_params(
    w: np.ndarray,
    block: int,
    asymmetric: bool,
    row_weight: np.ndarray | None = None,
    ratios: np.ndarray | None = None,
    signed: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per (block, column) scale [n_blocks, N] and zero point (asymmetric) by clipping search.

    ``row_weight`` [K]: how much an error in each input row costs (the mean squared
    activation of that input channel); None weighs rows alike. ``signed`` (symmetric only)
    also tries negative scales ``extreme / -8``: the block's largest magnitude then lands on
    code -8 whatever its sign, a 16th level the positive ``max|w| / 7`` leaves unused (what
    ONNX Runtime's own quantizer does; fine for its kernels, not for consumers that require
    positive scales). Columns are searched a slice at a time, so that the search's
    temporaries stay small next to a large weight.
    """
    ratios = CLIP_RATIOS if ratios is None else ratios
    k, n = w.shape
    n_blocks = -(-k // block)
    importance = np.ones(n_blocks * block, dtype=np.float32)
    if row_weight is not None:
        importance[:k] = np.asarray(row_weight, dtype=np.float32)
    importance = importance.reshape(n_blocks, block, 1)
    scales = np.empty((n_blocks, n), dtype=np.float32)
    zeros = np.empty((n_blocks, n), dtype=np.uint8) if asymmetric else None
    step = max(1, SEARCH_ELEMENTS // (n_blocks * block))
    for start in range(0, n, step):
        part = _blocks(np.asarray(w[:, start : start + step], dtype=np.float32), block)
        scale, zero = _search(part, importance, asymmetric, ratios, signed)
        scales[:, start : start + step] = scale
        if zeros is not None:
            zeros[:, start : start + step] = zero
    return scales, zeros


def _search(
    blocks: np.ndarray,
    importance: np.ndarray,
    asymmetric: bool,
    ratios: np.ndarray,
    signed: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The clipping search on [n_blocks, block, columns]: (scales, zero points)."""
    low, high = levels(asymmetric)
    shape = (blocks.shape[0], blocks.shape[2])
    best_err = np.full(shape, np.inf, dtype=np.float32)
    best_scale = np.ones(shape, dtype=np.float32)
    best_zero = np.zeros(shape, dtype=np.float32)
    if asymmetric:
        # The range must hold 0 so that zero (padding) stays exact.
        top = np.maximum(blocks.max(axis=1), 0.0)
        bottom = np.minimum(blocks.min(axis=1), 0.0)
    else:
        amax = np.abs(blocks).max(axis=1)
        index = np.abs(blocks).argmax(axis=1)[:, None, :]
        extreme = np.take_along_axis(blocks, index, axis=1)[:, 0]
    forms = ("positive", "signed") if signed and not asymmetric else ("positive",)
    for ratio, form in ((r, f) for r in ratios for f in forms):
        if asymmetric:
            scale = (top - bottom) * ratio / (high - low)
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            zero = np.clip(np.round(-bottom * ratio / scale), low, high)
        else:
            if form == "signed":
                scale = np.where(amax > 0, extreme * ratio / low, 1.0).astype(np.float32)
            else:
                scale = np.where(amax > 0, amax * ratio / high, 1.0).astype(np.float32)
            zero = np.zeros_like(scale)
        codes = np.clip(np.round(blocks / scale[:, None] + zero[:, None]), low, high)
        error = (((codes - zero[:, None]) * scale[:, None] - blocks) ** 2 * importance).sum(1)
        better = error < best_err
        best_err = np.where(better, error, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero.astype(np.uint8)


def _codes(
    w: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, asymmetric: bool
) -> np.ndarray:
    """Nearest codes of rows ``w`` [.., N] under per-row-broadcast ``scales``/``zeros``."""
    low, high = levels(asymmetric)
    zero = 0.0 if zeros is None else zeros.astype(np.float32)
    return np.clip(np.round(w / scales + zero), low, high)


def rtn(
    w: np.ndarray,
    block: int,
    asymmetric: bool = False,
    row_weight: np.ndarray | None = None,
    signed: bool = False,
) -> Int4Weight:
    """Round to nearest, with clipping-searched scales (``signed``: see :func:`block_params`)."""
    scales, zeros = block_params(w, block, asymmetric, row_weight, signed=signed)
    k, n = w.shape
    q = np.empty((k, n), dtype=np.int8)
    step = max(1, SEARCH_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        cols = slice(start, start + step)
        row_scales = np.repeat(scales[:, cols], block, axis=0)[:k]
        row_zeros = None if zeros is None else np.repeat(zeros[:, cols], block, axis=0)[:k]
        part = np.asarray(w[:, cols], dtype=np.float32)
        q[:, cols] = _codes(part, row_scales, row_zeros, asymmetric)
    return Int4Weight(q, scales, zeros, block)


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    block: int,
    asymmetric: bool = False,
    act_order: bool = True,
    dampening: float = DAMPENING,
    signed: bool = False,
) -> Int4Weight:
    """GPTQ rounding of ``w`` [K, N] for inputs whose Gram matrix is ``hessian`` [K, K]
    (``signed``: see :func:`block_params`)."""
    k, n = w.shape
    diagonal = np.diag(hessian).astype(np.float64)
    dead = diagonal <= 0
    # An input that is always 0 carries no information: its rows may round anyhow.
    importance = np.where(dead, 0.0, diagonal)
    scales, zeros = block_params(w, block, asymmetric, importance, signed=signed)
    key = np.where(dead, 1.0, diagonal)
    order = np.argsort(-key, kind="stable") if act_order else np.arange(k)
    h = np.asarray(hessian)[np.ix_(order, order)].astype(np.float64)
    h[dead[order], dead[order]] = 1.0
    # One float32 copy of the weight, rows in the order they are rounded (GPTQ's precision;
    # the Cholesky factor is computed in float64 and then read in float32).
    work = np.asarray(w, dtype=np.float32)[order]
    # Weights that are exactly 0 (pruned: a sparsity pattern, whatever pass made it) stay
    # exactly 0: their codes are the zero point whatever error earlier rows pushed onto them,
    # and the error of holding them there moves on to the later rows (SparseGPT's mask).
    # None on a dense weight, whose rounding is then unchanged.
    held = work == 0
    held = held if held.any() else None
    work[dead[order]] = 0.0
    h[np.diag_indices(k)] += dampening * float(np.mean(np.diag(h)))
    upper = inverse_cholesky_upper(h).astype(np.float32)
    del h
    row_block = order // block
    low, high = levels(asymmetric)
    q = np.zeros((k, n), dtype=np.int8)
    for start in range(0, k, GPTQ_BATCH):
        stop = min(start + GPTQ_BATCH, k)
        # Each batch's rows' scales, gathered per batch: a [K, N] table of them would cost
        # as much as the weight itself.
        row_scales = scales[row_block[start:stop]]
        row_zeros = None if zeros is None else zeros[row_block[start:stop]].astype(np.float32)
        part = work[start:stop].copy()
        errors = np.zeros_like(part)
        inverse = upper[start:stop, start:stop]
        for i in range(stop - start):
            row = part[i]
            zero = 0.0 if row_zeros is None else row_zeros[i]
            scale = row_scales[i]
            code = np.clip(np.round(row / scale + zero), low, high)
            if held is not None:
                code = np.where(held[start + i], zero, code)
            q[start + i] = code
            error = (row - (code - zero) * scale) / inverse[i, i]
            part[i + 1 :] -= np.outer(inverse[i, i + 1 :], error)
            errors[i] = error
        # The batch's error reaches the later rows a slice at a time (small temporaries).
        for rest in range(stop, k, GPTQ_BATCH * 8):
            end = min(rest + GPTQ_BATCH * 8, k)
            work[rest:end] -= upper[start:stop, rest:end].T @ errors
    restored = np.empty_like(q)
    restored[order] = q
    return Int4Weight(restored, scales, zeros, block)


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor ``R`` of ``H⁻¹ = RᵀR`` (what GPTQ's row updates read), with more
    dampening while ``H`` is not positive definite in floating point.

    One factorization, no explicit ``H⁻¹``: with ``J`` the order reversal and
    ``JHJ = LLᵀ``, ``R = J L⁻¹ J`` (``L⁻¹`` is lower triangular, so ``R`` is upper, and
    ``RᵀR = J L⁻ᵀ L⁻¹ J = (JHJ)⁻¹`` conjugated back by ``J`` is ``H⁻¹``). Fewer K×K
    temporaries: for a 5632-wide input each is 250 MB in float64.
    """
    extra = 0.0
    mean_diag = float(np.mean(np.diag(h)))
    reversed_h = h[::-1, ::-1]
    for _ in range(8):
        try:
            if extra:
                reversed_h = reversed_h + extra * mean_diag * np.eye(len(h))
            lower = np.linalg.cholesky(reversed_h)
            return np.linalg.inv(lower)[::-1, ::-1]
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-3)
    raise np.linalg.LinAlgError("GPTQ: the Hessian stays singular after dampening")


def output_error(w: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """``‖X(W − Ŵ)‖²`` from the Gram matrix ``H = XᵀX``: tr(Δᵀ H Δ)."""
    delta = np.asarray(w, np.float64) - np.asarray(approx, np.float64)
    return float(np.einsum("kn,kj,jn->", delta, hessian, delta, optimize=True))


@dataclass
class InputStatistics:
    """What calibration says about each quantized layer's input, by value name.

    ``hessians``: ``XᵀX / rows`` [K, K] float32 (inputs up to ``max_channels`` wide);
    ``energy``: its diagonal, the mean squared activation per input channel (every input);
    ``fallbacks``: inputs too wide for a Hessian.
    """

    hessians: dict[str, np.ndarray]
    energy: dict[str, np.ndarray]
    fallbacks: list[str]


def input_statistics(model, names: list[str], calib, max_channels: int = 8192) -> InputStatistics:
    """Gram matrices of the named activations (last axis = channels) over ``calib``, padded
    positions left out; one ORT run per batch observes them all."""
    from graphopt.passes.calibration.activations import observe

    return accumulate_statistics(observe(model, sorted(set(names)), calib), names, max_channels)


def accumulate_statistics(
    observations, names: list[str], max_channels: int = 8192
) -> InputStatistics:
    """:class:`InputStatistics` of ``names`` from per-batch ``(feeds, {name: activation})``
    pairs (whatever ran the model: one session, or a stage of a streaming observer)."""
    from graphopt.passes.calibration.activations import channel_rows, sequence_mask

    names = sorted(set(names))
    grams: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    rows_seen: dict[str, int] = dict.fromkeys(names, 0)
    for feeds, values in observations:
        mask = sequence_mask(feeds)
        for name in names:
            array = values[name]
            rows = channel_rows(array, array.ndim - 1, mask).astype(np.float32)
            rows_seen[name] += rows.shape[0]
            if rows.shape[1] <= max_channels:
                # float32 Gram matrices (GPTQ's own precision): half the memory of float64,
                # which matters with thousands of channels per layer.
                gram = grams.setdefault(name, np.zeros((rows.shape[1],) * 2, np.float32))
                gram += rows.T @ rows
            squares[name] = squares.get(name, 0.0) + np.einsum(
                "ij,ij->j", rows, rows, dtype=np.float64
            )
    hessians = {k: g / np.float32(max(rows_seen[k], 1)) for k, g in grams.items()}
    energy = {k: s / max(rows_seen[k], 1) for k, s in squares.items()}
    fallbacks = [k for k in names if k not in hessians]
    return InputStatistics(hessians, energy, fallbacks)
