// Standalone tests of the sparse kernels, no ORT: every ISA tier up to the detected one
// against the reference kernel, and the reference against a dense matmul of the unpacked
// weight (so the reference's reading of the layout is checked too).
//
// Random shapes (M = 0 and 1 included, odd K and N), every block shape, sparsities 0..1, with
// and without bias and activation, serial and on threads. Outputs get guard cells on both
// sides and start as NaN, so a kernel that skips an output or writes outside Y is caught even
// without the sanitizers (CMake's GRAPHOPT_SANITIZE build adds ASan + UBSan). NaN and +-Inf
// in A and in the epilogue's input must come out where the reference (and ONNX Runtime's own
// MatMul, Relu, Gelu) puts them.
//
// Usage: graphopt_kernel_tests [--cases N] [--seed S] [--max-dim D]   exit 1 on any mismatch
//        graphopt_kernel_tests --info                                  detected/selected ISA
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "epilogue_internal.h"
#include "kernels.h"

namespace graphopt {
namespace {

constexpr int kGuard = 16;
constexpr float kGuardValue = 12345.0f;

struct Options {
  int cases = 120;
  unsigned seed = 1;
  int max_dim = 48;
};

// ---- Parallel on std::threads: pieces handed out by an atomic counter -------------------

struct ThreadPoolState {
  int threads;
};

void run_on_threads(const Parallel& self, size_t n, void (*fn)(void*, size_t), void* arg) {
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t i = next++; i < n; i = next++) fn(arg, i);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < self.threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
}

Parallel threaded_parallel(int threads) { return Parallel{&run_on_threads, nullptr, threads}; }

// ---- random problems --------------------------------------------------------------------

struct Rng {
  std::mt19937 engine;
  explicit Rng(unsigned seed) : engine(seed) {}
  int64_t integer(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(engine);
  }
  float real(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(engine); }
  template <typename T>
  T pick(const std::vector<T>& items) {
    return items[static_cast<size_t>(integer(0, static_cast<int64_t>(items.size()) - 1))];
  }
};

struct Shape {
  int64_t M, K, N;
  int32_t R, C;
  double sparsity;
  bool bias;
  Activation act;
};

std::string describe(const char* op, const Shape& s, Isa isa, int threads) {
  char text[256];
  std::snprintf(text, sizeof text,
                "%s M=%lld K=%lld N=%lld block=%dx%d sparsity=%.2f bias=%d act=%d isa=%s "
                "threads=%d",
                op, static_cast<long long>(s.M), static_cast<long long>(s.K),
                static_cast<long long>(s.N), s.R, s.C, s.sparsity, s.bias ? 1 : 0,
                static_cast<int>(s.act), isa_name(isa), threads);
  return text;
}

Shape random_shape(Rng& rng, const Options& opt, const std::vector<std::pair<int, int>>& blocks,
                   int64_t k_multiple) {
  Shape s{};
  s.M = rng.pick<int64_t>({0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 17});
  s.K = rng.integer(1, opt.max_dim);
  if (k_multiple > 1) s.K = ((s.K + k_multiple - 1) / k_multiple) * k_multiple;
  s.N = rng.integer(1, opt.max_dim);
  const auto block = rng.pick(blocks);
  s.R = block.first;
  s.C = block.second;
  s.sparsity = rng.pick<double>({0.0, 0.25, 0.5, 0.75, 0.9, 1.0});
  s.bias = rng.integer(0, 1) == 1;
  s.act = static_cast<Activation>(rng.integer(0, 2));
  return s;
}

// Dense W [K, N] with whole R x C blocks (over n, k) zeroed at the given sparsity.
template <typename T>
std::vector<T> block_sparse_dense(Rng& rng, const Shape& s, T lo, T hi) {
  std::vector<T> w(static_cast<size_t>(s.K * s.N));
  for (int64_t i = 0; i * s.R < s.N; ++i) {
    for (int64_t j = 0; j * s.C < s.K; ++j) {
      const bool keep = rng.real(0.0f, 1.0f) >= s.sparsity;
      for (int64_t r = 0; r < s.R && i * s.R + r < s.N; ++r) {
        for (int64_t c = 0; c < s.C && j * s.C + c < s.K; ++c) {
          T value = 0;
          if (keep) {
            if constexpr (std::is_floating_point_v<T>) {
              value = rng.real(lo, hi);
            } else {
              value = static_cast<T>(rng.integer(lo, hi));
            }
          }
          w[static_cast<size_t>((j * s.C + c) * s.N + i * s.R + r)] = value;
        }
      }
    }
  }
  return w;
}

template <typename T>
struct Bsr {
  std::vector<T> values;
  std::vector<int32_t> col_idx, row_ptr;
};

// BSR packing as packing.py does it: all-zero blocks dropped, padding zero.
template <typename T>
Bsr<T> pack_bsr(const std::vector<T>& w, const Shape& s) {
  Bsr<T> out;
  out.row_ptr.push_back(0);
  for (int64_t i = 0; i * s.R < s.N; ++i) {
    for (int64_t j = 0; j * s.C < s.K; ++j) {
      std::vector<T> block(static_cast<size_t>(s.R * s.C), T(0));
      bool nonzero = false;
      for (int64_t r = 0; r < s.R && i * s.R + r < s.N; ++r) {
        for (int64_t c = 0; c < s.C && j * s.C + c < s.K; ++c) {
          const T value = w[static_cast<size_t>((j * s.C + c) * s.N + i * s.R + r)];
          block[static_cast<size_t>(r * s.C + c)] = value;
          nonzero = nonzero || value != T(0);
        }
      }
      if (!nonzero) continue;
      out.values.insert(out.values.end(), block.begin(), block.end());
      out.col_idx.push_back(static_cast<int32_t>(j));
    }
    out.row_ptr.push_back(static_cast<int32_t>(out.col_idx.size()));
  }
  return out;
}

// ---- checking -------------------------------------------------------------------------

struct Output {
  std::vector<float> cells;
  int64_t size;
  explicit Output(int64_t n)
      : cells(static_cast<size_t>(n + 2 * kGuard), std::numeric_limits<float>::quiet_NaN()),
        size(n) {
    for (int g = 0; g < kGuard; ++g) {
      cells[static_cast<size_t>(g)] = kGuardValue;
      cells[static_cast<size_t>(n + kGuard + g)] = kGuardValue;
    }
  }
  float* data() { return cells.data() + kGuard; }
  float at(int64_t i) const { return cells[static_cast<size_t>(i + kGuard)]; }
  bool guards_intact() const {
    for (int g = 0; g < kGuard; ++g) {
      if (cells[static_cast<size_t>(g)] != kGuardValue ||
          cells[static_cast<size_t>(size + kGuard + g)] != kGuardValue) {
        return false;
      }
    }
    return true;
  }
};

// ONNX Runtime's Relu is max(x, 0) keeping x unless x < 0: NaN stays NaN, -0 stays -0.
float activate(float x, Activation act) {
  if (act == Activation::Relu) return x < 0.0f ? 0.0f : x;
  if (act == Activation::Gelu) return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752440f));
  return x;
}

