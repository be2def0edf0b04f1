"""Pack MatMul weights into the layouts graphopt's sparse kernels read (see LAYOUTS.md).

Every packer takes the weight as MatMul's B, logical ``[K, N]`` (a Gemm with ``transB=1``
stores ``[N, K]``: transpose it first). All are plain numpy, deterministic, and have an
``unpack_*`` inverse that returns the dense ``[K, N]`` weight (the tests' round trips).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BsrPacked:
    """fp32 block-sparse rows over outputs (the ``SparseMatMul`` op's inputs)."""

    values: np.ndarray  # float32 [nnzb, R, C]
    col_idx: np.ndarray  # int32 [nnzb]
    row_ptr: np.ndarray  # int32 [ceil(N/R) + 1]
    K: int
    N: int
    R: int
    C: int

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class Packed24:
    """fp32 2:4 along K (the ``SparseMatMul24`` op's inputs)."""

    values: np.ndarray  # float32 [N, K/2]
    indices: np.ndarray  # uint8 [N, ceil(K/8)]
    K: int
    N: int


@dataclass(frozen=True)
class BsrS8Packed:
    """int8 block-sparse rows with symmetric scales (the ``SparseQMatMul`` op's inputs)."""

    values: np.ndarray  # int8 [nnzb, R, C]
    col_idx: np.ndarray  # int32 [nnzb]
    row_ptr: np.ndarray  # int32 [ceil(N/R) + 1]
    w_scale: np.ndarray  # float32 [1] or [N]
    w_rowsum: np.ndarray  # int32 [N]: sum_k W[k, n]
    K: int
    N: int
    R: int
    C: int

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])


def _matrix(w: np.ndarray, dtype: type) -> np.ndarray:
    array = np.asarray(w)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D weight [K, N], got shape {array.shape}")
    return array.astype(dtype, copy=False)


def _check_block(R: int, C: int) -> None:
    if int(R) < 1 or int(C) < 1:
        raise ValueError(f"block shape must be at least 1x1, got {R}x{C}")


