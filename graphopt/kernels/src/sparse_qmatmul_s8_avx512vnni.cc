// SparseQMatMul on AVX-512 VNNI: vpdpbusd multiplies 4 consecutive u8 activations by 4 s8
// weights and adds the 4 products into one int32 lane, which is why blocks have C % 4 == 0.
//
// Two shapes of work:
// - M >= kMinTileRows: vectorize over M. A is repacked per tile of up to 64 rows as
//   [K/4][rows][4] bytes, so one zmm holds 16 rows x 4 consecutive k. For each stored block the
//   4 weights of one output (one dword) are broadcast to all lanes and vpdpbusd'ed into 16
//   rows' accumulators; the A loads are reused across up to 4 outputs of an R > 1 block and a
//   weight broadcast across up to 4 zmm of rows. Results come out as [n][rows] and are turned
//   into Y's [rows][n] by a 16x16 in-register transpose.
//   1x4 blocks (panel_tile): a 64-row tile is 64*K bytes (48 KB at K = 768, all of Zen 5's
//   L1D), and every block loads 256 of them at a random k; so K is cut into equal panels of
//   at most 32 KB of the tile, each output takes its blocks panel by panel (col_idx is sorted
//   within an output, a cursor per output marks where the next panel starts) and int32
//   partial sums wait in the output buffer between panels.
// - M == 1 with the row-lane layout (RowLanesS8 in kernels.h, derived at run time by the ORT
//   binding for constant 1x4 weights; LAYOUTS.md "Derived at run time"): a lane is an output
//   row. Per chunk of 16*G outputs and K panel of 32*P dwords, the panel of A sits in 2P zmm;
//   each slot is a 64-byte load of 16 rows' weight dwords, a 16-byte load of their indices
//   into the panel, a vpermi2d lookup (P of them and P - 1 selects) and one vpdpbusd into a
//   16-output accumulator. Per panel the chunk's rows are in lanes longest first (less zero
//   padding in a group of 16), and vpermi2d moves the G accumulators to the next panel's
//   order. No horizontal sums or prefix sums; zero point, scales and store take 16 outputs
//   at once, and the table no longer depends on K. (Zen 5, BERT-base FFN at 80%: ~5-7.5 us
//   against ~27 us for the prefix-sum stream below; it moves 0.7 MB and is memory-bound.)
// - M == 1 otherwise (a tile would waste 15 of 16 lanes): vectorize over a block row's blocks.
//   1x4 blocks: 16 blocks' weight dwords are one load; their 16 activation dwords come from a
//   register table (K <= 1024, vpermi2d) or scalar-indexed inserts, and outputs are
//   differences of a prefix sum over the block stream (K <= 1024) or per-row reductions.
//   Blocks with R*C dividing 64 (1x8, 1x16, 2x4, 4x4, ...): one zmm of weights is whole
//   blocks; masked loads + vpermd place each block's activations under its weights.
//   Other shapes: vpgatherdd (correct, slow).
//   (Which path wins where was measured on Zen 4; other cores may prefer other crossovers.
//   The 1x4 panels and the alignment of the scratch buffers were measured on Zen 5.)
// A is copied with zero padding up to a whole number of block columns, so blocks that hang
// past K meet zeros (exact whatever the padding weights hold; w_rowsum covers k < K only).
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics initialise their "undefined" operands with themselves, which
// -Wmaybe-uninitialized reports at every inlined use (GCC bug 105593, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <vector>

#include "epilogue_internal.h"
#include "sparse_qmatmul_s8_internal.h"

namespace graphopt {
namespace qs8 {
namespace {

constexpr int64_t kTileRows = 64;    // 4 zmm of 16 rows: 4 x RC accumulators fit 32 registers
constexpr int64_t kMinTileRows = 2;  // one row: the gather path (a tile would waste 15 lanes)
constexpr int64_t kChunkOutputs = 128;
// The 1x4 tile path's K panels: at most this many groups of 4 k (32 KB of a 64-row tile),
// K split into equal panels. (Zen 5, K = 768 / 3072 at M = 128: 0.92x / 0.78x the time of
// whole-K tiles; 64-group panels lose to the extra per-panel work of each output.)
constexpr int64_t kPanelMaxGroups = 128;

// Scratch of n elements of T, 64-byte aligned (optionally zeroed): the kernels read and write
// it in whole zmm, and a load or store that splits two cache lines costs about twice as much
// (malloc's 16-byte alignment left that to chance: up to 1.4x between calls of one shape).
template <typename T>
class Aligned {
 public:
  explicit Aligned(size_t n, bool zero = false) : mem_(new unsigned char[n * sizeof(T) + 63]) {
    data_ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(mem_.get()) + 63) &
                                 ~uintptr_t{63});
    if (zero) std::memset(static_cast<void*>(data_), 0, n * sizeof(T));
  }
  T* data() const { return data_; }