int g_failures = 0;
long g_checks = 0;

// |got - want| <= tol * (scale + 1) per output, scale = sum |a*w| + |bias| for that output: the
// float rounding any summation order can produce, with room for a different order. A NaN or
// infinite want is matched exactly: NaN by NaN, an infinity by the same infinity.
void compare(const std::string& what, const Output& got, const std::vector<float>& want,
             const std::vector<float>& scale, double tol) {
  ++g_checks;
  if (!got.guards_intact()) {
    if (g_failures++ < 20) std::printf("FAIL %s: wrote outside Y\n", what.c_str());
    return;
  }
  for (int64_t i = 0; i < got.size; ++i) {
    const double w = want[static_cast<size_t>(i)], g = got.at(i);
    const double diff = std::fabs(g - w);
    const bool ok = std::isnan(w)   ? std::isnan(g)
                    : std::isinf(w) ? g == w
                                    : diff <= tol * (scale[static_cast<size_t>(i)] + 1.0);
    if (!ok) {  // a NaN got for a finite want fails too
      if (g_failures++ < 20) {
        std::printf("FAIL %s: Y[%lld] = %.9g, want %.9g\n", what.c_str(),
                    static_cast<long long>(i), got.at(i), want[static_cast<size_t>(i)]);
      }
      return;
    }
  }
}

std::vector<Isa> tiers() {
  std::vector<Isa> out;
  for (int t = 0; t <= static_cast<int>(detect_isa()); ++t) out.push_back(static_cast<Isa>(t));
  return out;
}

const std::vector<Parallel>& parallels() {
  static const std::vector<Parallel> all{serial_parallel(), threaded_parallel(3)};
  return all;
}

// ---- the three ops --------------------------------------------------------------------

// NaN, +Inf or -Inf into A (non_finite): most rows get one or two, at the first k, the last
// (beside the padding of a last block past K) or anywhere; the others stay finite.
void poison(Rng& rng, std::vector<float>& a, int64_t M, int64_t K) {
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t t = rng.integer(0, 2); t > 0; --t) {
      const int64_t where = rng.integer(0, 2);
      const int64_t k = where == 0 ? 0 : where == 1 ? K - 1 : rng.integer(0, K - 1);
      a[static_cast<size_t>(m * K + k)] = specials[rng.integer(0, 2)];
    }
  }
}

// The truth sums over the weights the packing stores only (stored[k * N + n]): the kernels
// multiply every one of those, explicit zeros inside a block included (0 * Inf is NaN, as in
// the dense MatMul), and never a dropped block's zero, so a non-finite A entry that no stored
// weight meets adds nothing. For finite A that is the dense product. The scale leaves out
// non-finite products (their outputs are matched exactly).
void check_f32(Rng& rng, const Shape& s, bool non_finite = false) {
  const auto w = block_sparse_dense<float>(rng, s, -1.0f, 1.0f);
  const auto packed = pack_bsr(w, s);
  std::vector<float> a(static_cast<size_t>(s.M * s.K)), bias(static_cast<size_t>(s.N));
  for (auto& x : a) x = rng.real(-1.0f, 1.0f);
  for (auto& x : bias) x = rng.real(-1.0f, 1.0f);
  if (non_finite) poison(rng, a, s.M, s.K);
  const BsrF32 W{s.K, s.N, s.R, s.C, static_cast<int64_t>(packed.col_idx.size()),
                 packed.values.data(), packed.col_idx.data(), packed.row_ptr.data()};
  const float* b = s.bias ? bias.data() : nullptr;
  std::vector<char> stored(w.size(), 0);
  for (int64_t i = 0; i * s.R < s.N; ++i) {
    for (int32_t bk = packed.row_ptr[static_cast<size_t>(i)];
         bk < packed.row_ptr[static_cast<size_t>(i + 1)]; ++bk) {
      for (int64_t r = 0; r < s.R && i * s.R + r < s.N; ++r) {
        for (int64_t c = 0; c < s.C; ++c) {
          const int64_t k = int64_t{packed.col_idx[static_cast<size_t>(bk)]} * s.C + c;
          if (k < s.K) stored[static_cast<size_t>(k * s.N + i * s.R + r)] = 1;
        }
      }
    }
  }
  // Dense truth, in double.
  std::vector<float> dense(static_cast<size_t>(s.M * s.N)), scale(dense.size());
  for (int64_t m = 0; m < s.M; ++m) {
    for (int64_t n = 0; n < s.N; ++n) {
      double acc = 0.0, mag = 0.0;
      for (int64_t k = 0; k < s.K; ++k) {
        if (!stored[static_cast<size_t>(k * s.N + n)]) continue;
        const double p = double{a[static_cast<size_t>(m * s.K + k)]} *
                         w[static_cast<size_t>(k * s.N + n)];
        acc += p;
        if (std::isfinite(p)) mag += std::fabs(p);
      }
      if (b) acc += b[n], mag += std::fabs(b[n]);
      dense[static_cast<size_t>(m * s.N + n)] = activate(static_cast<float>(acc), s.act);
      scale[static_cast<size_t>(m * s.N + n)] = static_cast<float>(mag);
    }
  }
  Output ref(s.M * s.N);
  sparse_matmul_f32_reference(a.data(), s.M, W, b, s.act, ref.data());
  compare(describe("reference-vs-dense f32", s, Isa::Scalar, 1), ref, dense, scale, 1e-5);
  std::vector<float> ref_values(dense.size());
  for (int64_t i = 0; i < ref.size; ++i) ref_values[static_cast<size_t>(i)] = ref.at(i);
  for (Isa isa : tiers()) {
    for (const Parallel& par : parallels()) {
      Output y(s.M * s.N);
      sparse_matmul_f32(a.data(), s.M, W, b, s.act, y.data(), par, isa);
      compare(describe("sparse_matmul_f32", s, isa, par.threads), y, ref_values, scale, 1e-5);
    }
  }
}