def _blocks(w_kn: np.ndarray, R: int, C: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [nnzb, R, C], col_idx, row_ptr) of the blocks of ``w_kn`` holding a non-zero."""
    K, N = w_kn.shape
    rows, cols = -(-N // R), -(-K // C)
    padded = np.zeros((rows * R, cols * C), dtype=w_kn.dtype)
    padded[:N, :K] = w_kn.T  # over outputs: block row i = outputs [i*R, i*R+R)
    blocks = padded.reshape(rows, R, cols, C).transpose(0, 2, 1, 3)  # [rows, cols, R, C]
    keep = (blocks != 0).any(axis=(2, 3))
    block_row, block_col = np.nonzero(keep)  # row-major: col_idx increases within a row
    values = np.ascontiguousarray(blocks[block_row, block_col])
    row_ptr = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=row_ptr[1:])
    return values, block_col.astype(np.int32), row_ptr


def pack_bsr(w_kn: np.ndarray, R: int, C: int) -> BsrPacked:
    """BSR over output rows with R x C blocks; all-zero blocks are dropped, padding is zero."""
    _check_block(R, C)
    w = _matrix(w_kn, np.float32)
    values, col_idx, row_ptr = _blocks(w, int(R), int(C))
    return BsrPacked(values, col_idx, row_ptr, int(w.shape[0]), int(w.shape[1]), int(R), int(C))


def unpack_bsr(packed: BsrPacked | BsrS8Packed) -> np.ndarray:
    """The dense ``[K, N]`` weight of a BSR packing (int8 for :class:`BsrS8Packed`)."""
    R, C, K, N = packed.R, packed.C, packed.K, packed.N
    rows, cols = -(-N // R), -(-K // C)
    padded = np.zeros((rows, cols, R, C), dtype=packed.values.dtype)
    counts = np.diff(packed.row_ptr)
    block_row = np.repeat(np.arange(rows), counts)
    padded[block_row, packed.col_idx] = packed.values
    dense_nk = padded.transpose(0, 2, 1, 3).reshape(rows * R, cols * C)[:N, :K]
    return np.ascontiguousarray(dense_nk.T)


# The largest K SparseQMatMul takes (kernels.h kMaxS8K): every tier sums u8*s8 products in
# int32, and 255 * 128 * K must fit. The binding refuses a larger K when a session is created.
S8_MAX_K = 2147483647 // (255 * 128)


def pack_bsr_s8(w_kn_int8: np.ndarray, w_scale: float | np.ndarray, R: int, C: int) -> BsrS8Packed:
    """int8 BSR (C a multiple of 4) with ``w_scale`` (a scalar or one per output n)."""
    _check_block(R, C)
    if int(C) % 4:
        raise ValueError(f"SparseQMatMul blocks need C % 4 == 0, got C={C}")
    array = np.asarray(w_kn_int8)
    if array.dtype != np.int8:
        raise ValueError(f"pack_bsr_s8 takes an int8 weight, got {array.dtype}")
    w = _matrix(array, np.int8)
    K, N = w.shape
    scale = np.asarray(w_scale, dtype=np.float32).reshape(-1)
    if scale.size not in (1, N):
        raise ValueError(f"w_scale must hold 1 or N={N} values, got {scale.size}")
    values, col_idx, row_ptr = _blocks(w, int(R), int(C))
    rowsum = w.sum(axis=0, dtype=np.int32)
    return BsrS8Packed(
        values, col_idx, row_ptr, scale.copy(), rowsum, int(K), int(N), int(R), int(C)
    )


def unpack_bsr_s8(packed: BsrS8Packed) -> np.ndarray:
    """The dense int8 ``[K, N]`` weight (scales not applied)."""
    return unpack_bsr(packed)


def pack_24(w_kn: np.ndarray) -> Packed24:
    """2:4 along K: per output n and group of 4 k's, the two kept values and their positions.

    Raises ValueError when K % 4 != 0 or a group holds more than 2 non-zeros. A group with
    fewer keeps zeros at the first free positions (p0 < p1 always).
    """
    w = _matrix(w_kn, np.float32)
    K, N = w.shape
    if K % 4:
        raise ValueError(f"2:4 packing needs K % 4 == 0, got K={K}")
    groups = np.ascontiguousarray(w.T).reshape(N, K // 4, 4)
    nonzero = groups != 0
    crowded = np.argwhere(nonzero.sum(axis=-1) > 2)
    if crowded.size:
        n, g = (int(v) for v in crowded[0])
        raise ValueError(
            f"not 2:4 sparse: output {n}, k in [{4 * g}, {4 * g + 4}) holds "
            f"{int(nonzero[n, g].sum())} non-zeros ({len(crowded)} such groups)"
        )
    # Non-zeros first (in position order), then zeros: the first two, sorted, are p0 < p1.
    order = np.where(nonzero, 0, 4) + np.arange(4)
    kept = np.sort(np.argsort(order, axis=-1, kind="stable")[..., :2], axis=-1)
    values = np.take_along_axis(groups, kept, axis=-1).reshape(N, K // 2)
    nibbles = (kept[..., 0] | (kept[..., 1] << 2)).astype(np.uint8)  # [N, K/4]
    if nibbles.shape[1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros((N, 1), np.uint8)], axis=1)
    indices = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)
    return Packed24(np.ascontiguousarray(values), np.ascontiguousarray(indices), int(K), int(N))


def unpack_24(packed: Packed24) -> np.ndarray:
    """The dense fp32 ``[K, N]`` weight of a 2:4 packing."""
    K, N = packed.K, packed.N
    groups = K // 4
    nibbles = np.stack([packed.indices & 15, packed.indices >> 4], axis=-1).reshape(N, -1)
    nibbles = nibbles[:, :groups]
    positions = np.stack([nibbles & 3, (nibbles >> 2) & 3], axis=-1).astype(np.int64)
    dense = np.zeros((N, groups, 4), dtype=np.float32)
    np.put_along_axis(dense, positions, packed.values.reshape(N, groups, 2), axis=-1)
    return np.ascontiguousarray(dense.reshape(N, K).T)


def packed_bytes(packed: BsrPacked | Packed24 | BsrS8Packed) -> int:
    """Bytes the packed weight occupies in a model: every array the op takes for it."""
    if isinstance(packed, Packed24):
        arrays = [packed.values, packed.indices]
    elif isinstance(packed, BsrS8Packed):
        arrays = [packed.values, packed.col_idx, packed.row_ptr, packed.w_scale, packed.w_rowsum]
    else:
        arrays = [packed.values, packed.col_idx, packed.row_ptr]
    return int(sum(a.nbytes for a in arrays))