 private:
  std::unique_ptr<unsigned char[]> mem_;
  T* data_;
};

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ----------------------------------------------------------------------------- tile path

// acc[r][t] = sum over blocks [b0, b1) of row r0 + r: the dot of 16*T rows with the weights.
// Q = C/4 when known at compile time (1, 2, 4: blocks 1x4, 1x8, 1x16), 0 for "read q". With few
// accumulators (RC*T <= 8) two blocks run on separate accumulator sets: vpdpbusd's latency
// would otherwise leave the units idle between dependent updates.
template <int T, int RC, int Q>
inline void dot_tile(const uint8_t* tile, const int8_t* values, const int32_t* col, int64_t b0,
                     int64_t b1, int64_t R, int64_t q_rt, int64_t r0, __m512i* out) {
  constexpr int64_t gstride = 64 * T;  // bytes per k group in the tile
  constexpr int U = RC * T <= 8 ? 2 : 1;
  const int64_t q = Q > 0 ? Q : q_rt;
  __m512i acc[U][RC][T];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < RC; ++r)
      for (int t = 0; t < T; ++t) acc[u][r][t] = _mm512_setzero_si512();
  const int64_t bstride = R * q * 4;
  const int8_t* vb = values + r0 * q * 4;
  int64_t b = b0;
  for (; b + U <= b1; b += U) {
    for (int u = 0; u < U; ++u) {
      const uint8_t* ab = tile + static_cast<int64_t>(col[b + u]) * q * gstride;
      const int8_t* v = vb + (b + u) * bstride;
      for (int64_t c4 = 0; c4 < q; ++c4) {
        __m512i a[T];
        for (int t = 0; t < T; ++t) a[t] = _mm512_loadu_si512(ab + c4 * gstride + t * 64);
        for (int r = 0; r < RC; ++r) {
          const __m512i w = _mm512_set1_epi32(load_i32(v + r * q * 4 + c4 * 4));
          for (int t = 0; t < T; ++t) acc[u][r][t] = _mm512_dpbusd_epi32(acc[u][r][t], a[t], w);
        }
      }
    }
  }
  for (; b < b1; ++b) {
    const uint8_t* ab = tile + static_cast<int64_t>(col[b]) * q * gstride;
    const int8_t* v = vb + b * bstride;
    for (int64_t c4 = 0; c4 < q; ++c4) {
      __m512i a[T];
      for (int t = 0; t < T; ++t) a[t] = _mm512_loadu_si512(ab + c4 * gstride + t * 64);
      for (int r = 0; r < RC; ++r) {
        const __m512i w = _mm512_set1_epi32(load_i32(v + r * q * 4 + c4 * 4));
        for (int t = 0; t < T; ++t) acc[0][r][t] = _mm512_dpbusd_epi32(acc[0][r][t], a[t], w);
      }
    }
  }
  for (int r = 0; r < RC; ++r)
    for (int t = 0; t < T; ++t)
      out[r * 4 + t] = U == 2 ? _mm512_add_epi32(acc[0][r][t], acc[U - 1][r][t]) : acc[0][r][t];
}

// 1x4 blocks (R = 1, C = 4), the common case: dot_tile<T, 1, 1> over the blocks of one output
// from *cur on while their block column is below lim (one K panel of the tile); *cur is left
// at the first block not taken. The two accumulator sets are separate named arrays: indexed
// as one 2-D array by the unrolled u, GCC 12 copies every accumulator between registers
// around each vpdpbusd (~8 extra moves per 2 blocks).
template <int T>
inline void dot_1x4_panel(const uint8_t* tile, const int8_t* values, const int32_t* col,
                          int64_t* cur, int64_t b1, int32_t lim, __m512i* out) {
  constexpr int64_t gstride = 64 * T;
  __m512i x[T], y[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) x[t] = y[t] = _mm512_setzero_si512();
  int64_t b = *cur;
  // col is increasing within the output, so col[b + 1] < lim covers col[b] too.
  for (; b + 2 <= b1 && col[b + 1] < lim; b += 2) {
    const uint8_t* a0 = tile + static_cast<int64_t>(col[b]) * gstride;
    const uint8_t* a1 = tile + static_cast<int64_t>(col[b + 1]) * gstride;
    const __m512i w0 = _mm512_set1_epi32(load_i32(values + b * 4));
    const __m512i w1 = _mm512_set1_epi32(load_i32(values + b * 4 + 4));
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t)
      x[t] = _mm512_dpbusd_epi32(x[t], _mm512_loadu_si512(a0 + 64 * t), w0);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t)
      y[t] = _mm512_dpbusd_epi32(y[t], _mm512_loadu_si512(a1 + 64 * t), w1);
  }
  if (b < b1 && col[b] < lim) {
    const uint8_t* a0 = tile + static_cast<int64_t>(col[b]) * gstride;
    const __m512i w0 = _mm512_set1_epi32(load_i32(values + b * 4));
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t)
      x[t] = _mm512_dpbusd_epi32(x[t], _mm512_loadu_si512(a0 + 64 * t), w0);
    ++b;
  }
  *cur = b;
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) out[t] = _mm512_add_epi32(x[t], y[t]);
}

// Outputs [i0, i1) of 1x4 blocks for one tile of 16*T rows, K panel by K panel: each panel
// of the tile (panel groups of 4 k, 64*T*panel bytes) stays in L1 while every output of the
// chunk takes its blocks there. acc[(i - i0) * 64 + row] holds the int32 partial sums between
// panels and, after the last, the dequantized floats (in place).
template <int T>
void panel_tile(const Problem& p, const uint8_t* tile, int64_t kg, int64_t panel, int64_t i0,
                int64_t i1, int64_t* cursor, int32_t* acc) {
  const BsrS8& W = *p.W;
  const __m512i zp = _mm512_set1_epi32(p.a_zero_point);
  for (int64_t i = i0; i < i1; ++i) cursor[i - i0] = W.row_ptr[i];
  for (int64_t g0 = 0; g0 < kg; g0 += panel) {
    const bool first = g0 == 0, last = g0 + panel >= kg;
    const int32_t lim = last ? INT32_MAX : static_cast<int32_t>(g0 + panel);
    for (int64_t i = i0; i < i1; ++i) {
      __m512i out[T];
      dot_1x4_panel<T>(tile, W.values, W.col_idx, cursor + (i - i0), W.row_ptr[i + 1], lim, out);
      int32_t* dst = acc + (i - i0) * kTileRows;
      if (!first) {
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t)
          out[t] = _mm512_add_epi32(out[t], _mm512_load_si512(dst + 16 * t));
      }
      if (!last) {
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) _mm512_store_si512(dst + 16 * t, out[t]);
        continue;
      }
      const float ws = W.w_scale_size == 1 ? W.w_scale[0] : W.w_scale[i];
      const __m512 scale = _mm512_set1_ps(p.a_scale * ws);
      const __m512i corr = _mm512_mullo_epi32(zp, _mm512_set1_epi32(W.w_rowsum[i]));
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const __m512i c = _mm512_sub_epi32(out[t], corr);
        _mm512_store_ps(reinterpret_cast<float*>(dst) + 16 * t,
                        _mm512_mul_ps(_mm512_cvtepi32_ps(c), scale));
      }
    }
  }
}