void test_f32(Rng& rng, const Options& opt) {
  const std::vector<std::pair<int, int>> blocks{{1, 4}, {4, 1}, {16, 1}, {4, 4}, {1, 1}, {2, 2}};
  for (int t = 0; t < opt.cases; ++t) check_f32(rng, random_shape(rng, opt, blocks, 1));
}

// Shapes the random ones rarely reach: the M-vectorized path's K panels (1xC, M >= 64,
// K ~ 1000, density >= 0.5), a partial last M tile, whole 16x16 output transposes, the M = 7 /
// M = 8 switch between the row and M-vectorized paths, and R = 32 / R = 3 blocks. The 1x4
// AVX-512 path stages whole groups of 16 outputs and copies them to Y between rows: N = 50 and
// 35 end in a partial group; at 90% it takes narrow K panels, at 95% one panel for K = 600
// but still panels for K = 2100 (an A^T tile past L2); M = 100 and 70 end in a partial tile.
// N = 300 at 75% (full tile: column look-ahead, weights prefetched rows ahead) spans two
// chunks of block rows, the second partial, with a partial last M tile.
void test_f32_fixed(Rng& rng) {
  using A = Activation;
  const Shape shapes[] = {
      {128, 1000, 40, 1, 4, 0.5, true, A::Gelu},  {70, 1003, 33, 1, 1, 0.3, true, A::Relu},
      {64, 997, 19, 1, 4, 0.9, false, A::None},   {96, 1000, 48, 1, 4, 0.0, true, A::None},
      {7, 300, 50, 1, 4, 0.5, true, A::Gelu},     {8, 300, 50, 1, 4, 0.5, true, A::Gelu},
      {8, 45, 37, 4, 1, 0.5, false, A::Relu},     {7, 45, 37, 4, 1, 0.5, false, A::Relu},
      {20, 50, 70, 32, 1, 0.5, true, A::None},    {3, 50, 70, 32, 1, 0.5, true, A::Gelu},
      {17, 40, 31, 3, 2, 0.25, true, A::Relu},    {5, 40, 31, 3, 1, 0.25, true, A::None},
      {40, 64, 64, 16, 1, 0.75, true, A::Gelu},   {33, 130, 47, 4, 4, 0.75, false, A::Gelu},
      {100, 1000, 50, 1, 4, 0.5, true, A::Gelu},  {70, 600, 35, 1, 4, 0.9, false, A::Relu},
      {64, 2100, 40, 1, 4, 0.9, true, A::None},   {9, 2100, 16, 1, 4, 0.75, true, A::Relu},
      {70, 600, 35, 1, 4, 0.95, true, A::Gelu},   {64, 2100, 40, 1, 4, 0.95, false, A::Relu},
      {72, 800, 300, 1, 4, 0.75, true, A::Relu},
      // 1x4 at M = 2..7 takes several rows of A per pass over the weights: all 2..7 at once
      // for K up to 1170, else 4 at a time and then the last 1-3 (K = 1203: padded to 1204).
      {6, 90, 41, 1, 4, 0.5, true, A::Gelu},      {4, 77, 23, 1, 4, 0.9, false, A::None},
      {4, 1203, 37, 1, 4, 0.5, true, A::Relu},    {5, 1250, 20, 1, 4, 0.9, false, A::Gelu},
      {6, 1300, 29, 1, 4, 0.75, true, A::None},   {7, 1500, 33, 1, 4, 0.25, false, A::Relu},
      // 1x4 at M = 1: rows of exactly 8 and 16 blocks (no masked step), very long rows (750
      // blocks, K padded from 2998), rows of 0 or 1 blocks (most rows empty), and rows of 1-7
      // blocks whose masked step reads column indices up to the matrix's end.
      {1, 32, 45, 1, 4, 0.0, true, A::None},      {1, 64, 29, 1, 4, 0.0, false, A::Relu},
      {1, 2998, 21, 1, 4, 0.0, true, A::Gelu},    {1, 40, 300, 1, 4, 0.95, true, A::None},
      {1, 28, 37, 1, 4, 0.5, false, A::None},     {1, 770, 500, 1, 4, 0.9, true, A::Relu},
  };
  for (const Shape& s : shapes) check_f32(rng, s);
}

