// Internal to the fp32 sparse kernels: the ISA-specific entry points the dispatchers call, and
// ISA-neutral helpers (work splitting, scratch memory) shared by the kernel files.
//
// Everything defined here is `static` so each translation unit gets its own copy: the
// *_avx2.cc / *_avx512.cc files are compiled with wider -m flags, and an inline function they
// shared with the baseline file could be merged by the linker into the wide-ISA version.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "epilogue_internal.h"
#include "kernels.h"

namespace graphopt {
namespace detail {

// Same contract as sparse_matmul_f32 / sparse_matmul_24_f32 (kernels.h); only call them after
// checking the ISA (their files are compiled with -mavx2 / -mavx512*).
void sparse_matmul_f32_avx2(const float* A, int64_t M, const BsrF32& W, const float* bias,
                            Activation act, float* Y, const Parallel& par);
void sparse_matmul_f32_avx512(const float* A, int64_t M, const BsrF32& W, const float* bias,
                              Activation act, float* Y, const Parallel& par);
void sparse_matmul_24_f32_avx2(const float* A, int64_t M, const Packed24F32& W,
                               const float* bias, Activation act, float* Y, const Parallel& par);
void sparse_matmul_24_f32_avx512(const float* A, int64_t M, const Packed24F32& W,
                                 const float* bias, Activation act, float* Y,
                                 const Parallel& par);

// Splits rows [0, rows) into `parts` contiguous ranges of about equal cost, where the cost of
// rows [0, i) is cost(i) (non-decreasing, cost(0) == 0). bounds gets parts+1 entries; every
// boundary except the last is rounded down to a multiple of `align` so ranges start aligned.
template <class Cost>
static inline void split_rows(int64_t rows, int64_t parts, int64_t align, Cost cost,
                       std::vector<int64_t>& bounds) {
  bounds.assign(static_cast<size_t>(parts + 1), rows);
  bounds[0] = 0;
  const double total = static_cast<double>(cost(rows));
  for (int64_t s = 1; s < parts; ++s) {
    const double target = total * static_cast<double>(s) / static_cast<double>(parts);
    int64_t lo = 0, hi = rows;  // first i with cost(i) >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<double>(cost(mid)) < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    lo = (lo / align) * align;
    bounds[static_cast<size_t>(s)] = std::max(lo, bounds[static_cast<size_t>(s - 1)]);
  }
}

// A 64-byte aligned scratch buffer owned by the calling thread and reused across calls, so a
// kernel call does not pay for fresh pages (large allocations are mmap'ed and fault in anew).
// Worker threads of `par` may write into it while the calling thread waits in par.run.
static inline float* thread_scratch(size_t floats) {
  struct Buffer {
    float* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  static thread_local Buffer buffer;
  if (buffer.size < floats) {
    std::free(buffer.data);
    const size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
    buffer.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (buffer.data == nullptr) {
      buffer.size = 0;
      throw std::bad_alloc();
    }
    buffer.size = floats;
  }
  return buffer.data;
}

}  // namespace detail
}  // namespace graphopt


// ---------------------------------------------------------------------------------------------
// The vectorized kernels, written once over a vector-traits type V and compiled by each ISA file
// (sparse_matmul*_f32_avx2.cc / _avx512.cc) inside its own namespace GRAPHOPT_F32_SIMD_NS, so
// the AVX-512 and AVX2 instantiations never share a symbol. V provides: type T, lanes W,
// zero(), set1(x), load(p), store(p, v), fma(a, b, c), max(a, b), and
// rows_1x4(a, cols, values, row_ptr, i0, i1, y) (y[i] = row i of a BSR 1x4 matrix dotted with a).
//
// Two paths:
//  * M >= kMinMvecM: "vectorize over M" (as in sparse-ConvNet SpMM). A is packed transposed into
//    tiles At[t][k][0..Mt) (zero-padded in M and K), so each non-zero weight multiplies one
//    contiguous Mt-vector of A^T: broadcast the weight, FMA into Mt/W accumulators per output.
//    Outputs are produced as Y^T strips (outputs x Mt) in a buffer, then transposed 8x8 into
//    Y. For 1xC blocks K is also cut into panels that fit L1 (BsrPanelJob). Work = A^T tiles
//    x ranges of block rows balanced by non-zeros. 1x4 blocks on AVX-512 take a lean loop
//    over groups of rows (rows_1x4_panel: column indices read ahead, the next rows' weights
//    prefetched), K panels down to about 6 blocks per visit, and Y stores spread between rows
//    (bsr_panel_task's stage).
//  * small M: each output row is a dot product over the row's blocks; the weights are streamed
//    once per call and A (padded to whole blocks) stays in L1.
// ---------------------------------------------------------------------------------------------
#ifdef GRAPHOPT_F32_SIMD_NS
// GCC 12's AVX-512 intrinsics seed results with _mm512_undefined_ps(), which -Wall reports as
// uninitialized once inlined; the warning is about the header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

namespace graphopt {
namespace GRAPHOPT_F32_SIMD_NS {

// From this many rows of A the M-vectorized path beats the row path (measured on Zen 4 for
// 1x4, 4x1, 4x4, 16x1 at K x N = 768 x 3072: at M = 4 the row path is still faster).
constexpr int64_t kMinMvecM = 8;
constexpr int64_t kPackKChunk = 256;
// Outputs per chunk of the M-vectorized BSR path (their Y^T accumulators, chunk x Mt floats,
// stay in L2) and the bytes of A^T rows per K panel (kept in L1: 48 KiB on Zen 5, 32 on Zen 4).
constexpr int64_t kChunkOutputs = 256;
constexpr int64_t kPanelBytes = 40 * 1024;
constexpr double kMinBlocksPerVisit = 8.0;
// Rows of 1x4 blocks between copies of the staged Y lines (see bsr_panel_task).
constexpr int64_t kDrainRows = 4;
// An A^T tile up to this size stays in L2 (1 MiB) beside the weights streaming through it.
constexpr int64_t kL2TileBytes = 512 * 1024;
// Blocks per visit of a narrow (Mt = 32) K panel from which the 1x4 path takes panels.
constexpr double kMinNarrowVisit = 6.0;
constexpr int64_t kNarrowTileBytes = 256 * 1024;

// dst[c * ds + r] = src[r * ss + c] for an 8x8 block (AVX only, valid in both ISA files).
static inline void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * ss), r1 = _mm256_loadu_ps(src + 1 * ss);
  __m256 r2 = _mm256_loadu_ps(src + 2 * ss), r3 = _mm256_loadu_ps(src + 3 * ss);
  __m256 r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss);
  __m256 r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ds, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ds, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// y[n] for outputs n in [n0, n1) of a 2:4 weight and one row a of A, without vectors (the
// compiler may still vectorize it); used by the AVX2 file and for the AVX-512 tail groups.
static inline void rows_24_scalar(const float* a, const Packed24F32& W, int64_t n0, int64_t n1,
                                  int64_t g0, float* y) {
  const int64_t K = W.K, half = K / 2, stride = (K + 7) / 8, groups = K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = W.values + n * half;
    const uint8_t* idx = W.indices + n * stride;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int64_t g = g0;
    for (; g + 2 <= groups; g += 2) {  // g0 is even: one index byte per step
      const unsigned bits = idx[g / 2];
      s0 += v[2 * g] * a[4 * g + (bits & 3)];
      s1 += v[2 * g + 1] * a[4 * g + ((bits >> 2) & 3)];
      s2 += v[2 * g + 2] * a[4 * g + 4 + ((bits >> 4) & 3)];
      s3 += v[2 * g + 3] * a[4 * g + 4 + (bits >> 6)];
    }
    if (g < groups) {
      const unsigned bits = idx[g / 2];
      s0 += v[2 * g] * a[4 * g + (bits & 3)];
      s1 += v[2 * g + 1] * a[4 * g + ((bits >> 2) & 3)];
    }
    y[n] = (g0 == 0 ? 0.0f : y[n]) + ((s0 + s1) + (s2 + s3));
  }
}

// Index byte of two 2:4 groups -> the 8-bit mask of their kept positions (low nibble: the even
// group's p0, p1; high nibble: the odd group's, shifted by 4).
static constexpr uint8_t kPositions24Init(unsigned byte) {
  return static_cast<uint8_t>((1u << (byte & 3)) | (1u << ((byte >> 2) & 3)) |
                              (1u << (4 + ((byte >> 4) & 3))) | (1u << (4 + (byte >> 6))));
}
struct Positions24 {
  uint8_t m[256];
  constexpr Positions24() : m() {
    for (unsigned b = 0; b < 256; ++b) m[b] = kPositions24Init(b);
  }
};
static constexpr Positions24 kPositions24{};
// ---- vector traits (the ISA file's -m flags decide which exist) ------------------------------