using DotFn = void (*)(const uint8_t*, const int8_t*, const int32_t*, int64_t, int64_t, int64_t,
                       int64_t, int64_t, __m512i*);

template <int T, int Q>
DotFn dot_for_rc(int rc) {
  switch (rc) {
    case 1: return dot_tile<T, 1, Q>;
    case 2: return dot_tile<T, 2, Q>;
    case 3: return dot_tile<T, 3, Q>;
    default: return dot_tile<T, 4, Q>;
  }
}

template <int Q>
DotFn dot_for_t(int64_t T, int rc) {
  switch (T) {
    case 1: return dot_for_rc<1, Q>(rc);
    case 2: return dot_for_rc<2, Q>(rc);
    case 3: return dot_for_rc<3, Q>(rc);
    default: return dot_for_rc<4, Q>(rc);
  }
}

DotFn dot_for(int64_t T, int rc, int64_t q) {
  switch (q) {
    case 1: return dot_for_t<1>(T, rc);
    case 2: return dot_for_t<2>(T, rc);
    case 4: return dot_for_t<4>(T, rc);
    default: return dot_for_t<0>(T, rc);
  }
}

// In-register 16x16 float transpose: stage s swaps bit s of the row and column indices.
inline void transpose16(__m512* r) {
  // kLo[s] / kHi[s]: for rows i (bit s clear) and i + d, which lanes of (r[i], r[i+d]) form
  // the new rows: lane j takes bit s of its source row from bit s of j.
  alignas(64) static const int32_t kLo[4][16] = {
      {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
      {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
      {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
      {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}};
  alignas(64) static const int32_t kHi[4][16] = {
      {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
      {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
      {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
      {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    const int d = 1 << s;
    const __m512i ilo = _mm512_load_si512(kLo[s]), ihi = _mm512_load_si512(kHi[s]);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & d) continue;
      const __m512 x = r[i], y = r[i + d];
      r[i] = _mm512_permutex2var_ps(x, ilo, y);
      r[i + d] = _mm512_permutex2var_ps(x, ihi, y);
    }
  }
}

// A rows [m0, m0 + 16*T) as [kg][16*T][4] bytes; rows past M and k past K are zero. Each
// 16 rows x 64 bytes piece is a 16x16 dword transpose (k groups become the outer index).
void pack_tile(const uint8_t* A, int64_t M, int64_t K, int64_t m0, int64_t T, int64_t kg,
               uint8_t* dst) {
  const int64_t mt = 16 * T;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k0 = 0; k0 < kg * 4; k0 += 64) {
      const int64_t kb = std::max<int64_t>(0, std::min<int64_t>(64, K - k0));
      const __mmask64 kmask = kb == 64 ? ~__mmask64{0} : ((__mmask64{1} << kb) - 1);
      __m512 x[16];
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) {
        const int64_t m = m0 + t * 16 + l;
        x[l] = m < M ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi8(kmask, A + m * K + k0))
                     : _mm512_setzero_ps();
      }
      transpose16(x);
      const int64_t groups = std::min<int64_t>(16, kg - k0 / 4);
      for (int64_t g = 0; g < groups; ++g)
        _mm512_storeu_ps(reinterpret_cast<float*>(dst + ((k0 / 4 + g) * mt + t * 16) * 4), x[g]);
    }
  }
}

struct TileJob {
  const Problem* p;
  const int64_t* bounds;
  const uint8_t* packed;  // all tiles, tile j at packed + j * kg * 256
  int64_t kg, q;
  int64_t panel;  // 1x4 blocks: groups of 4 k per K panel (panel_tile), 0 = whole K at once
};

void tile_part(void* arg, size_t part) {
  const TileJob& job = *static_cast<const TileJob*>(arg);
  const Problem& p = *job.p;
  const BsrS8& W = *p.W;
  const int64_t R = W.R, N = W.N, M = p.M;
  const int64_t i0 = job.bounds[part], i1 = job.bounds[part + 1];
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkOutputs / R);
  const int64_t chunk_cap = (chunk_rows * R + 15) / 16 * 16;
  // tmp[n - nc0][0..64): one output's results for the tile's rows (zeroed: the transpose reads
  // whole 16-output groups, the unused ones are masked off on store).
  Aligned<float> tmp(static_cast<size_t>(chunk_cap * kTileRows), true);
  Aligned<float> rowbuf(static_cast<size_t>(kTileRows * chunk_cap));  // [rows][chunk_cap]
  std::vector<int64_t> cursor(static_cast<size_t>(chunk_rows));
  const __m512i zp = _mm512_set1_epi32(p.a_zero_point);
  const int64_t ntiles = (M + kTileRows - 1) / kTileRows;
  for (int64_t ic = i0; ic < i1; ic += chunk_rows) {
    const int64_t ie = std::min(i1, ic + chunk_rows);
    const int64_t nc0 = ic * R, nc1 = std::min(ie * R, N);
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t m0 = tile * kTileRows;
      const int64_t rows = std::min(kTileRows, M - m0);
      const int64_t T = (rows + 15) / 16;
      const uint8_t* tp = job.packed + tile * job.kg * kTileRows * 4;
      __m512i out[16];
      if (job.panel > 0) {
        int32_t* acc = reinterpret_cast<int32_t*>(tmp.data());
        switch (T) {
          case 1: panel_tile<1>(p, tp, job.kg, job.panel, ic, ie, cursor.data(), acc); break;
          case 2: panel_tile<2>(p, tp, job.kg, job.panel, ic, ie, cursor.data(), acc); break;
          case 3: panel_tile<3>(p, tp, job.kg, job.panel, ic, ie, cursor.data(), acc); break;
          default: panel_tile<4>(p, tp, job.kg, job.panel, ic, ie, cursor.data(), acc); break;
        }
      }
      for (int64_t i = ic; i < ie && job.panel == 0; ++i) {
        for (int64_t r0 = 0; r0 < R && i * R + r0 < N; r0 += 4) {
          const int rc = static_cast<int>(std::min<int64_t>(4, R - r0));
          const DotFn dot = dot_for(T, rc, job.q);
          dot(tp, W.values, W.col_idx, W.row_ptr[i], W.row_ptr[i + 1], R, job.q, r0, out);
          for (int r = 0; r < rc; ++r) {
            const int64_t n = i * R + r0 + r;
            if (n >= N) break;
            const float ws = W.w_scale_size == 1 ? W.w_scale[0] : W.w_scale[n];
            const __m512 scale = _mm512_set1_ps(p.a_scale * ws);
            const __m512i corr = _mm512_mullo_epi32(zp, _mm512_set1_epi32(W.w_rowsum[n]));
            float* dst = tmp.data() + (n - nc0) * kTileRows;
            for (int64_t t = 0; t < T; ++t) {
              const __m512i c = _mm512_sub_epi32(out[r * 4 + t], corr);
              _mm512_storeu_ps(dst + t * 16, _mm512_mul_ps(_mm512_cvtepi32_ps(c), scale));
            }
          }
        }
      }
      // [n][rows] -> rows[m][n] 16x16 at a time, the epilogue on each row while it is in L1,
      // then one contiguous copy per row into Y. (Storing the transposed vectors straight
      // into Y hits 16 rows N floats apart at once; with N a multiple of 1024 they all map to
      // the same L1 sets and the stores thrash.)
      const int64_t nout = nc1 - nc0;
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < nout; j += 16) {
          __m512 x[16];
#pragma GCC unroll 16
          for (int l = 0; l < 16; ++l)
            x[l] = _mm512_loadu_ps(tmp.data() + (j + l) * kTileRows + t * 16);
          transpose16(x);
#pragma GCC unroll 16
          for (int l = 0; l < 16; ++l)
            _mm512_storeu_ps(rowbuf.data() + (t * 16 + l) * chunk_cap + j, x[l]);
        }
      }
      for (int64_t mm = 0; mm < rows; ++mm) {
        float* src = rowbuf.data() + mm * chunk_cap;
        // This tier's row epilogue directly: apply_epilogue_row reads GRAPHOPT_KERNELS_ISA
        // (getenv) on every call, measurable at one call per row and chunk.
        if (p.bias != nullptr || p.act != Activation::None)
          detail::apply_epilogue_row_avx512(src, nout, p.bias ? p.bias + nc0 : nullptr, p.act);
        std::memcpy(p.Y + (m0 + mm) * N + nc0, src, static_cast<size_t>(nout) * sizeof(float));
      }
    }
  }
}