// As check_f32 (non_finite: NaN and infinities in A; the truth over the kept positions only,
// a kept zero included).
void check_24(Rng& rng, const Shape& s, bool non_finite = false) {
  const int64_t groups = s.K / 4, half = s.K / 2, stride = (s.K + 7) / 8;
  std::vector<float> w(static_cast<size_t>(s.K * s.N), 0.0f);
  std::vector<char> stored(w.size(), 0);
  std::vector<float> values(static_cast<size_t>(s.N * half));
  std::vector<uint8_t> indices(static_cast<size_t>(s.N * stride), 0);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const int p0 = static_cast<int>(rng.integer(0, 2));
      const int p1 = static_cast<int>(rng.integer(p0 + 1, 3));
      // Sparsity here: the chance a kept value is zero (a 2:4 group may hold fewer than 2).
      for (int tt = 0; tt < 2; ++tt) {
        const float value = rng.real(0.0f, 1.0f) < s.sparsity ? 0.0f : rng.real(-1.0f, 1.0f);
        values[static_cast<size_t>(n * half + 2 * g + tt)] = value;
        w[static_cast<size_t>((4 * g + (tt ? p1 : p0)) * s.N + n)] = value;
        stored[static_cast<size_t>((4 * g + (tt ? p1 : p0)) * s.N + n)] = 1;
      }
      const uint8_t nibble = static_cast<uint8_t>(p0 | (p1 << 2));
      indices[static_cast<size_t>(n * stride + g / 2)] |=
          static_cast<uint8_t>((g % 2) ? nibble << 4 : nibble);
    }
  }
  std::vector<float> a(static_cast<size_t>(s.M * s.K)), bias(static_cast<size_t>(s.N));
  for (auto& x : a) x = rng.real(-1.0f, 1.0f);
  for (auto& x : bias) x = rng.real(-1.0f, 1.0f);
  if (non_finite) poison(rng, a, s.M, s.K);
  const float* b = s.bias ? bias.data() : nullptr;
  const Packed24F32 W{s.K, s.N, values.data(), indices.data()};
  std::vector<float> dense(static_cast<size_t>(s.M * s.N)), scale(dense.size());
  for (int64_t m = 0; m < s.M; ++m) {
    for (int64_t n = 0; n < s.N; ++n) {
      double acc = 0.0, mag = 0.0;
      for (int64_t k = 0; k < s.K; ++k) {
        if (!stored[static_cast<size_t>(k * s.N + n)]) continue;
        const double p = double{a[static_cast<size_t>(m * s.K + k)]} *
                         w[static_cast<size_t>(k * s.N + n)];
        acc += p;
        if (std::isfinite(p)) mag += std::fabs(p);
      }
      if (b) acc += b[n], mag += std::fabs(b[n]);
      dense[static_cast<size_t>(m * s.N + n)] = activate(static_cast<float>(acc), s.act);
      scale[static_cast<size_t>(m * s.N + n)] = static_cast<float>(mag);
    }
  }
  Output ref(s.M * s.N);
  sparse_matmul_24_f32_reference(a.data(), s.M, W, b, s.act, ref.data());
  compare(describe("reference-vs-dense 2:4", s, Isa::Scalar, 1), ref, dense, scale, 1e-5);
  std::vector<float> ref_values(dense.size());
  for (int64_t i = 0; i < ref.size; ++i) ref_values[static_cast<size_t>(i)] = ref.at(i);
  for (Isa isa : tiers()) {
    for (const Parallel& par : parallels()) {
      Output y(s.M * s.N);
      sparse_matmul_24_f32(a.data(), s.M, W, b, s.act, y.data(), par, isa);
      compare(describe("sparse_matmul_24_f32", s, isa, par.threads), y, ref_values, scale, 1e-5);
    }
  }
}

void test_24(Rng& rng, const Options& opt) {
  for (int t = 0; t < opt.cases; ++t) check_24(rng, random_shape(rng, opt, {{1, 1}}, 4));
}

// 2:4 at K = 12 (odd group count, no whole 16-wide step), 260 and 1004 (a tail of 1-3
// groups after the 16-wide steps), on both the row (M < 8) and the M-vectorized path.
void test_24_fixed(Rng& rng) {
  for (const int64_t K : {12, 260, 1004}) {
    for (const int64_t M : {1, 8, 40}) {
      const Shape s{M, K, 37, 1, 1, 0.25, M != 8, M == 1 ? Activation::Gelu : Activation::Relu};
      check_24(rng, s);
    }
  }
}

// How check_s8 shapes the weight beyond Shape: one output row with every block stored (the
// longest lane of the M = 1 row-lane layout), and whether to run the row-lane layout at all.
struct S8Extras {
  bool dense_row = false;
  bool lanes = false;
};