#ifdef __AVX2__
struct V8 {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  // The activation over n contiguous floats (a Y^T buffer still in L1, before its transpose).
  static void activate(float* p, int64_t n, Activation act) {
    detail::apply_epilogue_row_avx2(p, n, nullptr, act);
  }
  // p[0..3] in every 128-bit lane, then lane element c splatted (register shuffles: one load
  // for a 1x4 block's four weights instead of four broadcast loads).
  static T load4(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
  template <int c>
  static T splat(T v) { return _mm256_permute_ps(v, c * 0x55); }
  // y[i] = sum over the 1x4 blocks b of row i of dot(values[b], a[4 * cols[b]]), i in [i0, i1).
  // Four blocks per step (two FMAs), then the row's last 1-3 blocks as one masked step (see the
  // AVX-512 version). The masked step's padding slots still load an A quad (the next rows'
  // columns, or the row's last one at the matrix's end), so their A lanes are zeroed as well
  // as their weights: 0 * Inf and 0 * NaN are NaN, and a padding slot must add exactly
  // nothing. The full steps take no mask: every step once went through the masked one, where
  // the two ANDs cost 5-7%; without (EPYC, AVX2 tier, against that loop before the ANDs)
  // 1.07-1.29x on one weight at M = 1 and 4 (bench/sparse_kernels.py), about 2x through
  // bench/sparse_chain.py's 6 FFN layers at M = 1 and 4.
  static void rows_1x4(const float* a, const int32_t* cols, const float* values,
                       const int32_t* row_ptr, int64_t i0, int64_t i1, float* y, int64_t nnzb) {
    static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    auto pair = [a](const int32_t* c) {  // the A quads of two blocks
      return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(a + int64_t{c[0]} * 4)),
                                  _mm_loadu_ps(a + int64_t{c[1]} * 4), 1);
    };
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b1 = row_ptr[i + 1];
      int64_t b = row_ptr[i];
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (; b + 4 <= b1; b += 4) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + b * 4), pair(cols + b), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + b * 4 + 8), pair(cols + b + 2), acc1);
      }
      if (b < b1) {
        const int64_t t = b1 - b;  // 1..3
        const int64_t lanes0 = t >= 2 ? 8 : 4, lanes1 = t > 2 ? 4 : 0;
        const __m256i m0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - lanes0));
        const __m256i m1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - lanes1));
        const int32_t* c = cols + b;
        int32_t safe[4];
        if (b + 4 > nnzb) {  // rare: only the matrix's last row(s)
          for (int64_t j = 0; j < 4; ++j) safe[j] = c[j < t ? j : t - 1];
          c = safe;
        }
        const __m256 x0 = _mm256_and_ps(_mm256_castsi256_ps(m0), pair(c));
        const __m256 x1 = _mm256_and_ps(_mm256_castsi256_ps(m1), pair(c + 2));
        acc0 = _mm256_fmadd_ps(_mm256_maskload_ps(values + b * 4, m0), x0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_maskload_ps(values + b * 4 + 8, m1), x1, acc1);
      }
      __m256 acc = _mm256_add_ps(acc0, acc1);
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
      y[i] = _mm_cvtss_f32(s4);
    }
  }
  static void rows_24(const float* a, const Packed24F32& W, int64_t n0, int64_t n1, float* y) {
    rows_24_scalar(a, W, n0, n1, 0, y);
  }
};
#endif  // __AVX2__

#ifdef __AVX512F__
struct V16 {
  using T = __m512;
  // The sum of a vector's four 128-bit quads (DQ-free: the upper half via a pd extract).
  static __m128 sum_quads(__m512 v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 h = _mm256_add_ps(lo, hi);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static void activate(float* p, int64_t n, Activation act) {
    detail::apply_epilogue_row_avx512(p, n, nullptr, act);
  }
  static T load4(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  template <int c>
  static T splat(T v) { return _mm512_permute_ps(v, c * 0x55); }
  // y[i] = sum over the 1x4 blocks b of row i of dot(values[b], a[4 * cols[b]]), i in [i0, i1).
  // Eight blocks per step as four 256-bit FMAs, each over two blocks: their values are
  // contiguous, their A quads put together by a 128-bit load and a 128-bit insert from memory
  // (cheaper than a gather instruction); then the row's last 1-7 blocks as one masked step, no
  // branch on their count. Zen 5, M = 1, BERT FFN shapes at 75% and 90%: over many weights (six
  // layers in one graph, where the branch predictor cannot learn the rows' lengths) 5-15%
  // faster than 512-bit FMAs over four blocks with the last blocks one by one; called over and
  // over on one weight (bench/sparse_kernels.py: the predictor learns them) up to 6% slower.
  // Slower in both: two rows interleaved, 16-block steps, software prefetch of the weights
  // ahead, vgatherdps, one flat stream over all rows with a (double) prefix sum of the block
  // dots instead of per-row sums (60% slower).
  // The loop is bound by loads and instructions per block, not by the FMAs, so every load and
  // op per block or row counts: a pair's two column indices come in one 64-bit load, shifted
  // to byte offsets together (one shift, then the low and high halves); each row starts where
  // the last one ended (one row_ptr load per row) and counts its full steps down. Zen 5, one
  // weight called over and over at 90%: 1.23x (768x3072) and 1.11x (3072x768) the speed of a
  // 32-bit load per index and both row_ptr entries per row; through 24 layers 1.08x. Slower
  // than that: eight rows' sums reduced together by a transpose-add tree and one vector store
  // (even on one weight, -7% through layers: there the rows' ends cost in mispredicts, not in
  // reductions), the next row's first blocks in the masked step's unused lanes (-8% on one
  // weight and through layers), 512-bit value loads (most split a cache line: -5 to -10%),
  // the column indices as one vector load and lane extracts (-9%). Skipping the masked step's
  // last two pairs when the row has 1-4 blocks left: +6% on one weight, -7% through layers.
  // The caller makes sure 16 * cols[b] fits in 32 bits (Kpad < 2^30): the shift of a pair
  // must not carry from the low index into the high one.
  static void rows_1x4(const float* a, const int32_t* cols, const float* values,
                       const int32_t* row_ptr, int64_t i0, int64_t i1, float* y, int64_t nnzb) {
    const char* a_bytes = reinterpret_cast<const char*>(a);
    auto pair = [a_bytes](const int32_t* c) {
      uint64_t q;
      std::memcpy(&q, c, sizeof(q));
      q <<= 4;  // both indices to byte offsets of their quads
      const uint64_t o0 = static_cast<uint32_t>(q), o1 = q >> 32;
      return _mm256_insertf128_ps(
          _mm256_castps128_ps256(_mm_loadu_ps(reinterpret_cast<const float*>(a_bytes + o0))),
          _mm_loadu_ps(reinterpret_cast<const float*>(a_bytes + o1)), 1);
    };
    int64_t b1 = row_ptr[i0];
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b = b1;
      b1 = row_ptr[i + 1];
      __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      const int32_t* c = cols + b;
      const float* v = values + b * 4;
      for (int64_t steps = (b1 - b) >> 3; steps > 0; --steps, c += 8, v += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), pair(c), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 8), pair(c + 2), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 16), pair(c + 4), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 24), pair(c + 6), acc3);
      }
      b = c - cols;
      if (b < b1) {
        // The row's last 1-7 blocks as one masked 8-block step: no branch on their count.
        // Lanes past the row keep acc (mask3: their A quads belong to other rows' columns).
        const uint32_t live = (1u << (4 * (b1 - b))) - 1u;
        int32_t safe[8];
        if (b + 8 > nnzb) {  // the matrix's last rows: no column reads past the end
          for (int64_t j = 0; j < 8; ++j) safe[j] = b + j < b1 ? c[j] : 0;
          c = safe;
        }
        const __mmask32 k = _cvtu32_mask32(live);
        const __mmask8 m0 = static_cast<__mmask8>(k);
        const __mmask8 m1 = static_cast<__mmask8>(_kshiftri_mask32(k, 8));
        const __mmask8 m2 = static_cast<__mmask8>(_kshiftri_mask32(k, 16));
        const __mmask8 m3 = static_cast<__mmask8>(_kshiftri_mask32(k, 24));
        acc0 = _mm256_mask3_fmadd_ps(_mm256_maskz_loadu_ps(m0, v), pair(c), acc0, m0);
        acc1 = _mm256_mask3_fmadd_ps(_mm256_maskz_loadu_ps(m1, v + 8), pair(c + 2), acc1, m1);
        acc2 = _mm256_mask3_fmadd_ps(_mm256_maskz_loadu_ps(m2, v + 16), pair(c + 4), acc2, m2);
        acc3 = _mm256_mask3_fmadd_ps(_mm256_maskz_loadu_ps(m3, v + 24), pair(c + 6), acc3, m3);
      }
      const __m256 s = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
      __m128 acc4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      acc4 = _mm_add_ps(acc4, _mm_movehl_ps(acc4, acc4));
      acc4 = _mm_add_ss(acc4, _mm_movehdup_ps(acc4));
      y[i] = _mm_cvtss_f32(acc4);
    }
  }
  // rows_1x4 for MR rows of A at once (row m at a + m * lda, its outputs at y + m * ldy):
  // each block's column index and values are loaded once for all MR rows, only the A quads
  // per row. Four blocks per step (two FMAs per row of A), then pairs, then a last odd block.
  // As in rows_1x4, the four indices of a step come in two 64-bit loads as byte offsets and
  // each row starts where the last ended (Zen 5, 90%: 1.16x at M = 2, 1.04-1.08x at M = 4
  // and 7 for 768x3072; 1.04x through 24 layers). Same bound on the indices (Kpad < 2^30).
  template <int MR>
  static void rows_1x4_m(const float* a, int64_t lda, const int32_t* cols, const float* values,
                         const int32_t* row_ptr, int64_t i0, int64_t i1, float* y,
                         int64_t ldy) {
    auto pair = [](const float* p0, const float* p1) {
      return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p0)), _mm_loadu_ps(p1), 1);
    };
    const char* a_bytes = reinterpret_cast<const char*>(a);
    auto at = [](const char* p, uint64_t o) { return reinterpret_cast<const float*>(p + o); };
    int64_t b1 = row_ptr[i0];
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b = b1;
      b1 = row_ptr[i + 1];
      __m256 acc0[MR], acc1[MR];
      __m128 acc4[MR];
      for (int m = 0; m < MR; ++m) {
        acc0[m] = _mm256_setzero_ps();
        acc1[m] = _mm256_setzero_ps();
        acc4[m] = _mm_setzero_ps();
      }
      for (; b + 4 <= b1; b += 4) {
        const __m256 v0 = _mm256_loadu_ps(values + b * 4), v1 = _mm256_loadu_ps(values + b * 4 + 8);
        uint64_t q01, q23;
        std::memcpy(&q01, cols + b, sizeof(q01));
        std::memcpy(&q23, cols + b + 2, sizeof(q23));
        q01 <<= 4;
        q23 <<= 4;
        const uint64_t o0 = static_cast<uint32_t>(q01), o1 = q01 >> 32;
        const uint64_t o2 = static_cast<uint32_t>(q23), o3 = q23 >> 32;
        for (int m = 0; m < MR; ++m) {
          const char* am = a_bytes + m * lda * int64_t{sizeof(float)};
          acc0[m] = _mm256_fmadd_ps(v0, pair(at(am, o0), at(am, o1)), acc0[m]);
          acc1[m] = _mm256_fmadd_ps(v1, pair(at(am, o2), at(am, o3)), acc1[m]);
        }
      }
      for (; b + 2 <= b1; b += 2) {
        const __m256 v0 = _mm256_loadu_ps(values + b * 4);
        const int64_t o0 = int64_t{cols[b]} * 4, o1 = int64_t{cols[b + 1]} * 4;
        for (int m = 0; m < MR; ++m) {
          const float* am = a + m * lda;
          acc0[m] = _mm256_fmadd_ps(v0, pair(am + o0, am + o1), acc0[m]);
        }
      }
      if (b < b1) {
        const __m128 v = _mm_loadu_ps(values + b * 4);
        const int64_t o = int64_t{cols[b]} * 4;
        for (int m = 0; m < MR; ++m) acc4[m] = _mm_mul_ps(v, _mm_loadu_ps(a + m * lda + o));
      }
      for (int m = 0; m < MR; ++m) {
        const __m256 s = _mm256_add_ps(acc0[m], acc1[m]);
        __m128 t = _mm_add_ps(acc4[m], _mm_add_ps(_mm256_castps256_ps128(s),
                                                  _mm256_extractf128_ps(s, 1)));
        t = _mm_add_ps(t, _mm_movehl_ps(t, t));
        t = _mm_add_ss(t, _mm_movehdup_ps(t));
        y[m * ldy + i] = _mm_cvtss_f32(t);
      }
    }
  }
  // y[n] for outputs n in [n0, n1) of a 2:4 weight: per 16 k's (4 groups, 2 index bytes) the
  // 8 kept values are expanded to their positions (vexpandps under a mask read from a table
  // indexed by the index byte), then one FMA with 16 contiguous floats of A, under the same
  // mask: a position the group did not keep holds no weight and must add nothing, where a zero
  // weight times an Inf or NaN of A would add NaN. The FMA's merge mask (keep acc there) costs
  // nothing; zero-masked A loads instead were 4-6% slower at M = 1 and 4 (Zen).
  static void rows_24(const float* a, const Packed24F32& W, int64_t n0, int64_t n1, float* y) {
    const int64_t K = W.K, half = K / 2, stride = (K + 7) / 8, steps = K / 16;
    for (int64_t n = n0; n < n1; ++n) {
      const float* v = W.values + n * half;
      const uint8_t* idx = W.indices + n * stride;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t q = 0;
      for (; q + 2 <= steps; q += 2) {
        const __mmask16 m0 = static_cast<__mmask16>(
            kPositions24.m[idx[2 * q]] | (kPositions24.m[idx[2 * q + 1]] << 8));
        const __mmask16 m1 = static_cast<__mmask16>(
            kPositions24.m[idx[2 * q + 2]] | (kPositions24.m[idx[2 * q + 3]] << 8));
        const __m512 w = _mm512_loadu_ps(v + 8 * q);  // the 16 kept values of 32 k's
        const __m512 w0 = _mm512_maskz_expand_ps(m0, w);
        const __m512 w1 = _mm512_maskz_expand_ps(m1, _mm512_shuffle_f32x4(w, w, 0x4E));
        acc0 = _mm512_mask3_fmadd_ps(w0, _mm512_loadu_ps(a + 16 * q), acc0, m0);
        acc1 = _mm512_mask3_fmadd_ps(w1, _mm512_loadu_ps(a + 16 * q + 16), acc1, m1);
      }
      if (q < steps) {
        const __mmask16 m0 = static_cast<__mmask16>(
            kPositions24.m[idx[2 * q]] | (kPositions24.m[idx[2 * q + 1]] << 8));
        const __m512 w = _mm512_castps256_ps512(_mm256_loadu_ps(v + 8 * q));
        const __m512 w0 = _mm512_maskz_expand_ps(m0, w);
        acc0 = _mm512_mask3_fmadd_ps(w0, _mm512_loadu_ps(a + 16 * q), acc0, m0);
        ++q;
      }
      y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
    if (steps * 4 < K / 4) rows_24_scalar(a, W, n0, n1, steps * 4, y);  // the last 1-3 groups
  }
};
#endif  // __AVX512F__