// ----------------------------------------------------------------------------- row path

// The 16 activation dwords at dword offsets col[0..15] of a.
inline __m512i gather16(const uint8_t* a, const int32_t* col) {
  __m128i x[4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const int32_t* c = col + 4 * g;
    __m128i v = _mm_cvtsi32_si128(load_i32(a + 4 * static_cast<int64_t>(c[0])));
    v = _mm_insert_epi32(v, load_i32(a + 4 * static_cast<int64_t>(c[1])), 1);
    v = _mm_insert_epi32(v, load_i32(a + 4 * static_cast<int64_t>(c[2])), 2);
    x[g] = _mm_insert_epi32(v, load_i32(a + 4 * static_cast<int64_t>(c[3])), 3);
  }
  const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(x[0]), x[1], 1);
  const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(x[2]), x[3], 1);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

struct RowJob {
  const Problem* p;
  const int64_t* bounds;
  const uint8_t* padded;  // M rows of kpad bytes (a multiple of 128), zero past K
  int64_t kpad, q;
};

// ---- 1x4 blocks, one row of A: every block's dot, then per-row sums from prefix sums.
//
// The blocks of a part are one contiguous stream (values and col_idx in order), so they are
// taken 16 at a time regardless of row boundaries: no half-empty vector at each row's end,
// no horizontal reduction per output. A running (wrapping) int32 prefix sum of the block dots
// gives each output as the difference of two entries; wrapping is harmless because each
// true difference (one output's sum) fits int32.

