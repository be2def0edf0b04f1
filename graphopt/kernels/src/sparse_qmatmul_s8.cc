// Int8 block-sparse matmul (SparseQMatMul): u8 activations x s8 symmetric BSR weights, float out.
//
// This file holds the portable reference (baseline x86-64, no intrinsics) and the dispatcher.
// The dispatcher calls the AVX-512 VNNI or AVX2 kernels only when `isa` allows them; those live
// in files CMake compiles with their ISA flags (sparse_qmatmul_s8_{avx2,avx512vnni}.cc).
//
// Arithmetic, shared by every variant so they agree bit for bit: acc = sum_k A[m,k] * W[k,n] in
// int32 over stored blocks only (k < K, n < N; padding entries are never read against A), then
// y = a_scale * w_scale[n] * (acc - a_zero_point * w_rowsum[n]), then bias and activation via
// apply_epilogue_row. int32 is exact: |a*w| <= 255*128, so K up to ~65k cannot overflow.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "sparse_qmatmul_s8_internal.h"

namespace graphopt {
namespace qs8 {

void balanced_bounds(const int32_t* row_ptr, int64_t nbr, int64_t parts, int64_t* bounds) {
  const int64_t total = row_ptr[nbr];
  bounds[0] = 0;
  for (int64_t t = 1; t < parts; ++t) {
    // First block row whose start reaches t/parts of the nonzero blocks; rows are never split.
    const int64_t target = total * t / parts;
    const int32_t* it = std::lower_bound(row_ptr, row_ptr + nbr, static_cast<int32_t>(target));
    int64_t b = it - row_ptr;
    b = std::max(b, bounds[t - 1]);
    bounds[t] = std::min(b, nbr);
  }
  bounds[parts] = nbr;
}

int64_t choose_parts(const Parallel& par, int64_t nbr, double work, double min_work) {
  if (par.threads <= 1 || nbr <= 1) return 1;
  const double by_work = std::max(1.0, std::floor(work / std::max(1.0, min_work)));
  int64_t parts = static_cast<int64_t>(par.threads) * 4;
  if (by_work < static_cast<double>(parts)) parts = static_cast<int64_t>(by_work);
  return std::max<int64_t>(1, std::min(parts, nbr));
}

namespace {

// Rows m of Y for block rows [i0, i1) (outputs [i0*R, min(i1*R, N))), all m in [m0, m1).
void scalar_rows(const Problem& p, int64_t i0, int64_t i1, int64_t m0, int64_t m1) {
  const BsrS8& W = *p.W;
  const int64_t R = W.R, C = W.C, K = W.K, N = W.N;
  const int64_t n0 = i0 * R, n1 = std::min(i1 * R, N);
  if (n1 <= n0) return;
  std::vector<int32_t> acc(static_cast<size_t>(n1 - n0));
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* a = p.A + m * K;
    std::fill(acc.begin(), acc.end(), 0);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t b = W.row_ptr[i]; b < W.row_ptr[i + 1]; ++b) {
        const int64_t k0 = static_cast<int64_t>(W.col_idx[b]) * C;
        const int64_t kc = std::min(C, K - k0);  // last block column may hang past K
        const int8_t* v = W.values + b * R * C;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t n = i * R + r;
          if (n >= N) break;
          int32_t s = 0;
          for (int64_t c = 0; c < kc; ++c) s += static_cast<int32_t>(a[k0 + c]) * v[r * C + c];
          acc[static_cast<size_t>(n - n0)] += s;
        }
      }
    }
    float* y = p.Y + m * N + n0;
    for (int64_t n = n0; n < n1; ++n) y[n - n0] = dequant(acc[static_cast<size_t>(n - n0)], p, n);
    apply_epilogue_row(y, n1 - n0, p.bias ? p.bias + n0 : nullptr, p.act);
  }
}

struct ScalarJob {
  const Problem* p;
  const int64_t* bounds;
};

void scalar_part(void* arg, size_t t) {
  const auto* job = static_cast<const ScalarJob*>(arg);
  scalar_rows(*job->p, job->bounds[t], job->bounds[t + 1], 0, job->p->M);
}

}  // namespace

void run_scalar(const Problem& p, const Parallel& par) {
  const BsrS8& W = *p.W;
  const int64_t nbr = (W.N + W.R - 1) / W.R;
  const int64_t parts = choose_parts(par, nbr, work_units(W, p.M) * W.C, 65536);
  std::vector<int64_t> bounds(static_cast<size_t>(parts + 1));
  balanced_bounds(W.row_ptr, nbr, parts, bounds.data());
  ScalarJob job{&p, bounds.data()};
  if (parts == 1) {
    scalar_part(&job, 0);
  } else {
    par.run(par, static_cast<size_t>(parts), scalar_part, &job);
  }
}

}  // namespace qs8

void sparse_qmatmul_s8_reference(const uint8_t* A, int64_t M, float a_scale,
                                 uint8_t a_zero_point, const BsrS8& W, const float* bias,
                                 Activation act, float* Y) {
  if (M <= 0 || W.N <= 0) return;
  const qs8::Problem p{A, M, a_scale, a_zero_point, &W, bias, act, Y};
  qs8::scalar_rows(p, 0, (W.N + W.R - 1) / W.R, 0, M);
}

void sparse_qmatmul_s8(const uint8_t* A, int64_t M, float a_scale, uint8_t a_zero_point,
                       const BsrS8& W, const float* bias, Activation act, float* Y,
                       const Parallel& par, Isa isa) {
  if (M <= 0 || W.N <= 0) return;
  const qs8::Problem p{A, M, a_scale, a_zero_point, &W, bias, act, Y};
  // The SIMD kernels read weights 4 consecutive k at a time; the contract guarantees C % 4 == 0
  // but the check keeps a violating caller correct (scalar) rather than out of bounds.
  const bool simd_ok = W.C % 4 == 0 && W.R >= 1 && W.K > 0;
  if (simd_ok && isa >= Isa::Avx512Vnni) {
    qs8::run_avx512vnni(p, par);
  } else if (simd_ok && isa >= Isa::Avx2) {
    qs8::run_avx2(p, par);
  } else {
    qs8::run_scalar(p, par);
  }
}

}  // namespace graphopt