#ifdef __AVX512F__
// dst[c * ds + r] = src[r * ss + c] for a 16x16 block: each Y row gets one 64-byte store (a
// whole cache line when aligned) instead of two 32-byte halves written at different times,
// and a quarter fewer shuffles per float than 8x8.
static inline void transpose16x16(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    const __m512 r0 = _mm512_loadu_ps(src + (2 * i) * ss);
    const __m512 r1 = _mm512_loadu_ps(src + (2 * i + 1) * ss);
    a[2 * i] = _mm512_unpacklo_ps(r0, r1);
    a[2 * i + 1] = _mm512_unpackhi_ps(r0, r1);
  }
  // b[4g + c], 128-bit lane L: rows 4g..4g+3 at column 4L + c.
  for (int g = 0; g < 4; ++g) {
    const __m512d a0 = _mm512_castps_pd(a[4 * g]), a1 = _mm512_castps_pd(a[4 * g + 1]);
    const __m512d a2 = _mm512_castps_pd(a[4 * g + 2]), a3 = _mm512_castps_pd(a[4 * g + 3]);
    b[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    b[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    b[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    b[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  // For each c, a 4x4 transpose of 128-bit lanes across b[c], b[4 + c], b[8 + c], b[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512 u0 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0xDD);
    _mm512_storeu_ps(dst + (0 + c) * ds, _mm512_shuffle_f32x4(u0, u2, 0x88));
    _mm512_storeu_ps(dst + (4 + c) * ds, _mm512_shuffle_f32x4(u1, u3, 0x88));
    _mm512_storeu_ps(dst + (8 + c) * ds, _mm512_shuffle_f32x4(u0, u2, 0xDD));
    _mm512_storeu_ps(dst + (12 + c) * ds, _mm512_shuffle_f32x4(u1, u3, 0xDD));
  }
}
#endif

// ---- packing A^T ---------------------------------------------------------------------------

struct PackJob {
  const float* A;
  int64_t M, K, Kpad, Mt, kchunks;
  float* At;  // [tiles][Kpad][Mt]
};

// tile[k * Mt + q] = A[(m0 + q) * K + k] for q in [q0, q1), k in [k0, k1) (both ranges start at a
// multiple of 8), zero where k >= K or q >= mv: 8x8 transposes, element by element at the edges.
static void pack_rect(const float* A, int64_t K, int64_t Mt, int64_t m0, int64_t mv, int64_t q0,
                      int64_t q1, int64_t k0, int64_t k1, float* tile) {
  for (int64_t k = k0; k < k1; k += 8) {
    const int64_t kn = std::min<int64_t>(8, k1 - k);
    for (int64_t mm = q0; mm < q1; mm += 8) {
      if (kn == 8 && k + 8 <= K && mm + 8 <= mv) {
        transpose8x8(A + (m0 + mm) * K + k, K, tile + k * Mt + mm, Mt);
        continue;
      }
      for (int64_t kk = k; kk < k + kn; ++kk) {
        for (int64_t q = mm; q < mm + 8; ++q) {
          tile[kk * Mt + q] = (kk < K && q < mv) ? A[(m0 + q) * K + kk] : 0.0f;
        }
      }
    }
  }
}

static void pack_task(void* arg, size_t index) {
  const PackJob& j = *static_cast<const PackJob*>(arg);
  const int64_t t = static_cast<int64_t>(index) / j.kchunks;
  const int64_t k0 = (static_cast<int64_t>(index) % j.kchunks) * kPackKChunk;
  const int64_t k1 = std::min(j.Kpad, k0 + kPackKChunk);
  const int64_t m0 = t * j.Mt, mv = std::min(j.Mt, j.M - m0);
  float* tile = j.At + t * j.Kpad * j.Mt;
  int64_t q16 = 0, k16 = k0;
#ifdef __AVX512F__
  // 16x16 transposes read and write whole 64-byte lines; 16 rows of A at a time (m outer)
  // read as 16 sequential streams, which the hardware prefetchers follow (all Mt rows at once
  // were too many streams: the pack took a fifth of the kernel's time at K = 3072).
  q16 = mv / 16 * 16;
  k16 = k0 + std::max<int64_t>(0, std::min(k1, j.K) - k0) / 16 * 16;
  for (int64_t mm = 0; mm < q16; mm += 16) {
    for (int64_t k = k0; k < k16; k += 16) {
      transpose16x16(j.A + (m0 + mm) * j.K + k, j.K, tile + k * j.Mt + mm, j.Mt);
    }
  }
#endif
  pack_rect(j.A, j.K, j.Mt, m0, mv, 0, q16, k16, k1, tile);
  pack_rect(j.A, j.K, j.Mt, m0, mv, q16, j.Mt, k0, k1, tile);
}

// Packs A [M, K] into zero-padded A^T tiles of Mt columns; returns the tiles' base.
static inline float* pack_transposed(const float* A, int64_t M, int64_t K, int64_t Kpad,
                                     int64_t Mt, const Parallel& par) {
  const int64_t tiles = (M + Mt - 1) / Mt;
  float* At = detail::thread_scratch(static_cast<size_t>(tiles * Kpad * Mt));
  PackJob job{A, M, K, Kpad, Mt, (Kpad + kPackKChunk - 1) / kPackKChunk, At};
  par.run(par, static_cast<size_t>(tiles * job.kchunks), &pack_task, &job);
  return At;
}

// Y[mm, q] = buf[q * Mt + mm] for outputs q in [q0, q1) and rows mm in [m0, m1), 8x8 at a time.
static inline void store_transposed_rect(const float* buf, int64_t Mt, int64_t q0, int64_t q1,
                                         int64_t m0, int64_t m1, float* y, int64_t N) {
  for (int64_t q = q0; q < q1; q += 8) {
    for (int64_t mm = m0; mm < m1; mm += 8) {
      if (q + 8 <= q1 && mm + 8 <= m1) {
        transpose8x8(buf + q * Mt + mm, Mt, y + mm * N + q, N);
        continue;
      }
      for (int64_t qq = q; qq < std::min(q + 8, q1); ++qq) {
        for (int64_t m = mm; m < std::min(mm + 8, m1); ++m) y[m * N + qq] = buf[qq * Mt + m];
      }
    }
  }
}

// Y[mm, q] = buf[q * Mt + mm] for q < nn outputs and mm < mv rows (Y's row stride N).
static inline void store_transposed(const float* buf, int64_t Mt, int64_t nn, int64_t mv,
                                    float* y, int64_t N) {
  int64_t q16 = 0, m16 = 0;
#ifdef __AVX512F__
  q16 = nn / 16 * 16;
  m16 = mv / 16 * 16;
  for (int64_t q = 0; q < q16; q += 16) {
    for (int64_t mm = 0; mm < m16; mm += 16) {
      transpose16x16(buf + q * Mt + mm, Mt, y + mm * N + q, N);
    }
  }
#endif
  store_transposed_rect(buf, Mt, q16, nn, 0, mv, y, N);
  store_transposed_rect(buf, Mt, 0, q16, m16, mv, y, N);
}

// ---- the M-vectorized BSR kernel -----------------------------------------------------------

// Rows [r0, r0 + RS) of a block row, its blocks from b0 on while b < b1 and col_idx[b] <
// col_end (the K panel's end), over one A^T tile of NV vectors (Mt = NV * W), accumulated into
// io[r * Mt + m] += sum_b,c values[b, r0 + r, c] * At[col_idx[b] * C + c][m]; returns the first
// block not done. CC is C when known at compile time (0: read W.C). With few accumulators the
// c loop rotates over NA sets so back-to-back FMAs into one register do not wait on each
// other's latency (2 FMAs/cycle x 4 cycles wants 8 independent chains). For C = 4 a block's
// weights take one load and register shuffles: the kernel is bound by loads (one A^T vector
// per FMA), so every broadcast load saved counts.
template <class V, int RS, int NV, int CC>
static int64_t bsr_slice(const BsrF32& W, int64_t b0, int64_t b1, int32_t col_end, int64_t r0,
                         const float* At, float* io) {
  using T = typename V::T;
  constexpr int64_t Mt = int64_t{NV} * V::W;
  constexpr int NA = (CC != 0 && CC % 4 == 0 && RS * NV <= 4)   ? 4
                     : (CC != 0 && CC % 2 == 0 && RS * NV < 8) ? 2
                                                               : 1;
  const int64_t C = CC != 0 ? CC : W.C;
  const int64_t R = W.R;
  T acc[NA][RS][NV];
  for (int r = 0; r < RS; ++r) {
    for (int j = 0; j < NV; ++j) {
      acc[0][r][j] = V::load(io + r * Mt + j * V::W);
      for (int s = 1; s < NA; ++s) acc[s][r][j] = V::zero();
    }
  }
  int64_t b = b0;
  for (; b < b1; ++b) {
    const int32_t col = W.col_idx[b];
    if (col >= col_end) break;
    const float* a = At + static_cast<int64_t>(col) * C * Mt;
    const float* v = W.values + (b * R + r0) * C;
    if constexpr (CC == 4) {
      T w4[RS];
      for (int r = 0; r < RS; ++r) w4[r] = V::load4(v + r * C);
      auto step = [&](auto cc) {
        constexpr int c = decltype(cc)::value;
        T x[NV];
        for (int j = 0; j < NV; ++j) x[j] = V::load(a + c * Mt + j * V::W);
        for (int r = 0; r < RS; ++r) {
          const T w = V::template splat<c>(w4[r]);
          for (int j = 0; j < NV; ++j) acc[c % NA][r][j] = V::fma(w, x[j], acc[c % NA][r][j]);
        }
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
    } else {
      for (int64_t c = 0; c < C; ++c) {
        T x[NV];
        for (int j = 0; j < NV; ++j) x[j] = V::load(a + c * Mt + j * V::W);
        for (int r = 0; r < RS; ++r) {
          const T w = V::set1(v[r * C + c]);
          for (int j = 0; j < NV; ++j) acc[c % NA][r][j] = V::fma(w, x[j], acc[c % NA][r][j]);
        }
      }
    }
  }
  for (int r = 0; r < RS; ++r) {
    for (int j = 0; j < NV; ++j) {
      T sum = acc[0][r][j];
      for (int s = 1; s < NA; ++s) sum = V::add(sum, acc[s][r][j]);
      V::store(io + r * Mt + j * V::W, sum);
    }
  }
  return b;
}

using BsrSliceFn = int64_t (*)(const BsrF32&, int64_t, int64_t, int32_t, int64_t, const float*,
                              float*);

template <class V, int RS, int NV>
static BsrSliceFn pick_slice_c(int64_t C) {
  switch (C) {
    case 1:
      return &bsr_slice<V, RS, NV, 1>;
    case 2:
      return &bsr_slice<V, RS, NV, 2>;
    case 4:
      return &bsr_slice<V, RS, NV, 4>;
    case 8:
      return &bsr_slice<V, RS, NV, 8>;
    default:
      return &bsr_slice<V, RS, NV, 0>;
  }
}

template <class V, int NV>
static BsrSliceFn pick_slice(int RS, int64_t C) {
  switch (RS) {
    case 8:
      return pick_slice_c<V, 8, NV>(C);
    case 4:
      return pick_slice_c<V, 4, NV>(C);
    case 2:
      return pick_slice_c<V, 2, NV>(C);
    default:
      return pick_slice_c<V, 1, NV>(C);
  }
}

template <class V>
static BsrSliceFn pick_slice_nv(int RS, int NV, int64_t C) {
  switch (NV) {
    case 8:
      return pick_slice<V, 8>(RS, C);
    case 4:
      return pick_slice<V, 4>(RS, C);
    case 2:
      return pick_slice<V, 2>(RS, C);
    default:
      return pick_slice<V, 1>(RS, C);
  }
}

// 1x4 blocks, one A^T tile of NV vectors: block rows [i0, i1), each continued from its
// cursor[i - i0] while col_idx < col_end (and the cursor advanced), accumulated into
// io[(i - i0) * Mt + m]. bsr_slice<V, 1, NV, 4> in one call for a group of rows: the call,
// the slices loop and the accumulators' reload cost as much as a few blocks per visit, and a
// visit of a K panel holds only about 10 blocks at 75% sparsity. Row i prefetches the next
// visit's weights of row i + kPrefetchRows when that row is below pf_end (the chunk's end, as
// far as cursor[] reaches; 0 = no prefetch).
//
// With the full tile (NV = 4: 16 FMAs per block) two latencies, not the FMA or load ports,
// held the loop to about one FMA per cycle (Zen 5, measured in isolation with A^T in L1):
//  * each block's 16 A^T loads take their address from the block's col_idx, itself a load;
//    reading the column index kLookahead blocks early (a few register moves and a clamped
//    load per block) has the address ready when the loads issue: 6.2 -> 6.9 G FMA/s alone.
//  * a visit starts on its row's next values/col_idx lines, which the hardware prefetchers,
//    seeing hundreds of interleaved rows, do not fetch (from L2, or for K = 3072 often from L3:
//    a chunk's weights plus the A^T tile outgrow L2): prefetched kPrefetchRows rows ahead.
// Together 8-14% faster at 75% sparsity, M = 128 (the prefetch alone: 3% at K = 768, 9% at
// K = 3072). The narrow tile (NV <= 2, high sparsity: 8 FMAs per block, ~8 blocks per visit)
// measured 5-10% slower with the look-ahead, so it keeps the plain loop; the prefetch gains it
// 7% where the weights leave L2 (K = 3072, 90%) and loses 1% where they stay (K = 768), so
// bsr_f32 asks for it by the working set (BsrPanelJob::prefetch).
// (Also tried, slower or no better here: 2 blocks per step, 16 weights per load with vpermps,
// 16 accumulators, a 6 or 8 block look-ahead, NV = 8 for M = 128, prefetching the next
// panel's A^T rows into L2, smaller K panels or chunks.)
constexpr int kLookahead = 4;
constexpr int64_t kPrefetchRows = 2;

template <class V, int NV>
static void rows_1x4_panel(const BsrF32& W, int64_t i0, int64_t i1, int64_t* cursor,
                           int32_t col_end, const float* At, float* io, int64_t pf_end) {
  using T = typename V::T;
  constexpr int64_t Mt = int64_t{NV} * V::W;
  constexpr int NA = NV >= 4 ? 2 : 4;  // 8 or more independent FMA chains
  constexpr int D = NV >= 4 ? kLookahead : 1;
  const int32_t* cols = W.col_idx;
  const float* values = W.values;
  for (int64_t i = i0; i < i1; ++i, io += Mt) {
    int64_t b = cursor[i - i0];
    const int64_t e = W.row_ptr[i + 1];
    if (i + kPrefetchRows < pf_end) {
      // About the next visit's blocks of that row (10 at 75% sparsity: 160 + 40 bytes).
      const int64_t bp = cursor[i + kPrefetchRows - i0];
      const char* pv = reinterpret_cast<const char*>(values + bp * 4);
      const char* pc = reinterpret_cast<const char*>(cols + bp);
      _mm_prefetch(pv, _MM_HINT_T0);
      _mm_prefetch(pv + 64, _MM_HINT_T0);
      _mm_prefetch(pv + 128, _MM_HINT_T0);
      _mm_prefetch(pv + 192, _MM_HINT_T0);
      _mm_prefetch(pc, _MM_HINT_T0);
      _mm_prefetch(pc + 64, _MM_HINT_T0);
    }
    if (b == e) continue;
    T acc[NA][NV];
    for (int j = 0; j < NV; ++j) {
      acc[0][j] = V::load(io + j * V::W);
      for (int s = 1; s < NA; ++s) acc[s][j] = V::zero();
    }
    // ahead[d] = col_idx[b + d], clamped to the row's last block (never read past the row).
    int32_t ahead[D] = {};
    if constexpr (D > 1) {
      for (int d = 0; d < D; ++d) ahead[d] = cols[std::min<int64_t>(b + d, e - 1)];
    }
    for (; b < e; ++b) {
      int32_t col;
      if constexpr (D > 1) {
        col = ahead[0];
        for (int d = 0; d + 1 < D; ++d) ahead[d] = ahead[d + 1];
        ahead[D - 1] = cols[std::min<int64_t>(b + D, e - 1)];
      } else {
        col = cols[b];
      }
      if (col >= col_end) break;
      const float* a = At + static_cast<int64_t>(col) * 4 * Mt;
      const T w4 = V::load4(values + b * 4);
      auto step = [&](auto cc) {
        constexpr int c = decltype(cc)::value;
        const T w = V::template splat<c>(w4);
        for (int j = 0; j < NV; ++j) {
          acc[c % NA][j] = V::fma(w, V::load(a + c * Mt + j * V::W), acc[c % NA][j]);
        }
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
    }
    cursor[i - i0] = b;
    for (int j = 0; j < NV; ++j) {
      T sum = acc[0][j];
      for (int s = 1; s < NA; ++s) sum = V::add(sum, acc[s][j]);
      V::store(io + j * V::W, sum);
    }
  }
}

using Rows1x4Fn = void (*)(const BsrF32&, int64_t, int64_t, int64_t*, int32_t, const float*,
                           float*, int64_t);

template <class V>
static Rows1x4Fn pick_rows_1x4(int nv) {
  switch (nv) {  // the AVX-512 file caps nv at 4
    case 4:
      return &rows_1x4_panel<V, 4>;
    case 2:
      return &rows_1x4_panel<V, 2>;
    default:
      return &rows_1x4_panel<V, 1>;
  }
}

// One slice of a block row: rows [r0, r0 + rs) computed by fn.
struct Slice {
  int64_t r0;
  int rs;
  BsrSliceFn fn;
};

// The M-vectorized BSR work: one task = one A^T tile x a range of block rows. Rows are taken
// in chunks whose Y^T accumulators (chunk outputs x Mt) live in a buffer in L2, and K in panels
// whose A^T rows (panel x Mt floats) fit L1: for each panel every row of the chunk continues
// from where the previous panel stopped (col_idx increases within a row). Without the panels
// each weight's FMAs would read A^T rows from L2, and L2 bandwidth would bound the kernel.
struct BsrPanelJob {
  const BsrF32* W;
  const float* bias;
  const float* At;
  float* Y;
  int64_t M, Kpad, Mt, nsplit, chunk, panel_cols;
  Activation act;
  std::vector<Slice> slices;
  std::vector<int64_t> bounds;  // nsplit + 1 block-row boundaries
  Rows1x4Fn rows_1x4 = nullptr;  // the 1x4 fast path, else the slices
  bool prefetch = false;         // rows_1x4 prefetches the weights of rows ahead
};

template <class V>
static void bsr_panel_task(void* arg, size_t index) {
  const BsrPanelJob& j = *static_cast<const BsrPanelJob*>(arg);
  const BsrF32& W = *j.W;
  const int64_t t = static_cast<int64_t>(index) / j.nsplit;
  const int64_t s = static_cast<int64_t>(index) % j.nsplit;
  const int64_t i0 = j.bounds[static_cast<size_t>(s)], i1 = j.bounds[static_cast<size_t>(s + 1)];
  if (i0 >= i1) return;
  const int64_t R = W.R, N = W.N, Mt = j.Mt;
  const int64_t m0 = t * Mt, mv = std::min(Mt, j.M - m0);
  const int64_t block_cols = j.Kpad / W.C;
  const float* At = j.At + t * j.Kpad * Mt;
  float* y = j.Y + m0 * N;
  std::vector<float> acc_owner(static_cast<size_t>(j.chunk * R * Mt));
  std::vector<int64_t> cursor(static_cast<size_t>(j.chunk));
  float* acc = acc_owner.data();
  // Block rows per Y store: whole 16x16 transposes on AVX-512.
  const int64_t group = std::max<int64_t>(1, V::W / R);
  // The 1x4 path's staged group: Y rows m of W outputs at stage[m * W], rows [drained,
  // pending) not yet copied to stage_y[m * N].
  std::vector<float> stage_owner(j.rows_1x4 != nullptr ? static_cast<size_t>(V::W * Mt) : 0);
  float* stage = stage_owner.data();
  float* stage_y = nullptr;
  int64_t pending = 0, drained = 0;
  auto drain = [&](int64_t upto) {
    for (; drained < upto; ++drained) {
      V::store(stage_y + drained * N, V::load(stage + drained * V::W));
    }
  };
  for (int64_t c0 = i0; c0 < i1; c0 += j.chunk) {
    const int64_t c1 = std::min(i1, c0 + j.chunk);
    const int64_t n0 = c0 * R;
    for (int64_t n = n0; n < c1 * R; ++n) {
      const typename V::T b = V::set1(j.bias != nullptr && n < N ? j.bias[n] : 0.0f);
      for (int64_t m = 0; m < Mt; m += V::W) V::store(acc + (n - n0) * Mt + m, b);
    }
    for (int64_t i = c0; i < c1; ++i) cursor[static_cast<size_t>(i - c0)] = W.row_ptr[i];
    const int64_t pf_end = j.prefetch ? c1 : 0;
    for (int64_t p = 0; p < block_cols; p += j.panel_cols) {
      // The last panel takes every block left (no col_idx compare can stop it early).
      const bool last = p + j.panel_cols >= block_cols;
      const int32_t col_end =
          last ? std::numeric_limits<int32_t>::max() : static_cast<int32_t>(p + j.panel_cols);
      for (int64_t g0 = c0; g0 < c1; g0 += group) {
        const int64_t g1 = std::min(c1, g0 + group);
        if (j.rows_1x4 != nullptr && last) {
          // Y's previous group leaves the stage a few lines after each few rows: a Y store
          // that misses the cache (Y of N = 3072 outputs is bigger than L2) then waits while
          // FMAs go on, instead of 16x16 transposes' worth of them filling the store queue
          // and stalling the next stores (about a fifth of the time at 90% sparsity).
          for (int64_t r = g0; r < g1; r += kDrainRows) {
            const int64_t r1 = std::min(g1, r + kDrainRows);
            j.rows_1x4(W, r, r1, cursor.data() + (r - c0), col_end, At, acc + (r - c0) * Mt,
                       pf_end);
            drain((pending * (r1 - g0) + group - 1) / group);
          }
          drain(pending);
        } else if (j.rows_1x4 != nullptr) {
          j.rows_1x4(W, g0, g1, cursor.data() + (g0 - c0), col_end, At, acc + (g0 - c0) * Mt,
                     pf_end);
        } else {
          for (int64_t i = g0; i < g1; ++i) {
            const int64_t b0 = cursor[static_cast<size_t>(i - c0)], e = W.row_ptr[i + 1];
            if (b0 == e) continue;
            float* out = acc + (i - c0) * R * Mt;
            int64_t b1 = b0;
            for (const Slice& sl : j.slices) {
              b1 = sl.fn(W, b0, e, col_end, sl.r0, At, out + sl.r0 * Mt);
            }
            cursor[static_cast<size_t>(i - c0)] = b1;
          }
        }
        if (!last) continue;
        // A finished group goes to Y at once (its stores overlap the next group's FMAs), the
        // activation on Y^T while it is in cache (padding rows m >= mv included: harmless).
        const int64_t gn0 = g0 * R, gn1 = std::min(g1 * R, N);
        float* gacc = acc + (g0 - c0) * R * Mt;
        if (j.act != Activation::None) V::activate(gacc, (gn1 - gn0) * Mt, j.act);
        if (j.rows_1x4 != nullptr && gn1 - gn0 == V::W) {
          store_transposed(gacc, Mt, V::W, mv, stage, V::W);
          stage_y = y + gn0;
          pending = mv;
          drained = 0;
        } else {
          store_transposed(gacc, Mt, gn1 - gn0, mv, y + gn0, N);
        }
      }
    }
  }
  drain(pending);
}

// The plain M-vectorized loop (used by 2:4): Rows gives R() outputs per row and
// rows(i, At_tile, out, Mt), which writes row i's R x Mt results (bias included) to out.
template <class Rows>
struct MvecJob {
  const Rows* rows;
  const float* At;
  float* Y;
  int64_t M, N, Kpad, Mt, nsplit, unit;
  Activation act;
  std::vector<int64_t> bounds;  // nsplit + 1 block-row boundaries
};

template <class V, class Rows>
static void mvec_task(void* arg, size_t index) {
  const MvecJob<Rows>& j = *static_cast<const MvecJob<Rows>*>(arg);
  const int64_t t = static_cast<int64_t>(index) / j.nsplit;
  const int64_t s = static_cast<int64_t>(index) % j.nsplit;
  const int64_t i0 = j.bounds[static_cast<size_t>(s)], i1 = j.bounds[static_cast<size_t>(s + 1)];
  if (i0 >= i1) return;
  const int64_t R = j.rows->R(), Mt = j.Mt;
  const int64_t m0 = t * Mt, mv = std::min(Mt, j.M - m0);
  const float* At = j.At + t * j.Kpad * Mt;
  float* y = j.Y + m0 * j.N;
  std::vector<float> buf_owner(static_cast<size_t>(j.unit * R * Mt) + V::W);
  float* buf = buf_owner.data();
  for (int64_t i = i0; i < i1; i += j.unit) {
    const int64_t ie = std::min(i + j.unit, i1);
    for (int64_t ii = i; ii < ie; ++ii) j.rows->rows(ii, At, buf + (ii - i) * R * Mt, Mt);
    const int64_t n0 = i * R, n1 = std::min(ie * R, j.N);
    if (j.act != Activation::None) V::activate(buf, (n1 - n0) * Mt, j.act);
    store_transposed(buf, Mt, n1 - n0, mv, y + n0, j.N);
  }
}

// Chooses Mt = NV * W for M rows: up to max_nv vectors, fewer for small M.
template <class V>
static int choose_nv(int64_t M, int max_nv) {
  const int64_t need = (M + V::W - 1) / V::W;
  int nv = 1;
  while (nv < max_nv && nv < need) nv *= 2;
  return nv;
}

template <class V, class Rows>
static void run_mvec(const Rows& rows, int64_t block_rows, const float* At, float* Y, int64_t M,
                     int64_t N, int64_t Kpad, int64_t Mt, Activation act, const Parallel& par) {
  MvecJob<Rows> job;
  job.rows = &rows;
  job.At = At;
  job.Y = Y;
  job.M = M;
  job.N = N;
  job.Kpad = Kpad;
  job.Mt = Mt;
  job.act = act;
  const int64_t R = rows.R();
  job.unit = std::max<int64_t>(1, V::W / R);  // whole 16x16 transposes on AVX-512
  const int64_t tiles = (M + Mt - 1) / Mt;
  job.nsplit = par.threads > 1 ? std::max<int64_t>(1, (3 * par.threads + tiles - 1) / tiles) : 1;
  job.nsplit = std::min(job.nsplit, std::max<int64_t>(1, block_rows / job.unit));
  // Every row costs the same here (2:4 keeps half of every row).
  detail::split_rows(block_rows, job.nsplit, job.unit, [](int64_t i) { return i; }, job.bounds);
  par.run(par, static_cast<size_t>(tiles * job.nsplit), &mvec_task<V, Rows>, &job);
}

// ---- small-M BSR path ----------------------------------------------------------------------

// R outputs of block row i for one row a of A (padded to whole blocks): compile-time R, C
// where given (0: read from W).
template <int RR, int CC>
static void bsr_row_dot(const BsrF32& W, int64_t i, const float* a, float* out) {
  const int64_t R = RR != 0 ? RR : W.R, C = CC != 0 ? CC : W.C;
  float acc[RR != 0 ? RR : 1] = {};
  float* accp = RR != 0 ? acc : out;  // runtime R: accumulate in place
  for (int64_t r = 0; r < R; ++r) accp[r] = 0.0f;
  for (int64_t b = W.row_ptr[i]; b < W.row_ptr[i + 1]; ++b) {
    const float* x = a + static_cast<int64_t>(W.col_idx[b]) * C;
    const float* v = W.values + b * R * C;
    for (int64_t r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t c = 0; c < C; ++c) s += v[r * C + c] * x[c];
      accp[r] += s;
    }
  }
  if (RR != 0) {
    for (int64_t r = 0; r < R; ++r) out[r] = acc[r];
  }
}

// Outputs of block rows [i0, i1) for one row a of A into y (Y's row, from n = 0).
using RowsFn = void (*)(const BsrF32&, int64_t, int64_t, const float*, float*);

// Calls row(i, out) for block rows [i0, i1), out = R outputs; the last block row, when it
// sticks out past N, goes through a scratch row.
template <class RowFn>
static void for_block_rows(const BsrF32& W, int64_t i0, int64_t i1, float* y, RowFn row) {
  const int64_t R = W.R;
  std::vector<float> tail;
  for (int64_t i = i0; i < i1; ++i) {
    if ((i + 1) * R <= W.N) {
      row(i, y + i * R);
    } else {
      tail.assign(static_cast<size_t>(R), 0.0f);
      row(i, tail.data());
      for (int64_t r = 0; i * R + r < W.N; ++r) y[i * R + r] = tail[static_cast<size_t>(r)];
    }
  }
}

template <int RR, int CC>
static void bsr_rows(const BsrF32& W, int64_t i0, int64_t i1, const float* a, float* y) {
  for_block_rows(W, i0, i1, y, [&](int64_t i, float* out) { bsr_row_dot<RR, CC>(W, i, a, out); });
}

template <class V>
static void rows_1x4(const BsrF32& W, int64_t i0, int64_t i1, const float* a, float* y) {
  V::rows_1x4(a, W.col_idx, W.values, W.row_ptr, i0, i1, y, W.nnzb);
}

#ifdef __AVX512F__
// 1x4 blocks for M rows of A (padded rows of Kpad), several rows of A per pass over the weights
// (one row: rows_1x4). Sharing the weights' loads between rows of A: at M = 2..7 (768x3072 and
// 3072x768, 75% and 90%) 1.1-1.7x faster than one row of A at a time on Zen 5.
static void rows_1x4_all_m(const BsrF32& W, int64_t i0, int64_t i1, const float* Ap,
                           int64_t Kpad, int64_t M, float* Y) {
  const int64_t N = W.N;
  // Up to 7 rows of A per pass while they fit in about 2/3 of L1 (K = 768: 21 KiB), else 4
  // (K = 3072: 7 rows at once were 10-25% slower than 4 + 3, their quads missing L1).
  const int64_t most = 7 * Kpad * static_cast<int64_t>(sizeof(float)) <= 32 * 1024 ? 7 : 4;
  for (int64_t m = 0; m < M;) {
    const int64_t n = std::min(M - m, most);
    const float* a = Ap + m * Kpad;
    float* y = Y + m * N;
    switch (n) {
      case 7: V16::rows_1x4_m<7>(a, Kpad, W.col_idx, W.values, W.row_ptr, i0, i1, y, N); break;
      case 6: V16::rows_1x4_m<6>(a, Kpad, W.col_idx, W.values, W.row_ptr, i0, i1, y, N); break;
      case 5: V16::rows_1x4_m<5>(a, Kpad, W.col_idx, W.values, W.row_ptr, i0, i1, y, N); break;
      case 4: V16::rows_1x4_m<4>(a, Kpad, W.col_idx, W.values, W.row_ptr, i0, i1, y, N); break;
      case 3: V16::rows_1x4_m<3>(a, Kpad, W.col_idx, W.values, W.row_ptr, i0, i1, y, N); break;
      case 2: V16::rows_1x4_m<2>(a, Kpad, W.col_idx, W.values, W.row_ptr, i0, i1, y, N); break;
      default: V16::rows_1x4(a, W.col_idx, W.values, W.row_ptr, i0, i1, y, W.nnzb); break;
    }
    m += n;
  }
}

// Small-M rows for block shapes with R > 1, AVX-512: every FMA does 16 useful products.
// 4x1: four blocks per FMA (their values are contiguous; each A element broadcast to its
// block's 4 lanes), the four lane groups summed at the end.
static void rows_4x1(const BsrF32& W, int64_t i0, int64_t i1, const float* a, float* y) {
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for_block_rows(W, i0, i1, y, [&](int64_t i, float* out) {
    const int64_t b1 = W.row_ptr[i + 1];
    int64_t b = W.row_ptr[i];
    const int32_t* c = W.col_idx;
    __m512 acc = _mm512_setzero_ps();
    for (; b + 4 <= b1; b += 4) {
      const __m128 x4 = _mm_setr_ps(a[c[b]], a[c[b + 1]], a[c[b + 2]], a[c[b + 3]]);
      const __m512 x = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(x4));
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(W.values + b * 4), x, acc);
    }
    __m128 acc4 = _mm_setzero_ps();
    for (; b < b1; ++b) {
      acc4 = _mm_fmadd_ps(_mm_loadu_ps(W.values + b * 4), _mm_set1_ps(a[c[b]]), acc4);
    }
    _mm_storeu_ps(out, _mm_add_ps(acc4, V16::sum_quads(acc)));
  });
}

// 4x4: one block per FMA (its 16 values against its A quad broadcast to the 4 rows), two
// accumulators in turn; each lane quad (one output) summed at the end.
static void rows_4x4(const BsrF32& W, int64_t i0, int64_t i1, const float* a, float* y) {
  for_block_rows(W, i0, i1, y, [&](int64_t i, float* out) {
    const int64_t b1 = W.row_ptr[i + 1];
    int64_t b = W.row_ptr[i];
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; b + 2 <= b1; b += 2) {
      const __m512 x0 = _mm512_broadcast_f32x4(_mm_loadu_ps(a + int64_t{W.col_idx[b]} * 4));
      const __m512 x1 = _mm512_broadcast_f32x4(_mm_loadu_ps(a + int64_t{W.col_idx[b + 1]} * 4));
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(W.values + b * 16), x0, acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(W.values + b * 16 + 16), x1, acc1);
    }
    if (b < b1) {
      const __m512 x0 = _mm512_broadcast_f32x4(_mm_loadu_ps(a + int64_t{W.col_idx[b]} * 4));
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(W.values + b * 16), x0, acc0);
    }
    // lanes r*4 + c: add the pairs, then the pairs of pairs, then pick lanes 0, 4, 8, 12.
    __m512 t = _mm512_add_ps(acc0, acc1);
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
    const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, t)));
  });
}