// 32*P activation dwords held in 2*P registers, looked up 16 at a time by dword index:
// vpermi2d picks from a pair by the low 5 bits of the index; a lane whose index is >= 32p takes
// pair p's pick. Indices must be below 32*P.
template <int P>
struct RegisterTable {
  __m512i t[2 * P];
  explicit RegisterTable(const uint8_t* a) {
#pragma GCC unroll 16
    for (int i = 0; i < 2 * P; ++i) t[i] = _mm512_loadu_si512(a + 64 * i);
  }
  __m512i operator()(__m512i idx) const {
    __m512i r = _mm512_permutex2var_epi32(t[0], idx, t[1]);
#pragma GCC unroll 8
    for (int p = 1; p < P; ++p) {
      const __mmask16 k = _mm512_cmpge_epu32_mask(idx, _mm512_set1_epi32(32 * p));
      r = _mm512_mask_mov_epi32(r, k, _mm512_permutex2var_epi32(t[2 * p], idx, t[2 * p + 1]));
    }
    return r;
  }
};

// Gathers the activation dwords of 16 blocks from a held in registers (K <= 128*P bytes).
template <int P>
struct TableGather {
  RegisterTable<P> table;
  explicit TableGather(const uint8_t* a) : table(a) {}
  __m512i operator()(const int32_t* col) const { return table(_mm512_loadu_si512(col)); }
};

template <typename Gather>
void stream_1x4(const Problem& p, const uint8_t* a, float* y, int64_t i0, int64_t i1,
                Gather gather, uint32_t* pre) {
  const BsrS8& W = *p.W;
  const int64_t B0 = W.row_ptr[i0], B1 = W.row_ptr[i1];
  // Locals: the stores into pre (vector stores, which may alias anything) would otherwise
  // make the compiler reload W's fields every 16 blocks.
  const int32_t* const col_idx = W.col_idx;
  const int8_t* const values = W.values;
  const int64_t nnzb = W.nnzb;
  const __m512i zero = _mm512_setzero_si512();
  const __m512i last = _mm512_set1_epi32(15);
  __m512i carry = zero;
  pre[0] = 0;
  // Inclusive prefix sum across the 16 lanes (shift in zeros by 1, 2, 4, 8 lanes and add)
  // plus the running total, stored at pre + j + 1 for the group's first block j.
  auto step = [&](__m512i d, int64_t j) {
    d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, zero, 15));
    d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, zero, 14));
    d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, zero, 12));
    d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, zero, 8));
    d = _mm512_add_epi32(d, carry);
    _mm512_storeu_si512(pre + j + 1, d);
    carry = _mm512_permutexvar_epi32(last, d);
  };
  int64_t b = B0;
  for (; b + 16 <= B1; b += 16) {
    const __m512i wv = _mm512_loadu_si512(values + b * 4);
    step(_mm512_dpbusd_epi32(zero, gather(col_idx + b), wv), b - B0);
  }
  if (b < B1) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (B1 - b)) - 1u);
    __m512i av;
    if (b + 16 <= nnzb) {
      av = gather(col_idx + b);  // lanes past B1: other rows' (valid) columns, weight 0
    } else {
      const __m512i col = _mm512_maskz_loadu_epi32(mask, col_idx + b);
      av = _mm512_mask_i32gather_epi32(zero, mask, col, a, 4);
    }
    const __m512i wv = _mm512_maskz_loadu_epi32(mask, values + b * 4);
    step(_mm512_dpbusd_epi32(zero, av, wv), b - B0);
  }
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t s = pre[W.row_ptr[i + 1] - B0] - pre[W.row_ptr[i] - B0];
    y[i] = dequant(static_cast<int32_t>(s), p, i);
  }
}

// ---- blocks of R*C bytes dividing 64 (1x8, 1x16, 2x4, 4x4, ...), one row of A.
//
// One zmm of weights is then G = 64/(R*C) whole consecutive blocks, lane L holding dword
// (j, r, c4) = (L / (R*q), (L / q) % R, L % q). The matching activations are block j's q
// dwords repeated for each r: one masked load of those q dwords and one masked vpermd (lane L
// takes dword L % q) place them. After a block row, output r is the sum of its lanes.
// noinline: inlined into row_part its loop came out ~5-10% slower, from changes elsewhere in
// row_part (register allocation), on Zen 5.
__attribute__((noinline)) void rows_packed_blocks(const Problem& p, const uint8_t* a, float* y,
                                                  int64_t i0, int64_t i1, int64_t q) {
  const BsrS8& W = *p.W;
  const int64_t R = W.R, N = W.N, rc = R * W.C;
  const int64_t G = 64 / rc;
  alignas(64) int32_t modq[16];
  __mmask16 rmask[16] = {};
  for (int L = 0; L < 16; ++L) {
    modq[L] = static_cast<int32_t>(L % q);
    rmask[(L / q) % R] = static_cast<__mmask16>(rmask[(L / q) % R] | (1u << L));
  }
  const __m512i spread = _mm512_load_si512(modq);
  const __mmask16 first_q = static_cast<__mmask16>((1u << q) - 1u);
  const unsigned per_block = static_cast<unsigned>(R * q);  // lanes of one block
  const unsigned block_lanes = per_block >= 16 ? 0xFFFFu : (1u << per_block) - 1u;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b0 = W.row_ptr[i], b1 = W.row_ptr[i + 1];
    __m512i acc = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; b += G) {
      const int64_t cnt = std::min<int64_t>(G, b1 - b);
      __m512i av = _mm512_setzero_si512();
      for (int64_t j = 0; j < cnt; ++j) {
        const uint8_t* src = a + static_cast<int64_t>(W.col_idx[b + j]) * q * 4;
        const __m512i v = _mm512_maskz_loadu_epi32(first_q, src);
        const __mmask16 mj = static_cast<__mmask16>(block_lanes << (j * per_block));
        av = _mm512_mask_permutexvar_epi32(av, mj, spread, v);
      }
      const int64_t lanes = cnt * R * q;
      const __mmask16 mask = lanes >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1u);
      const __m512i wv = _mm512_maskz_loadu_epi32(mask, W.values + b * rc);
      acc = _mm512_dpbusd_epi32(acc, av, wv);
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = i * R + r;
      if (n >= N) break;
      y[n] = dequant(_mm512_mask_reduce_add_epi32(rmask[r], acc), p, n);
    }
  }
}