void check_s8(Rng& rng, const Shape& s, const S8Extras& extra) {
  auto w = block_sparse_dense<int8_t>(rng, s, -127, 127);
  if (extra.dense_row && s.N > 0) {
    const int64_t n = rng.integer(0, s.N - 1);
    for (int64_t k = 0; k < s.K; ++k) {
      int8_t& v = w[static_cast<size_t>(k * s.N + n)];
      if (v == 0) v = static_cast<int8_t>(rng.integer(1, 127));
    }
  }
  const auto packed = pack_bsr(w, s);
  std::vector<int32_t> rowsum(static_cast<size_t>(s.N), 0);
  for (int64_t k = 0; k < s.K; ++k) {
    for (int64_t n = 0; n < s.N; ++n) {
      rowsum[static_cast<size_t>(n)] += w[static_cast<size_t>(k * s.N + n)];
    }
  }
  const bool per_channel = rng.integer(0, 1) == 1;
  std::vector<float> w_scale(per_channel ? static_cast<size_t>(s.N) : 1);
  for (auto& x : w_scale) x = rng.real(0.001f, 0.02f);
  std::vector<uint8_t> a(static_cast<size_t>(s.M * s.K));
  for (auto& x : a) x = static_cast<uint8_t>(rng.integer(0, 255));
  const float a_scale = rng.real(0.001f, 0.05f);
  const auto a_zero = static_cast<uint8_t>(rng.integer(0, 255));
  std::vector<float> bias(static_cast<size_t>(s.N));
  for (auto& x : bias) x = rng.real(-1.0f, 1.0f);
  const float* b = s.bias ? bias.data() : nullptr;
  const BsrS8 W{s.K, s.N, s.R, s.C, static_cast<int64_t>(packed.col_idx.size()),
                packed.values.data(), packed.col_idx.data(), packed.row_ptr.data(),
                w_scale.data(), static_cast<int64_t>(w_scale.size()), rowsum.data()};
  std::vector<float> dense(static_cast<size_t>(s.M * s.N)), scale(dense.size());
  for (int64_t m = 0; m < s.M; ++m) {
    for (int64_t n = 0; n < s.N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < s.K; ++k) {
        acc += (int64_t{a[static_cast<size_t>(m * s.K + k)]} - a_zero) *
               w[static_cast<size_t>(k * s.N + n)];
      }
      const double ws = w_scale[per_channel ? static_cast<size_t>(n) : 0];
      double y = double{a_scale} * ws * static_cast<double>(acc);
      const double mag = std::fabs(y) + (b ? std::fabs(b[n]) : 0.0);
      if (b) y += b[n];
      dense[static_cast<size_t>(m * s.N + n)] = activate(static_cast<float>(y), s.act);
      scale[static_cast<size_t>(m * s.N + n)] = static_cast<float>(mag);
    }
  }
  Output ref(s.M * s.N);
  sparse_qmatmul_s8_reference(a.data(), s.M, a_scale, a_zero, W, b, s.act, ref.data());
  compare(describe("reference-vs-dense s8", s, Isa::Scalar, 1), ref, dense, scale, 1e-5);
  std::vector<float> ref_values(dense.size());
  for (int64_t i = 0; i < ref.size; ++i) ref_values[static_cast<size_t>(i)] = ref.at(i);
  for (Isa isa : tiers()) {
    for (const Parallel& par : parallels()) {
      Output y(s.M * s.N);
      sparse_qmatmul_s8(a.data(), s.M, a_scale, a_zero, W, b, s.act, y.data(), par, isa);
      compare(describe("sparse_qmatmul_s8", s, isa, par.threads), y, ref_values, scale, 1e-5);
    }
  }
  if (!extra.lanes) return;
  // The M = 1 row-lane layout: the cost model's choice and every panel width and chunk size
  // the kernel has. Handed to every tier (below AVX-512 VNNI it must be ignored) and, for
  // M != 1, to the tile/row paths (ignored too).
  ++g_checks;
  const bool applies = s.R == 1 && s.C == 4 && s.K > 0 && s.N > 0;
  if ((build_row_lanes_s8(W) != nullptr) != applies) {
    if (g_failures++ < 20) {
      std::printf("FAIL %s: build_row_lanes_s8 %s\n",
                  describe("row lanes", s, Isa::Scalar, 1).c_str(), applies ? "declined" : "built");
    }
    return;
  }
  if (!applies) return;
  for (const int P : {0, 1, 2, 3, 4}) {
    for (const int G : {1, 2, 4, 8}) {
      const auto lanes = build_row_lanes_s8(W, P, P == 0 ? 0 : G);
      ++g_checks;
      const bool as_asked = P == 0 || (lanes != nullptr && lanes->P == P && lanes->G == G);
      if (lanes == nullptr || !as_asked || lanes->nnzb != W.nnzb ||
          lanes->slots() * 16 < W.nnzb || lanes->bytes() <= 0) {
        if (g_failures++ < 20) std::printf("FAIL row lanes P=%d G=%d: bad layout\n", P, G);
        continue;
      }
      for (Isa isa : tiers()) {
        for (const Parallel& par : parallels()) {
          Output y(s.M * s.N);
          sparse_qmatmul_s8(a.data(), s.M, a_scale, a_zero, W, b, s.act, y.data(), par, isa,
                            lanes.get());
          char what[64];
          std::snprintf(what, sizeof what, "sparse_qmatmul_s8 row lanes P=%d G=%d", lanes->P,
                        lanes->G);
          compare(describe(what, s, isa, par.threads), y, ref_values, scale, 1e-5);
        }
      }
      if (P == 0) break;  // the automatic choice: once
    }
  }
}