// Rx1 with R a multiple of 16: R/16 vectors per block, A element broadcast.
static void rows_16nx1(const BsrF32& W, int64_t i0, int64_t i1, const float* a, float* y) {
  const int64_t R = W.R;
  for_block_rows(W, i0, i1, y, [&](int64_t i, float* out) {
    for (int64_t r = 0; r < R; r += 16) {
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      const int64_t b1 = W.row_ptr[i + 1];
      int64_t b = W.row_ptr[i];
      for (; b + 2 <= b1; b += 2) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(W.values + b * R + r),
                               _mm512_set1_ps(a[W.col_idx[b]]), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(W.values + (b + 1) * R + r),
                               _mm512_set1_ps(a[W.col_idx[b + 1]]), acc1);
      }
      if (b < b1) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(W.values + b * R + r),
                               _mm512_set1_ps(a[W.col_idx[b]]), acc0);
      }
      _mm512_storeu_ps(out + r, _mm512_add_ps(acc0, acc1));
    }
  });
}
#endif  // __AVX512F__

struct RowJob {
  const BsrF32* W;
  const float* Ap;  // A padded to [M, Kpad]
  const float* bias;
  Activation act;
  float* Y;
  int64_t M, Kpad;
  std::vector<int64_t> bounds;
  RowsFn rows;
  // Where set, all M rows of A per chunk in one call (rows_1x4_all_m), else rows per row of A.
  void (*rows_all_m)(const BsrF32&, int64_t, int64_t, const float*, int64_t, int64_t, float*) =
      nullptr;
};