void row_part(void* arg, size_t part) {
  const RowJob& job = *static_cast<const RowJob*>(arg);
  const Problem& p = *job.p;
  const BsrS8& W = *p.W;
  const int64_t R = W.R, N = W.N, q = job.q;
  const int64_t i0 = job.bounds[part], i1 = job.bounds[part + 1];
  const int64_t n0 = i0 * R, n1 = std::min(i1 * R, N);
  if (n1 <= n0) return;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const bool contiguous = R * q == 1;  // 1x4 blocks: 16 blocks' weights are one 64-byte load
  const int64_t pairs = job.kpad / 128;  // the row stride is a multiple of 128 bytes
  // K <= 1024: the activations fit 16 registers and the table gather wins. (For larger K the
  // prefix sums cost more than the per-row reductions they save; measured on Zen 4.)
  if (contiguous && pairs <= 8) {
    // One entry per block of the part (+ slack for the last 16-wide store). Zero-filled
    // although every entry read is written first: measured faster than a fresh buffer,
    // whose first stores each fetch their line.
    std::vector<uint32_t> pre(static_cast<size_t>(W.row_ptr[i1] - W.row_ptr[i0] + 17));
    for (int64_t m = 0; m < p.M; ++m) {
      const uint8_t* a = job.padded + m * job.kpad;
      float* y = p.Y + m * N;
      switch (pairs) {
        case 1: stream_1x4(p, a, y, i0, i1, TableGather<1>(a), pre.data()); break;
        case 2: stream_1x4(p, a, y, i0, i1, TableGather<2>(a), pre.data()); break;
        case 3: stream_1x4(p, a, y, i0, i1, TableGather<3>(a), pre.data()); break;
        case 4: stream_1x4(p, a, y, i0, i1, TableGather<4>(a), pre.data()); break;
        case 5: stream_1x4(p, a, y, i0, i1, TableGather<5>(a), pre.data()); break;
        case 6: stream_1x4(p, a, y, i0, i1, TableGather<6>(a), pre.data()); break;
        case 7: stream_1x4(p, a, y, i0, i1, TableGather<7>(a), pre.data()); break;
        default: stream_1x4(p, a, y, i0, i1, TableGather<8>(a), pre.data()); break;
      }
      apply_epilogue_row(y + n0, n1 - n0, p.bias ? p.bias + n0 : nullptr, p.act);
    }
    return;
  }
  if (!contiguous && 64 % (R * W.C) == 0) {
    for (int64_t m = 0; m < p.M; ++m) {
      float* y = p.Y + m * N;
      rows_packed_blocks(p, job.padded + m * job.kpad, y, i0, i1, q);
      apply_epilogue_row(y + n0, n1 - n0, p.bias ? p.bias + n0 : nullptr, p.act);
    }
    return;
  }
  for (int64_t m = 0; m < p.M; ++m) {
    const uint8_t* a = job.padded + m * job.kpad;
    float* y = p.Y + m * N;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b0 = W.row_ptr[i], b1 = W.row_ptr[i + 1];
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = i * R + r;
        if (n >= N) break;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t c4 = 0; c4 < q; ++c4) {
          for (int64_t b = b0; b < b1; b += 16) {
            const int64_t cnt = std::min<int64_t>(16, b1 - b);
            const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
            __m512i av, wv;
            if (contiguous && b + 16 <= W.nnzb) {
              // 1x4 blocks: 16 scalar-indexed dword loads inserted into a vector beat
              // vpgatherdd, which is microcoded on many cores (Zen 4: ~1 element per cycle).
              // In a row's last group the lanes past b1 read the next rows' columns (valid
              // offsets into a) and their weights are masked to zero below.
              av = gather16(a, W.col_idx + b);
            } else {
              const __m512i col = _mm512_maskz_loadu_epi32(mask, W.col_idx + b);
              const __m512i aidx = _mm512_add_epi32(
                  _mm512_mullo_epi32(col, _mm512_set1_epi32(static_cast<int32_t>(q))),
                  _mm512_set1_epi32(static_cast<int32_t>(c4)));
              av = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, aidx, a, 4);
            }
            if (contiguous) {
              wv = _mm512_maskz_loadu_epi32(mask, W.values + b * 4);
            } else {
              // dword index of block (b + lane), row r, group c4 in values
              const __m512i block =
                  _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(b)));
              const __m512i widx = _mm512_add_epi32(
                  _mm512_mullo_epi32(block, _mm512_set1_epi32(static_cast<int32_t>(R * q))),
                  _mm512_set1_epi32(static_cast<int32_t>(r * q + c4)));
              wv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, widx, W.values, 4);
            }
            acc = _mm512_dpbusd_epi32(acc, av, wv);
          }
        }
        y[n] = dequant(_mm512_reduce_add_epi32(acc), p, n);
      }
    }
    apply_epilogue_row(y + n0, n1 - n0, p.bias ? p.bias + n0 : nullptr, p.act);
  }
}

