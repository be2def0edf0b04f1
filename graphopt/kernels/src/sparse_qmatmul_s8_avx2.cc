// SparseQMatMul on AVX2, exact. AVX2's byte multiply (vpmaddubsw) adds two u8*s8 products
// into a *saturating* int16, which 255*127*2 overflows; so activations are widened to int16
// when A is packed and weights when a block is read, and vpmaddwd (int16 pairs summed into
// int32, no saturation possible) does the multiply: every result equals the reference's.
//
// Vectorized over M like the VNNI kernel: A is repacked per tile of up to 32 rows as
// [Kpad/2][rows][2] int16, so one ymm holds 8 rows x 2 consecutive k; a block's weights for
// one output are sign-extended to int16 and broadcast as pairs; the A loads are reused across
// up to 2 outputs of an R > 1 block. Results come out as [n][rows] and are transposed into Y.
// A is zero past K, so blocks hanging past K are exact whatever their padding weights hold.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "sparse_qmatmul_s8_internal.h"

namespace graphopt {
namespace qs8 {
namespace {

constexpr int64_t kTileRows = 32;  // 4 ymm of 8 rows
constexpr int64_t kChunkOutputs = 128;

// A rows [m0, m0 + 8*T) as [kpad/2][8*T] dwords, each (int16 a[k], int16 a[k+1]).
void pack_tile(const uint8_t* A, int64_t M, int64_t K, int64_t m0, int64_t T, int64_t kpad,
               uint32_t* dst) {
  const int64_t mt = 8 * T;
  std::memset(dst, 0, static_cast<size_t>(kpad / 2 * mt) * sizeof(uint32_t));
  for (int64_t mm = 0; mm < mt; ++mm) {
    const int64_t m = m0 + mm;
    if (m >= M) break;
    const uint8_t* a = A + m * K;
    uint32_t* d = dst + mm;
    int64_t k = 0;
    for (; k + 1 < K; k += 2) d[(k / 2) * mt] = a[k] | (static_cast<uint32_t>(a[k + 1]) << 16);
    if (k < K) d[(k / 2) * mt] = a[k];
  }
}

// acc[r][t] (8 rows each) for outputs r0 + r over blocks [b0, b1).
template <int T, int RC>
void dot_tile(const uint32_t* tile, const int8_t* values, const int32_t* col, int64_t b0,
              int64_t b1, int64_t R, int64_t q, int64_t r0, __m256i* out) {
  constexpr int64_t pstride = 8 * T;  // dwords per k pair in the tile
  __m256i acc[RC][T];
  for (int r = 0; r < RC; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
  const int64_t C = q * 4;
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t* ab = tile + static_cast<int64_t>(col[b]) * (C / 2) * pstride;
    const int8_t* v = values + (b * R + r0) * C;
    for (int64_t c4 = 0; c4 < q; ++c4) {
      __m256i w01[RC], w23[RC];
      for (int r = 0; r < RC; ++r) {
        int32_t d;
        std::memcpy(&d, v + r * C + c4 * 4, 4);
        const __m128i w16 = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(d));  // 4 int16 weights
        w01[r] = _mm256_broadcastd_epi32(w16);
        w23[r] = _mm256_broadcastd_epi32(_mm_srli_si128(w16, 4));
      }
      const uint32_t* a0 = ab + (2 * c4) * pstride;
      for (int t = 0; t < T; ++t) {
        const __m256i x01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + t * 8));
        const __m256i x23 =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + pstride + t * 8));
        for (int r = 0; r < RC; ++r) {
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(x01, w01[r]));
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(x23, w23[r]));
        }
      }
    }
  }
  for (int r = 0; r < RC; ++r)
    for (int t = 0; t < T; ++t) out[r * 4 + t] = acc[r][t];
}

using DotFn = void (*)(const uint32_t*, const int8_t*, const int32_t*, int64_t, int64_t, int64_t,
                       int64_t, int64_t, __m256i*);

template <int T>
DotFn dot_for_rc(int rc) {
  return rc == 1 ? dot_tile<T, 1> : dot_tile<T, 2>;
}

DotFn dot_for(int64_t T, int rc) {
  switch (T) {
    case 1: return dot_for_rc<1>(rc);
    case 2: return dot_for_rc<2>(rc);
    case 3: return dot_for_rc<3>(rc);
    default: return dot_for_rc<4>(rc);
  }
}

struct TileJob {
  const Problem* p;
  const int64_t* bounds;
  const uint32_t* packed;  // tile j at packed + j * (kpad / 2) * kTileRows
  int64_t kpad, q;
};