static void row_task(void* arg, size_t index) {
  const RowJob& j = *static_cast<const RowJob*>(arg);
  const BsrF32& W = *j.W;
  const int64_t i0 = j.bounds[index], i1 = j.bounds[index + 1];
  if (i0 >= i1) return;
  const int64_t n0 = i0 * W.R, n1 = std::min(i1 * W.R, W.N);
  // Chunks of block rows small enough for their weights to stay in L1/L2 while every row of
  // A passes over them.
  const int64_t chunk = std::max<int64_t>(1, 256 / W.R);
  for (int64_t c0 = i0; c0 < i1; c0 += chunk) {
    if (j.rows_all_m != nullptr) {
      j.rows_all_m(W, c0, std::min(i1, c0 + chunk), j.Ap, j.Kpad, j.M, j.Y);
      continue;
    }
    for (int64_t m = 0; m < j.M; ++m) {
      j.rows(W, c0, std::min(i1, c0 + chunk), j.Ap + m * j.Kpad, j.Y + m * W.N);
    }
  }
  for (int64_t m = 0; m < j.M; ++m) {
    float* y = j.Y + m * W.N + n0;
    apply_epilogue_row(y, n1 - n0, j.bias != nullptr ? j.bias + n0 : nullptr, j.act);
  }
}