// ---- M == 1 on the row-lane layout (kernels.h RowLanesS8, LAYOUTS.md "Derived at run time").
//
// A lane is an output row: per group of 16 outputs, per K panel, each slot is one 64-byte load
// of 16 rows' weight dwords, one 16-byte load of their dword indices into the panel, a table
// lookup of the 16 activation dwords from the panel (held in 2P zmm) and one vpdpbusd. No
// horizontal sums, no prefix sums; the zero point, scales and store take 16 outputs at once.

// The chunk's G accumulators to the next lane order: lane l of the result takes lane t[l] of
// a (16*G lanes, t bytes). vpermi2d reaches 32 lanes; G = 4, 8 select between 2, 4 of them.
template <int G>
inline void shuffle_lanes(__m512i* a, const uint8_t* t) {
  __m512i r[G];
#pragma GCC unroll 8
  for (int j = 0; j < G; ++j) {
    const __m512i i =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16 * j)));
    if (G == 2) {
      r[j] = _mm512_permutex2var_epi32(a[0], i, a[1]);
    } else {
      // Pairs of registers by bit 5 of the lane index, then (G = 8) halves by bit 6.
      const __mmask16 b5 = _mm512_test_epi32_mask(i, _mm512_set1_epi32(32));
      __m512i q[G / 4];
#pragma GCC unroll 2
      for (int h = 0; h < G / 4; ++h) {
        const __m512i lo = _mm512_permutex2var_epi32(a[4 * h], i, a[4 * h + 1]);
        const __m512i hi = _mm512_permutex2var_epi32(a[4 * h + 2], i, a[4 * h + 3]);
        q[h] = _mm512_mask_mov_epi32(lo, b5, hi);
      }
      r[j] = G == 4 ? q[0]
                    : _mm512_mask_mov_epi32(
                          q[0], _mm512_test_epi32_mask(i, _mm512_set1_epi32(64)), q[G / 4 - 1]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < G; ++j) a[j] = r[j];
}

struct LanesJob {
  const Problem* p;
  const RowLanesS8* L;
  const uint8_t* padded;  // A, zero past K up to panels * 128 * P bytes, 64-byte aligned
  const int64_t* bounds;  // chunks of each part
};

template <int P, int G>
void lanes_part(const LanesJob& job, int64_t c0, int64_t c1) {
  const Problem& p = *job.p;
  const RowLanesS8& L = *job.L;
  const int64_t panels = L.panels, N = L.N;
  const int32_t* const slot_ptr = L.slot_ptr.data();
  const int8_t* const weights = L.weights;
  const uint8_t* const idx = L.idx.data();
  const __m512i zp = _mm512_set1_epi32(p.a_zero_point);
  const __m512 a_scale = _mm512_set1_ps(p.a_scale);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t c = c0; c < c1; ++c) {
    // Two accumulators per group: consecutive slots' vpdpbusd do not wait for each other.
    // (Four measured no faster on Zen 5: the loop is bound by the lookups and the loads.)
    __m512i x[G], y[G];
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) x[j] = y[j] = _mm512_setzero_si512();
    for (int64_t pn = 0; pn < panels; ++pn) {
      const RegisterTable<P> table(job.padded + pn * 128 * P);  // one panel
      const int32_t* sp = slot_ptr + (c * panels + pn) * G;
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) {
        int64_t s = sp[j];
        const int64_t s1 = sp[j + 1];
        for (; s + 2 <= s1; s += 2) {
          const __m512i i0 = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + s * 16)));
          const __m512i i1 = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + s * 16 + 16)));
          x[j] = _mm512_dpbusd_epi32(x[j], table(i0), _mm512_load_si512(weights + s * 64));
          y[j] = _mm512_dpbusd_epi32(y[j], table(i1), _mm512_load_si512(weights + s * 64 + 64));
        }
        if (s < s1) {
          const __m512i i0 = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + s * 16)));
          x[j] = _mm512_dpbusd_epi32(x[j], table(i0), _mm512_load_si512(weights + s * 64));
        }
      }
      if (G > 1) {  // to the next panel's lane order (after the last: the outputs' order)
#pragma GCC unroll 8
        for (int j = 0; j < G; ++j) {
          x[j] = _mm512_add_epi32(x[j], y[j]);
          y[j] = _mm512_setzero_si512();
        }
        shuffle_lanes<G>(x, L.shuffle.data() + (c * panels + pn) * 16 * G);
      }
    }
    // dequant() for 16 outputs at a time, the same float operations in the same order.
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) {
      const int64_t n0 = (c * G + j) * 16;
      if (n0 >= N) break;
      const __m512i acc = _mm512_add_epi32(x[j], y[j]);
      const __m512i corr = _mm512_mullo_epi32(zp, _mm512_loadu_si512(L.w_rowsum.data() + n0));
      const __m512 scale = _mm512_mul_ps(a_scale, _mm512_loadu_ps(L.w_scale.data() + n0));
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, corr)), scale);
      const __mmask16 real = _mm512_cmplt_epi32_mask(
          lane, _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(16, N - n0))));
      _mm512_mask_storeu_ps(p.Y + n0, real, v);
    }
  }
}

template <int P>
void lanes_part_g(const LanesJob& job, int64_t c0, int64_t c1) {
  switch (job.L->G) {
    case 1: lanes_part<P, 1>(job, c0, c1); break;
    case 2: lanes_part<P, 2>(job, c0, c1); break;
    case 4: lanes_part<P, 4>(job, c0, c1); break;
    default: lanes_part<P, 8>(job, c0, c1); break;
  }
}