// The row-lane builder checks the indices it uses: a weight breaking the BSR rules (a column
// outside K, columns not increasing in a row, row_ptr decreasing or not ending at nnzb) gets
// no layout (the caller then takes the BSR path, whose callers check the same rules).
void test_s8_lanes_refuse_bad_weights() {
  const int8_t values[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  const float w_scale = 0.1f;
  const int32_t rowsum[2] = {10, 68};
  struct Case {
    int32_t col[3];
    int32_t row_ptr[3];
    const char* what;
  };
  const Case cases[] = {{{0, 1, 2}, {0, 1, 3}, "valid"},
                        {{0, 1, 3}, {0, 1, 3}, "column outside K"},
                        {{0, -1, 2}, {0, 1, 3}, "negative column"},
                        {{0, 2, 1}, {0, 1, 3}, "columns not increasing"},
                        {{0, 1, 2}, {0, 4, 3}, "row_ptr decreasing (past nnzb)"},
                        {{0, 1, 2}, {0, 1, 2}, "row_ptr not ending at nnzb"}};
  const int32_t col[3] = {0, 1, 2}, row_ptr[3] = {0, 1, 3};
  const BsrS8 good{12, 2, 1, 4, 3, values, col, row_ptr, &w_scale, 1, rowsum};
  for (const auto pg : {std::pair<int, int>{5, 0}, {6, 1}, {1, 3}, {2, 16}}) {
    ++g_checks;
    if (build_row_lanes_s8(good, pg.first, pg.second) != nullptr) {
      if (g_failures++ < 20) std::printf("FAIL row lanes built P=%d G=%d\n", pg.first, pg.second);
    }
  }
  for (const Case& c : cases) {
    ++g_checks;
    const BsrS8 W{12, 2, 1, 4, 3, values, c.col, c.row_ptr, &w_scale, 1, rowsum};
    const bool valid = std::string(c.what) == "valid";
    if ((build_row_lanes_s8(W) != nullptr) != valid) {
      if (g_failures++ < 20) std::printf("FAIL row lanes builder on %s\n", c.what);
    }
  }
}

void test_s8(Rng& rng, const Options& opt) {
  const std::vector<std::pair<int, int>> blocks{{1, 4}, {4, 4}, {2, 4}, {16, 4}, {1, 8}, {8, 4}};
  // Beyond the random sizes: K split into several L1 panels by the 1x4 tile path (K > 512),
  // 64-row tiles plus a partial one, and M = 1 with K past the register table (K > 1024).
  const std::vector<Shape> fixed{{70, 1100, 37, 1, 4, 0.8, true, Activation::Gelu},
                                 {130, 600, 20, 1, 4, 0.5, false, Activation::Relu},
                                 {1, 1100, 37, 1, 4, 0.8, true, Activation::None}};
  const int total = opt.cases + static_cast<int>(fixed.size());
  for (int t = 0; t < total; ++t) {
    const Shape s = t < opt.cases ? random_shape(rng, opt, blocks, 1)
                                  : fixed[static_cast<size_t>(t - opt.cases)];
    check_s8(rng, s, S8Extras{false, true});
  }
}

// The M = 1 row-lane layout on its own sizes: K from a few k to several panels of every width
// (up to 2100: 3 panels at P = 8, 17 at P = 1) and not a multiple of a panel or of 4, N not a
// multiple of 16 (a partial last group), sparsity from dense to all-zero (rows without blocks,
// empty weights), one row with every block in half the cases; bias and activations.
void test_s8_lanes(Rng& rng, const Options& opt) {
  const int cases = std::max(8, opt.cases / 3);
  for (int t = 0; t < cases; ++t) {
    Shape s{};
    s.M = 1;
    s.K = rng.pick<int64_t>({1, 3, 4, 5, 127, 128, 129, 260, 513, 770, 1023, 1025, 2100});
    s.N = rng.pick<int64_t>({1, 15, 16, 17, 33, 47, 64, 65, 100, 131, 200});
    s.R = 1, s.C = 4;
    s.sparsity = rng.pick<double>({0.0, 0.5, 0.8, 0.9, 0.95, 1.0});
    s.bias = rng.integer(0, 1) == 1;
    s.act = static_cast<Activation>(rng.integer(0, 2));
    check_s8(rng, s, S8Extras{rng.integer(0, 1) == 1, true});
  }
  // M = 8 with a layout handed in: the tile path runs, the layout is ignored.
  check_s8(rng, Shape{8, 260, 37, 1, 4, 0.8, true, Activation::Relu}, S8Extras{false, true});
  test_s8_lanes_refuse_bad_weights();
}

// ---- non-finite inputs --------------------------------------------------------------------

// NaN and +-Inf in A on every tier and path (the row path at M < 8: per row of A, and several
// at once on AVX-512; the M-vectorized one from 8, with a partial tile at 9 and 17), every
// block shape, odd K and N: each tier must give NaN and the infinities exactly where the
// reference does. The AVX2 row loop once multiplied its padding slots (zero weights) by the A
// quads of other columns, so an Inf there became NaN; the AVX-512 2:4 row loop multiplied
// the positions a group did not keep by A.
void test_non_finite(Rng& rng) {
  const std::vector<std::pair<int, int>> blocks{{1, 4}, {4, 1}, {16, 1}, {4, 4},
                                                {1, 1}, {2, 2}, {3, 2}};
  for (const int64_t M : {1, 2, 3, 4, 5, 7, 8, 9, 17}) {
    for (const auto& block : blocks) {
      for (int t = 0; t < 3; ++t) {
        Shape s{M, rng.integer(1, 70), rng.integer(1, 50), block.first, block.second,
                rng.pick<double>({0.0, 0.5, 0.9}), rng.integer(0, 1) == 1,
                static_cast<Activation>(t)};
        check_f32(rng, s, true);
      }
    }
    // 1x4 rows of many blocks: whole 8-block steps, then masked ones, on AVX-512.
    check_f32(rng, Shape{M, 203, 37, 1, 4, 0.25, true, Activation::Relu}, true);
    for (const int64_t K : {12, 36, 68, 260}) {
      const Shape s{M, K, rng.integer(1, 40), 1, 1, 0.1, M % 2 == 1,
                    static_cast<Activation>(K % 3)};
      check_24(rng, s, true);
    }
  }
}

// The fused ReLU on every tier is ONNX Runtime's Relu, max(x, 0) that keeps x unless x < 0:
// NaN stays NaN, -0 stays -0, the same bits as the scalar rule otherwise; after a bias that
// brings NaN and infinities of its own; row lengths 1..40 (every vector tail).
void test_relu() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const float xs[] = {nan, inf, -inf, 0.0f, -0.0f, 1.0f, -1.0f, 1e-45f, -1e-45f, 3e38f, -3e38f};
  const float bs[] = {0.0f, -0.0f, nan, inf, -inf, 1.0f, -2.0f};
  constexpr size_t nx = sizeof xs / sizeof xs[0], nb = sizeof bs / sizeof bs[0];
  for (Isa isa : tiers()) {
    ++g_checks;
    bool ok = true;
    for (int64_t len = 1; len <= 40 && ok; ++len) {
      for (const bool with_bias : {false, true}) {
        std::vector<float> y(static_cast<size_t>(len)), bias(y.size()), want(y.size());
        for (int64_t n = 0; n < len; ++n) {
          const auto i = static_cast<size_t>(n);
          y[i] = xs[(i + static_cast<size_t>(len)) % nx];
          bias[i] = bs[(i * 3 + static_cast<size_t>(len)) % nb];
          want[i] = activate(with_bias ? y[i] + bias[i] : y[i], Activation::Relu);
        }
        detail::apply_epilogue_row_isa(y.data(), len, with_bias ? bias.data() : nullptr,
                                       Activation::Relu, isa);
        for (size_t i = 0; i < y.size() && ok; ++i) {
          const bool same = std::isnan(want[i]) ? std::isnan(y[i])
                                                : std::memcmp(&y[i], &want[i], sizeof(float)) == 0;
          if (!same) {
            ok = false;
            if (g_failures++ < 20) {
              std::printf("FAIL relu %s: len=%lld bias=%d y[%zu] = %.9g, want %.9g\n",
                          isa_name(isa), static_cast<long long>(len), with_bias ? 1 : 0, i,
                          y[i], want[i]);
            }
          }
        }
      }
    }
  }
}