template <class V>
static void bsr_small_m(const float* A, int64_t M, const BsrF32& W, const float* bias,
                        Activation act, float* Y, const Parallel& par) {
  const int64_t K = W.K, C = W.C, R = W.R;
  const int64_t Kpad = (K + C - 1) / C * C;
  const int64_t block_rows = (W.N + R - 1) / R;
  const float* Ap = A;
  if (Kpad != K) {  // blocks past K read padding: copy A into zero-padded rows
    float* buf = detail::thread_scratch(static_cast<size_t>(M * Kpad));
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(buf + m * Kpad, A + m * K, static_cast<size_t>(K) * sizeof(float));
      std::fill(buf + m * Kpad + K, buf + (m + 1) * Kpad, 0.0f);
    }
    Ap = buf;
  }
  RowJob job{&W, Ap, bias, act, Y, M, Kpad, {}, nullptr};
  // V16::rows_1x4 and rows_1x4_m turn column indices into 32-bit byte offsets (16 * index):
  // up to Kpad < 2^30, else the plain loop.
  const bool offsets_fit = Kpad < (int64_t{1} << 30);
  if (R == 1 && C == 4 && (V::W != 16 || offsets_fit)) {
    job.rows = &rows_1x4<V>;
#ifdef __AVX512F__
    if (V::W == 16 && M > 1) job.rows_all_m = &rows_1x4_all_m;
#endif
  } else if (R == 1 && C == 4) {
    job.rows = &bsr_rows<1, 4>;
#ifdef __AVX512F__
  } else if (V::W == 16 && R == 4 && C == 1) {
    job.rows = &rows_4x1;
  } else if (V::W == 16 && R % 16 == 0 && C == 1) {
    job.rows = &rows_16nx1;
  } else if (V::W == 16 && R == 4 && C == 4) {
    job.rows = &rows_4x4;
#endif
  } else if (R == 4 && C == 1) {
    job.rows = &bsr_rows<4, 1>;
  } else if (R == 16 && C == 1) {
    job.rows = &bsr_rows<16, 1>;
  } else if (R == 4 && C == 4) {
    job.rows = &bsr_rows<4, 4>;
  } else if (R == 1 && C == 8) {
    job.rows = &bsr_rows<1, 8>;
  } else if (R == 8 && C == 1) {
    job.rows = &bsr_rows<8, 1>;
  } else {
    job.rows = &bsr_rows<0, 0>;
  }
  const int64_t parts =
      par.threads > 1 ? std::min<int64_t>(4 * par.threads, std::max<int64_t>(1, block_rows)) : 1;
  detail::split_rows(
      block_rows, parts, 1,
      [&](int64_t i) { return int64_t{W.row_ptr[i]} * R * C + i * R * 2; }, job.bounds);
  par.run(par, static_cast<size_t>(parts), &row_task, &job);
}