void tile_part(void* arg, size_t part) {
  const TileJob& job = *static_cast<const TileJob*>(arg);
  const Problem& p = *job.p;
  const BsrS8& W = *p.W;
  const int64_t R = W.R, N = W.N, M = p.M;
  const int64_t i0 = job.bounds[part], i1 = job.bounds[part + 1];
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkOutputs / R);
  const int64_t chunk_cap = chunk_rows * R;
  std::vector<float> tmp(static_cast<size_t>(chunk_cap * kTileRows));     // [n][rows]
  std::vector<float> rowbuf(static_cast<size_t>(kTileRows * chunk_cap));  // [rows][n]
  const __m256i zp = _mm256_set1_epi32(p.a_zero_point);
  const int64_t ntiles = (M + kTileRows - 1) / kTileRows;
  for (int64_t ic = i0; ic < i1; ic += chunk_rows) {
    const int64_t ie = std::min(i1, ic + chunk_rows);
    const int64_t nc0 = ic * R, nc1 = std::min(ie * R, N);
    const int64_t nout = nc1 - nc0;
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t m0 = tile * kTileRows;
      const int64_t rows = std::min(kTileRows, M - m0);
      const int64_t T = (rows + 7) / 8;
      const uint32_t* tp = job.packed + tile * (job.kpad / 2) * kTileRows;
      __m256i out[8];
      for (int64_t i = ic; i < ie; ++i) {
        for (int64_t r0 = 0; r0 < R && i * R + r0 < N; r0 += 2) {
          const int rc = static_cast<int>(std::min<int64_t>(2, R - r0));
          dot_for(T, rc)(tp, W.values, W.col_idx, W.row_ptr[i], W.row_ptr[i + 1], R, job.q, r0,
                         out);
          for (int r = 0; r < rc; ++r) {
            const int64_t n = i * R + r0 + r;
            if (n >= N) break;
            const float ws = W.w_scale_size == 1 ? W.w_scale[0] : W.w_scale[n];
            const __m256 scale = _mm256_set1_ps(p.a_scale * ws);
            const __m256i corr = _mm256_mullo_epi32(zp, _mm256_set1_epi32(W.w_rowsum[n]));
            float* dst = tmp.data() + (n - nc0) * kTileRows;
            for (int64_t t = 0; t < T; ++t) {
              const __m256i c = _mm256_sub_epi32(out[r * 4 + t], corr);
              _mm256_storeu_ps(dst + t * 8, _mm256_mul_ps(_mm256_cvtepi32_ps(c), scale));
            }
          }
        }
      }
      // [n][rows] -> [rows][n] (scalar; this tier is the fallback), epilogue, copy into Y.
      for (int64_t mm = 0; mm < rows; ++mm) {
        float* dst = rowbuf.data() + mm * chunk_cap;
        for (int64_t n = 0; n < nout; ++n) dst[n] = tmp[static_cast<size_t>(n * kTileRows + mm)];
        apply_epilogue_row(dst, nout, p.bias ? p.bias + nc0 : nullptr, p.act);
        std::memcpy(p.Y + (m0 + mm) * N + nc0, dst, static_cast<size_t>(nout) * sizeof(float));
      }
    }
  }
}

}  // namespace

void run_avx2(const Problem& p, const Parallel& par) {
  const BsrS8& W = *p.W;
  const int64_t nbr = (W.N + W.R - 1) / W.R;
  const int64_t nbc = (W.K + W.C - 1) / W.C;
  const int64_t kpad = nbc * W.C;  // a multiple of 4
  const int64_t ntiles = (p.M + kTileRows - 1) / kTileRows;
  // pack_tile fills each tile whole: no zero fill here.
  std::unique_ptr<uint32_t[]> packed(new uint32_t[ntiles * (kpad / 2) * kTileRows]);
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t rows = std::min(kTileRows, p.M - t * kTileRows);
    pack_tile(p.A, p.M, W.K, t * kTileRows, (rows + 7) / 8, kpad,
              packed.get() + t * (kpad / 2) * kTileRows);
  }
  // ~10 us of work per part at least (8 rows of a block per instruction here).
  const int64_t parts = choose_parts(par, nbr, work_units(W, p.M) * (W.C / 4), 131072);
  std::vector<int64_t> bounds(static_cast<size_t>(parts + 1));
  balanced_bounds(W.row_ptr, nbr, parts, bounds.data());
  TileJob job{&p, bounds.data(), packed.get(), kpad, W.C / 4};
  if (parts == 1) {
    tile_part(&job, 0);
  } else {
    par.run(par, static_cast<size_t>(parts), tile_part, &job);
  }
}

}  // namespace qs8
}  // namespace graphopt