// ---- the fused GELU ---------------------------------------------------------------------

// The epilogue's erf-GELU on every tier against 0.5 x erfc(-x / sqrt 2) in double, over a wide
// range: a dense sweep of [-20, 20] (the negative tail, where Phi(x) is tiny, included), tiny
// and denormal x, large |x|, +-0, +-inf and NaN; row lengths 1..40 cover the vector tails.
// The vector tiers must be within kGeluTol of the output's own magnitude; the scalar tier
// (std::erf, which loses the negative tail to cancellation in 1 + erf) within 1e-7 |x|.
// K = 0 (A is [M, 0], no blocks): Y = act(bias), or act(0) without one, on every tier and
// on both the row (M < 8) and M-vectorized (M >= 8) paths; the latter once stored Y only from
// its last K panel, so with no panel at all Y kept what was there (NaN here). M = 0 and
// N = 0 must write nothing (the guards). Pointers are non-null, as the binding passes them.
void test_k_zero() {
  alignas(64) static const unsigned char empty[64] = {};
  const auto* no_floats = reinterpret_cast<const float*>(empty);
  const auto* no_i32 = reinterpret_cast<const int32_t*>(empty);
  const auto* no_i8 = reinterpret_cast<const int8_t*>(empty);
  const auto* no_u8 = reinterpret_cast<const uint8_t*>(empty);
  for (const int64_t M : {0, 1, 7, 8, 9, 33, 64, 100}) {
    for (const int64_t N : {0, 1, 16, 37, 300}) {
      for (const int act_index : {0, 1, 2}) {
        for (const bool with_bias : {false, true}) {
          const auto act = static_cast<Activation>(act_index);
          std::vector<float> bias(static_cast<size_t>(N) + 1);
          for (int64_t n = 0; n < N; ++n) bias[static_cast<size_t>(n)] = 0.25f * (n % 9) - 1.0f;
          const float* b = with_bias ? bias.data() : nullptr;
          std::vector<float> want(static_cast<size_t>(M * N)), scale(want.size(), 1.0f);
          for (int64_t i = 0; i < M * N; ++i) {
            want[static_cast<size_t>(i)] = activate(b ? b[i % N] : 0.0f, act);
          }
          const std::vector<int32_t> row_ptr(static_cast<size_t>(N) + 1, 0);  // R = 1
          std::vector<int32_t> rowsum(static_cast<size_t>(N) + 1, 0);
          const float w_scale = 0.5f;
          const BsrF32 wf{0, N, 1, 4, 0, no_floats, no_i32, row_ptr.data()};
          const Packed24F32 w24{0, N, no_floats, no_u8};
          const BsrS8 ws{0, N, 1, 4, 0, no_i8, no_i32, row_ptr.data(), &w_scale, 1,
                         rowsum.data()};
          const Shape s{M, 0, N, 1, 4, 1.0, with_bias, act};
          for (Isa isa : tiers()) {
            for (const Parallel& par : parallels()) {
              Output y(M * N);
              sparse_matmul_f32(no_floats, M, wf, b, act, y.data(), par, isa);
              compare(describe("K=0 sparse_matmul_f32", s, isa, par.threads), y, want, scale,
                      1e-6);
              Output y24(M * N);
              sparse_matmul_24_f32(no_floats, M, w24, b, act, y24.data(), par, isa);
              compare(describe("K=0 sparse_matmul_24_f32", s, isa, par.threads), y24, want, scale,
                      1e-6);
              Output y8(M * N);
              sparse_qmatmul_s8(no_u8, M, 0.1f, 7, ws, b, act, y8.data(), par, isa);
              compare(describe("K=0 sparse_qmatmul_s8", s, isa, par.threads), y8, want, scale,
                      1e-6);
            }
          }
        }
      }
    }
  }
}