// ---- entry points --------------------------------------------------------------------------

template <class V>
static void bsr_f32(const float* A, int64_t M, const BsrF32& W, const float* bias,
                    Activation act, float* Y, const Parallel& par, int max_nv, int max_acc) {
  if (M < kMinMvecM) {
    bsr_small_m<V>(A, M, W, bias, act, Y, par);
    return;
  }
  const int64_t R = W.R, C = W.C;
  const int64_t Kpad = (W.K + C - 1) / C * C;
  const int64_t block_rows = (W.N + R - 1) / R;
  const int64_t block_cols = Kpad / C;
  int nv = choose_nv<V>(M, max_nv);
  // Panels of A^T rows of about kPanelBytes. A panel costs a visit per row and panel
  // (accumulators in and out of L2); below about 8 blocks per visit (high sparsity) that costs
  // more than the L2 reads of A^T it saves, so such weights run as one panel; so do blocks of
  // R >= 4 rows, whose A^T loads each feed R FMAs already (measured on Zen 5: panels gain
  // 10-15% for 1x4 at 50-75% sparsity).
  int64_t panel_cols =
      std::max<int64_t>(1, kPanelBytes / (C * nv * V::W * int64_t{sizeof(float)}));
  const double per_visit = static_cast<double>(W.nnzb) / static_cast<double>(block_rows) *
                           static_cast<double>(panel_cols) / static_cast<double>(block_cols);
  const bool tile_in_l2 = Kpad * nv * V::W * int64_t{sizeof(float)} <= kL2TileBytes;
  bool one_panel = R >= 4 || per_visit < kMinBlocksPerVisit;
  // The AVX-512 1x4 path (rows_1x4_panel) visits cheaply enough for panels to pay at high
  // sparsity too: with a narrow tile (Mt = 32: twice the panel's block columns, twice the
  // blocks per visit) from kMinNarrowVisit blocks per visit, and below that still when one
  // panel's A^T tile would not stay in L2. Measured on Zen 5 against one panel at M = 128:
  // -12% (768 x 3072) and -15% (3072 x 768) at 90% sparsity, -20% for 3072 x 768 at 95%,
  // +6% for 768 x 3072 at 95% (hence the threshold).
  const bool fast_1x4 = V::W == 16 && R == 1 && C == 4;
  if (fast_1x4 && one_panel) {
    const int narrow = std::min(nv, 2);
    const double narrow_visit = per_visit * nv / narrow;
    if (narrow_visit >= kMinNarrowVisit || !tile_in_l2) {
      one_panel = false;
      panel_cols = panel_cols * nv / narrow;
      nv = narrow;
    }
  }
  // One panel of 1xC blocks streams A^T from L2 for every FMA; a narrower tile (Mt = 32, a
  // tile of at most kNarrowTileBytes) measured faster on Zen 5 at 90% sparsity for K = 768
  // (-15%) but not for K = 3072 (+5%), nor with panels (before rows_1x4_panel).
  if (one_panel && R < 4 && Kpad * 32 * int64_t{sizeof(float)} <= kNarrowTileBytes) {
    nv = std::min(nv, 2);
  }
  const int64_t Mt = int64_t{nv} * V::W;
  BsrPanelJob job;
  job.W = &W;
  job.bias = bias;
  job.Y = Y;
  job.M = M;
  job.Kpad = Kpad;
  job.Mt = Mt;
  job.act = act;
  if constexpr (V::W == 16) {
    if (fast_1x4) job.rows_1x4 = pick_rows_1x4<V>(nv);
  }
  for (int64_t r0 = 0; r0 < R;) {
    int rs = 8;
    while (rs > 1 && (rs > R - r0 || rs * nv > max_acc)) rs /= 2;
    job.slices.push_back(Slice{r0, rs, pick_slice_nv<V>(rs, nv, C)});
    r0 += rs;
  }
  if (one_panel) {
    // Small chunks keep the accumulators in L1 between the FMAs and the transpose.
    job.panel_cols = block_cols;
    job.chunk = std::max<int64_t>(1, V::W / R);
  } else {
    // Chunks of about kChunkOutputs outputs.
    job.panel_cols = panel_cols;
    job.chunk = std::max<int64_t>(1, kChunkOutputs / R);
  }
  if (job.rows_1x4 != nullptr) {
    // The full tile always gains from the weight prefetch; the narrow one only once a chunk's
    // weights (values and col_idx) and the A^T tile outgrow half of L2 (see rows_1x4_panel),
    // and not for visits of a few blocks (95% sparsity: -1.5% at K = 3072).
    const double row_blocks = static_cast<double>(W.nnzb) / static_cast<double>(block_rows);
    const double chunk_weights =
        row_blocks * static_cast<double>(job.chunk) * (4 + 1) * sizeof(float);
    const double tile = static_cast<double>(Kpad * Mt) * sizeof(float);
    const double visit = row_blocks * static_cast<double>(std::min(job.panel_cols, block_cols)) /
                         static_cast<double>(block_cols);
    job.prefetch = nv >= 4 || (chunk_weights + tile > static_cast<double>(kL2TileBytes) &&
                               visit >= kMinNarrowVisit);
  }
  const int64_t tiles = (M + Mt - 1) / Mt;
  job.nsplit = par.threads > 1 ? std::max<int64_t>(1, (3 * par.threads + tiles - 1) / tiles) : 1;
  job.nsplit = std::min(job.nsplit, block_rows);
  // Cost of block rows [0, i): their non-zero weights plus a share for the stores.
  detail::split_rows(
      block_rows, job.nsplit, 1,
      [&](int64_t i) { return int64_t{W.row_ptr[i]} * R * C + i * R * 2; }, job.bounds);
  job.At = pack_transposed(A, M, W.K, Kpad, Mt, par);
  par.run(par, static_cast<size_t>(tiles * job.nsplit), &bsr_panel_task<V>, &job);
}