void lanes_part_fn(void* arg, size_t part) {
  const LanesJob& job = *static_cast<const LanesJob*>(arg);
  const int64_t c0 = job.bounds[part], c1 = job.bounds[part + 1];
  switch (job.L->P) {
    case 1: lanes_part_g<1>(job, c0, c1); break;
    case 2: lanes_part_g<2>(job, c0, c1); break;
    case 3: lanes_part_g<3>(job, c0, c1); break;
    default: lanes_part_g<4>(job, c0, c1); break;
  }
}

}  // namespace

void run_lanes_avx512vnni(const Problem& p, const RowLanesS8& L, const Parallel& par) {
  // A padded with zeros to whole panels (a zero-weight slot reads index 0, a real one reads
  // below K or meets a zero; the layout's indices are < 32*P by construction). On the stack
  // up to 8 KB (K <= 7168), no heap round trip in a call of a few us (not measurably faster
  // on the shared Zen 5 box, within its noise).
  const int64_t bytes = L.panels * 128 * L.P;
  alignas(64) uint8_t local[8192];
  std::unique_ptr<Aligned<uint8_t>> heap;
  uint8_t* padded = local;
  if (bytes > static_cast<int64_t>(sizeof local)) {
    heap = std::make_unique<Aligned<uint8_t>>(static_cast<size_t>(bytes));
    padded = heap->data();
  }
  std::memcpy(padded, p.A, static_cast<size_t>(p.W->K));
  std::memset(padded + p.W->K, 0, static_cast<size_t>(bytes - p.W->K));
  const int64_t parts = std::min<int64_t>(
      L.chunks, choose_parts(par, L.chunks, work_units(*p.W, 1), 32768));
  if (parts == 1) {
    const int64_t whole[2] = {0, L.chunks};
    LanesJob job{&p, &L, padded, whole};
    lanes_part_fn(&job, 0);
  } else {
    // Equal slot counts per part, on chunk boundaries.
    std::vector<int64_t> bounds(static_cast<size_t>(parts + 1));
    const int64_t total = L.slots();
    for (int64_t t = 1; t < parts; ++t) {
      int64_t c = bounds[t - 1];
      while (c < L.chunks && L.slot_ptr[c * L.panels * L.G] < total * t / parts) ++c;
      bounds[t] = c;
    }
    bounds[parts] = L.chunks;
    LanesJob job{&p, &L, padded, bounds.data()};
    par.run(par, static_cast<size_t>(parts), lanes_part_fn, &job);
  }
  // Bias and activation over the whole row.
  if (p.bias != nullptr || p.act != Activation::None)
    detail::apply_epilogue_row_avx512(p.Y, L.N, p.bias, p.act);
}

void run_avx512vnni(const Problem& p, const Parallel& par) {
  const BsrS8& W = *p.W;
  const int64_t nbr = (W.N + W.R - 1) / W.R;
  const int64_t nbc = (W.K + W.C - 1) / W.C;
  const int64_t q = W.C / 4;
  const int64_t kpad = nbc * W.C;
  const int64_t kg = kpad / 4;
  if (p.M < kMinTileRows) {
    // Rows padded with zeros to a multiple of 128 bytes: the table gather loads whole pairs
    // of 64-byte registers.
    const int64_t stride = (kpad + 127) / 128 * 128;
    const Aligned<uint8_t> padded(static_cast<size_t>(p.M * stride), true);
    for (int64_t m = 0; m < p.M; ++m)
      std::memcpy(padded.data() + m * stride, p.A + m * W.K, static_cast<size_t>(W.K));
    // ~10 us of work per part at least: the pool's hand-off costs a few us.
    const int64_t parts = choose_parts(par, nbr, work_units(W, p.M) * q, 32768);
    std::vector<int64_t> bounds(static_cast<size_t>(parts + 1));
    balanced_bounds(W.row_ptr, nbr, parts, bounds.data());
    RowJob job{&p, bounds.data(), padded.data(), stride, q};
    if (parts == 1) {
      row_part(&job, 0);
    } else {
      par.run(par, static_cast<size_t>(parts), row_part, &job);
    }
    return;
  }
  const int64_t ntiles = (p.M + kTileRows - 1) / kTileRows;
  // pack_tile writes every byte a tile's reader uses: no zero fill needed.
  const Aligned<uint8_t> packed_buf(static_cast<size_t>(ntiles * kg * kTileRows * 4));
  uint8_t* const packed = packed_buf.data();
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t rows = std::min(kTileRows, p.M - t * kTileRows);
    pack_tile(p.A, p.M, W.K, t * kTileRows, (rows + 15) / 16, kg,
              packed + t * kg * kTileRows * 4);
  }
  // The tile path does ~16 rows of a block per instruction: ~10 us is ~256k block-rows.
  const int64_t parts = choose_parts(par, nbr, work_units(W, p.M) * q, 262144);
  std::vector<int64_t> bounds(static_cast<size_t>(parts + 1));
  balanced_bounds(W.row_ptr, nbr, parts, bounds.data());
  const int64_t npanels = (kg + kPanelMaxGroups - 1) / kPanelMaxGroups;
  const int64_t panel = W.R == 1 && q == 1 ? (kg + npanels - 1) / npanels : 0;
  TileJob job{&p, bounds.data(), packed, kg, q, panel};
  if (parts == 1) {
    tile_part(&job, 0);
  } else {
    par.run(par, static_cast<size_t>(parts), tile_part, &job);
  }
}

}  // namespace qs8
}  // namespace graphopt