// K = kMaxS8K, the largest the binding allows, with the extreme products (a = 255 against
// w = -128 or 127): the int32 sums reach -255*128*K = -2147483520, exact on every tier. Then
// a w_rowsum inside [-128K, 127K] but not the weight's: a_zero_point * w_rowsum alone fits,
// acc minus it does not; dequant wraps modulo 2^32 as the SIMD tiers do, so every tier gives
// the same (wrong, but defined) number where the scalar code once overflowed (UB).
void test_s8_largest_k() {
  const int64_t K = kMaxS8K, N = 16;
  for (const int w_value : {-128, 127}) {
    for (const int64_t M : {1, 3, 9}) {
      const Shape s{M, K, N, 1, 4, 0.0, false, Activation::None};
      std::vector<int8_t> values(static_cast<size_t>(N * ((K + 3) / 4) * 4), 0);
      std::vector<int32_t> col_idx, row_ptr{0};
      const int64_t kd = (K + 3) / 4;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t j = 0; j < kd; ++j) {
          for (int64_t c = 0; c < 4; ++c) {
            values[static_cast<size_t>((n * kd + j) * 4 + c)] =
                static_cast<int8_t>(j * 4 + c < K ? w_value : 0);
          }
          col_idx.push_back(static_cast<int32_t>(j));
        }
        row_ptr.push_back(static_cast<int32_t>(col_idx.size()));
      }
      std::vector<int32_t> rowsum(static_cast<size_t>(N), static_cast<int32_t>(w_value * K));
      const float w_scale = 1.0f;
      const std::vector<uint8_t> a(static_cast<size_t>(M * K), 255);
      const BsrS8 W{K, N, 1, 4, static_cast<int64_t>(col_idx.size()), values.data(),
                    col_idx.data(), row_ptr.data(), &w_scale, 1, rowsum.data()};
      const double exact = 255.0 * w_value * static_cast<double>(K);
      std::vector<float> want(static_cast<size_t>(M * N), static_cast<float>(exact));
      std::vector<float> scale(want.size(), 0.0f);
      for (Isa isa : tiers()) {
        for (const Parallel& par : parallels()) {
          Output y(M * N);
          sparse_qmatmul_s8(a.data(), M, 1.0f, 0, W, nullptr, Activation::None, y.data(), par,
                            isa);
          compare(describe("largest K sparse_qmatmul_s8", s, isa, par.threads), y, want, scale,
                  0);
        }
      }
      if (M != 3) continue;
      // The foreign row sum, at the end of its range opposite the weight's sign.
      const int32_t foreign = static_cast<int32_t>(w_value < 0 ? 127 * K : -128 * K);
      std::fill(rowsum.begin(), rowsum.end(), foreign);
      const std::vector<uint8_t> a1(static_cast<size_t>(M * K), 255);
      Output ref(M * N);
      sparse_qmatmul_s8_reference(a1.data(), M, 1.0f, 255, W, nullptr, Activation::None,
                                  ref.data());
      std::vector<float> ref_values(want.size());
      for (int64_t i = 0; i < ref.size; ++i) ref_values[static_cast<size_t>(i)] = ref.at(i);
      for (Isa isa : tiers()) {
        for (const Parallel& par : parallels()) {
          Output y(M * N);
          sparse_qmatmul_s8(a1.data(), M, 1.0f, 255, W, nullptr, Activation::None, y.data(), par,
                            isa);
          compare(describe("foreign w_rowsum sparse_qmatmul_s8", s, isa, par.threads), y,
                  ref_values, scale, 0);
        }
      }
    }
  }
}

void test_gelu() {
  constexpr double kGeluTol = 1e-6;
  std::vector<float> xs;
  for (int i = -200000; i <= 200000; ++i) xs.push_back(static_cast<float>(i) * 1e-4f);
  for (float v = 1e-38f; v < 1e38f; v *= 3.7f) {
    xs.push_back(v);
    xs.push_back(-v);
  }
  const float specials[] = {0.0f, -0.0f, 1e-45f, -1e-45f, 5.0f, -5.0f, 5.5f, -5.5f,
                            13.0f, -13.0f, 27.0f, -27.0f, 1e4f, -1e4f, 3e38f, -3e38f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  xs.insert(xs.end(), std::begin(specials), std::end(specials));
  for (Isa isa : tiers()) {
    ++g_checks;
    std::vector<float> y = xs;
    // Uneven row lengths so every tail width is exercised.
    for (size_t start = 0, len = 1; start < y.size(); start += len, len = len % 40 + 1) {
      const size_t n = std::min(len, y.size() - start);
      detail::apply_epilogue_row_isa(y.data() + start, static_cast<int64_t>(n), nullptr,
                                     Activation::Gelu, isa);
    }
    double worst = 0.0;
    float worst_x = 0.0f;
    for (size_t i = 0; i < xs.size(); ++i) {
      const double x = xs[i];
      const double want = 0.5 * x * std::erfc(-x * 0.70710678118654752440);
      const double got = y[i];
      if (std::isnan(want) || std::isnan(got)) {
        if (std::isnan(want) != std::isnan(got)) worst = INFINITY, worst_x = xs[i];
        continue;
      }
      if (std::isinf(want) || std::isinf(got)) {
        if (want != got) worst = INFINITY, worst_x = xs[i];
        continue;
      }
      double mag = std::fabs(want);
      if (isa == Isa::Scalar) mag = std::max(mag, std::fabs(x) * 0.1);
      // Below float's normal range only an absolute error is meaningful.
      const double err = std::fabs(got - want) / std::max(mag, 1e-30);
      if (err > worst) worst = err, worst_x = xs[i];
    }
    if (!(worst <= kGeluTol)) {
      if (g_failures++ < 20) {
        std::printf("FAIL gelu %s: relative error %.3g at x = %.9g\n", isa_name(isa), worst,
                    worst_x);
      }
    } else {
      std::printf("gelu %s: max relative error %.3g (at x = %.6g)\n", isa_name(isa), worst,
                  worst_x);
    }
  }
}

}  // namespace
}  // namespace graphopt

int main(int argc, char** argv) {
  using namespace graphopt;
  Options opt;
  if (const char* cap = unknown_isa_cap()) {  // refused as the ORT binding refuses it
    std::fprintf(stderr,
                 "GRAPHOPT_KERNELS_ISA=\"%s\" names no tier: use scalar, avx2, avx512 or "
                 "avx512vnni, or unset it\n",
                 cap);
    return 2;
  }
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--info") {
      std::printf("detected isa: %s\nselected isa: %s\n", isa_name(detect_isa()),
                  isa_name(selected_isa()));
      return 0;
    }
    if (i + 1 < argc && arg == "--cases") {
      opt.cases = std::atoi(argv[++i]);
    } else if (i + 1 < argc && arg == "--seed") {
      opt.seed = static_cast<unsigned>(std::strtoul(argv[++i], nullptr, 10));
    } else if (i + 1 < argc && arg == "--max-dim") {
      opt.max_dim = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--cases N] [--seed S] [--max-dim D] | --info\n", argv[0]);
      return 2;
    }
  }
  Rng rng(opt.seed);
  test_f32(rng, opt);
  test_f32_fixed(rng);
  test_24(rng, opt);
  test_24_fixed(rng);
  test_s8(rng, opt);
  test_s8_lanes(rng, opt);
  test_k_zero();
  test_s8_largest_k();
  test_gelu();
  test_non_finite(rng);
  test_relu();
  std::printf("kernel_tests: %d cases per op, tiers scalar..%s, %ld comparisons, %d failures\n",
              opt.cases, isa_name(detect_isa()), g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
