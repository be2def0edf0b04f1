"""graphopt.kernels.packing: every packer round-trips and writes the layout LAYOUTS.md states."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.kernels.packing import (
    BsrPacked,
    pack_24,
    pack_bsr,
    pack_bsr_s8,
    packed_bytes,
    unpack_24,
    unpack_bsr,
    unpack_bsr_s8,
)

BLOCKS = [(1, 4), (4, 1), (16, 1), (4, 4), (1, 1), (2, 2)]


def block_sparse(rng: np.random.Generator, K: int, N: int, R: int, C: int, p: float) -> np.ndarray:
    """A [K, N] weight whose R x C blocks (over n, k) are zero with probability p."""
    keep = rng.random((-(-N // R), -(-K // C))) >= p
    mask = np.repeat(np.repeat(keep, R, axis=0), C, axis=1)[:N, :K].T
    return (rng.standard_normal((K, N)) * mask).astype(np.float32)


def two_four(rng: np.random.Generator, K: int, N: int) -> np.ndarray:
    """A random [K, N] weight with at most 2 non-zeros in every group of 4 along K."""
    w = rng.standard_normal((N, K // 4, 4)).astype(np.float32)
    drop = np.argsort(rng.random((N, K // 4, 4)), axis=-1)[..., : rng.integers(2, 5)]
    np.put_along_axis(w, drop, 0.0, axis=-1)
    return np.ascontiguousarray(w.reshape(N, K).T)


@pytest.mark.parametrize(("R", "C"), BLOCKS)
def test_bsr_round_trip_and_layout(R: int, C: int) -> None:
    rng = np.random.default_rng(R * 100 + C)
    for K, N, p in [(1, 1, 0.0), (7, 13, 0.5), (33, 17, 0.9), (16, 16, 1.0), (5, 40, 0.0)]:
        w = block_sparse(rng, K, N, R, C, p)
        packed = pack_bsr(w, R, C)
        np.testing.assert_array_equal(unpack_bsr(packed), w)
        rows, cols = -(-N // R), -(-K // C)
        assert packed.values.dtype == np.float32 and packed.values.shape == (packed.nnzb, R, C)
        assert packed.col_idx.dtype == np.int32 and packed.row_ptr.dtype == np.int32
        assert packed.row_ptr.shape == (rows + 1,) and packed.row_ptr[0] == 0
        assert packed.row_ptr[-1] == packed.nnzb
        for i in range(rows):
            cols_i = packed.col_idx[packed.row_ptr[i] : packed.row_ptr[i + 1]]
            assert np.all(np.diff(cols_i) > 0) and np.all((cols_i >= 0) & (cols_i < cols))
        # The layout formula of kernels.h, element by element for the stored blocks.
        for b in range(packed.nnzb):
            i = int(np.searchsorted(packed.row_ptr, b, side="right")) - 1
            j = int(packed.col_idx[b])
            for r in range(R):
                for c in range(C):
                    k, n = j * C + c, i * R + r
                    want = w[k, n] if k < K and n < N else 0.0
                    assert packed.values[b, r, c] == want
        # All-zero blocks are dropped: every stored block holds a non-zero.
        assert all(np.any(packed.values[b] != 0) for b in range(packed.nnzb))


def test_bsr_dense_weight_keeps_every_block_and_zero_weight_none() -> None:
    w = np.ones((10, 6), np.float32)
    assert pack_bsr(w, 4, 4).nnzb == 2 * 3
    empty = pack_bsr(np.zeros((10, 6), np.float32), 4, 4)
    assert empty.nnzb == 0 and empty.row_ptr.tolist() == [0, 0, 0]
    assert unpack_bsr(empty).shape == (10, 6)


def test_two_four_round_trip_and_nibbles() -> None:
    rng = np.random.default_rng(0)
    for K, N in [(4, 1), (8, 3), (12, 5), (36, 7), (64, 2)]:
        w = two_four(rng, K, N)
        packed = pack_24(w)
        assert packed.values.shape == (N, K // 2) and packed.indices.shape == (N, -(-K // 8))
        assert packed.indices.dtype == np.uint8
        np.testing.assert_array_equal(unpack_24(packed), w)
        for n in range(N):
            for g in range(K // 4):
                nibble = (packed.indices[n, g // 2] >> (4 * (g % 2))) & 15
                p0, p1 = nibble & 3, nibble >> 2
                assert p0 < p1
                assert packed.values[n, 2 * g] == w[4 * g + p0, n]
                assert packed.values[n, 2 * g + 1] == w[4 * g + p1, n]


def test_two_four_refuses_dense_groups_and_bad_k() -> None:
    w = np.zeros((8, 2), np.float32)
    w[4:7, 1] = 1.0  # 3 non-zeros in group 1 of output 1
    with pytest.raises(ValueError, match=r"output 1, k in \[4, 8\) holds 3"):
        pack_24(w)
    with pytest.raises(ValueError, match="K % 4"):
        pack_24(np.zeros((6, 2), np.float32))


@pytest.mark.parametrize(("R", "C"), [(1, 4), (4, 4), (2, 8), (16, 4)])
def test_s8_round_trip_rowsum_and_scales(R: int, C: int) -> None:
    rng = np.random.default_rng(R + C)
    for K, N in [(1, 1), (9, 6), (31, 17)]:
        w = (block_sparse(rng, K, N, R, C, 0.5) * 40).round().clip(-127, 127).astype(np.int8)
        scales = rng.uniform(0.01, 0.1, N).astype(np.float32)
        packed = pack_bsr_s8(w, scales, R, C)
        np.testing.assert_array_equal(unpack_bsr_s8(packed), w)
        np.testing.assert_array_equal(packed.w_rowsum, w.astype(np.int64).sum(axis=0))
        assert packed.values.dtype == np.int8 and packed.w_rowsum.dtype == np.int32
        np.testing.assert_array_equal(packed.w_scale, scales)
        assert pack_bsr_s8(w, 0.5, R, C).w_scale.shape == (1,)


def test_s8_argument_errors() -> None:
    w = np.zeros((4, 4), np.int8)
    with pytest.raises(ValueError, match="C % 4"):
        pack_bsr_s8(w, 1.0, 1, 2)
    with pytest.raises(ValueError, match="int8"):
        pack_bsr_s8(w.astype(np.float32), 1.0, 1, 4)
    with pytest.raises(ValueError, match="w_scale"):
        pack_bsr_s8(w, np.ones(3, np.float32), 1, 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_bsr(np.zeros(4, np.float32), 1, 4)


def test_packed_bytes_counts_every_array() -> None:
    w = np.zeros((8, 8), np.float32)
    w[0, 0] = 1.0
    packed = pack_bsr(w, 4, 4)  # one block: 64 B values, 4 B col_idx, 3 x 4 B row_ptr
    assert isinstance(packed, BsrPacked) and packed_bytes(packed) == 64 + 4 + 12
    two = pack_24(np.zeros((8, 3), np.float32))
    assert packed_bytes(two) == 3 * 4 * 4 + 3 * 1
    s8 = pack_bsr_s8(np.ones((8, 2), np.int8), 1.0, 1, 4)  # 4 blocks of 4 B
    assert packed_bytes(s8) == 16 + 4 * 4 + 3 * 4 + 4 + 2 * 4


def test_packing_is_deterministic() -> None:
    w = block_sparse(np.random.default_rng(3), 20, 20, 4, 1, 0.5)
    a, b = pack_bsr(w, 4, 1), pack_bsr(w.copy(), 4, 1)
    for name in ("values", "col_idx", "row_ptr"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