// ---- 2:4 -----------------------------------------------------------------------------------

// Output n over one A^T tile: out[m] = binit + sum_g v[2g] At[4g+p0][m] + v[2g+1] At[4g+p1][m].
template <class V, int NV>
static void s24_row(const Packed24F32& W, int64_t n, const float* At, float binit, float* out) {
  using T = typename V::T;
  constexpr int64_t Mt = int64_t{NV} * V::W;
  const int64_t groups = W.K / 4;
  const float* v = W.values + n * (W.K / 2);
  const uint8_t* idx = W.indices + n * ((W.K + 7) / 8);
  T acc0[NV], acc1[NV];
  for (int j = 0; j < NV; ++j) {
    acc0[j] = V::set1(binit);
    acc1[j] = V::zero();
  }
  const int64_t pairs = groups / 2;
  for (int64_t q = 0; q < pairs; ++q) {
    const unsigned bits = idx[q];
    const float* a = At + q * 8 * Mt;
    const float* a0 = a + (bits & 3) * Mt;
    const float* a1 = a + ((bits >> 2) & 3) * Mt;
    const float* a2 = a + (4 + ((bits >> 4) & 3)) * Mt;
    const float* a3 = a + (4 + (bits >> 6)) * Mt;
    const T w0 = V::set1(v[4 * q]), w1 = V::set1(v[4 * q + 1]);
    const T w2 = V::set1(v[4 * q + 2]), w3 = V::set1(v[4 * q + 3]);
    for (int j = 0; j < NV; ++j) {
      acc0[j] = V::fma(w0, V::load(a0 + j * V::W), acc0[j]);
      acc1[j] = V::fma(w1, V::load(a1 + j * V::W), acc1[j]);
      acc0[j] = V::fma(w2, V::load(a2 + j * V::W), acc0[j]);
      acc1[j] = V::fma(w3, V::load(a3 + j * V::W), acc1[j]);
    }
  }
  if (groups % 2 != 0) {
    const int64_t g = groups - 1;
    const unsigned bits = idx[g / 2];
    const float* a = At + g * 4 * Mt;
    const T w0 = V::set1(v[2 * g]), w1 = V::set1(v[2 * g + 1]);
    for (int j = 0; j < NV; ++j) {
      acc0[j] = V::fma(w0, V::load(a + (bits & 3) * Mt + j * V::W), acc0[j]);
      acc1[j] = V::fma(w1, V::load(a + ((bits >> 2) & 3) * Mt + j * V::W), acc1[j]);
    }
  }
  for (int j = 0; j < NV; ++j) V::store(out + j * V::W, V::add(acc0[j], acc1[j]));
}

struct Rows24 {
  const Packed24F32* W;
  const float* bias;
  void (*fn)(const Packed24F32&, int64_t, const float*, float, float*);
  int64_t R() const { return 1; }
  void rows(int64_t n, const float* At, float* out, int64_t /*Mt*/) const {
    fn(*W, n, At, bias != nullptr ? bias[n] : 0.0f, out);
  }
};

struct Row24Job {
  const Packed24F32* W;
  const float* A;
  const float* bias;
  Activation act;
  float* Y;
  int64_t M;
  std::vector<int64_t> bounds;
};

template <class V>
static void row24_task(void* arg, size_t index) {
  const Row24Job& j = *static_cast<const Row24Job*>(arg);
  const Packed24F32& W = *j.W;
  const int64_t n0 = j.bounds[index], n1 = j.bounds[index + 1];
  if (n0 >= n1) return;
  for (int64_t m = 0; m < j.M; ++m) {
    float* y = j.Y + m * W.N;
    V::rows_24(j.A + m * W.K, W, n0, n1, y);
    apply_epilogue_row(y + n0, n1 - n0, j.bias != nullptr ? j.bias + n0 : nullptr, j.act);
  }
}

template <class V>
static void s24_f32(const float* A, int64_t M, const Packed24F32& W, const float* bias,
                    Activation act, float* Y, const Parallel& par, int max_nv) {
  const int64_t N = W.N, K = W.K;
  if (M < kMinMvecM) {
    Row24Job job{&W, A, bias, act, Y, M, {}};
    const int64_t parts = par.threads > 1 ? std::min<int64_t>(4 * par.threads, N) : 1;
    detail::split_rows(N, parts, 8, [](int64_t n) { return n; }, job.bounds);
    par.run(par, static_cast<size_t>(parts), &row24_task<V>, &job);
    return;
  }
  const int nv = choose_nv<V>(M, max_nv);
  const int64_t Mt = int64_t{nv} * V::W;
  Rows24 rows{&W, bias, nullptr};
  switch (nv) {
    case 8:
      rows.fn = &s24_row<V, 8>;
      break;
    case 4:
      rows.fn = &s24_row<V, 4>;
      break;
    case 2:
      rows.fn = &s24_row<V, 2>;
      break;
    default:
      rows.fn = &s24_row<V, 1>;
      break;
  }
  const float* At = pack_transposed(A, M, K, K, Mt, par);
  run_mvec<V>(rows, N, At, Y, M, N, K, Mt, act, par);
}

}  // namespace GRAPHOPT_F32_SIMD_NS
}  // namespace graphopt
#endif  // GRAPHOPT_F32_SIMD_NS
