// fp32 block-sparse (BSR) MatMul: the plain reference kernel and the dispatcher that picks the
// vectorized variant for the ISA. This file is compiled for baseline x86-64.
#include <vector>

#include "kernels.h"
#include "sparse_f32_impl.h"

namespace graphopt {

void sparse_matmul_f32_reference(const float* A, int64_t M, const BsrF32& W, const float* bias,
                                 Activation act, float* Y) {
  const int64_t K = W.K, N = W.N, R = W.R, C = W.C;
  const int64_t block_rows = (N + R - 1) / R;
  std::vector<double> acc(static_cast<size_t>(R));
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * K;
    float* y = Y + m * N;
    for (int64_t i = 0; i < block_rows; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t b = W.row_ptr[i]; b < W.row_ptr[i + 1]; ++b) {
        const int64_t k0 = static_cast<int64_t>(W.col_idx[b]) * C;
        const float* v = W.values + b * R * C;
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t c = 0; c < C && k0 + c < K; ++c) {
            acc[static_cast<size_t>(r)] +=
                static_cast<double>(v[r * C + c]) * static_cast<double>(a[k0 + c]);
          }
        }
      }
      for (int64_t r = 0; r < R && i * R + r < N; ++r) {
        y[i * R + r] = static_cast<float>(acc[static_cast<size_t>(r)]);
      }
    }
    apply_epilogue_row(y, N, bias, act);
  }
}

void sparse_matmul_f32(const float* A, int64_t M, const BsrF32& W, const float* bias,
                       Activation act, float* Y, const Parallel& par, Isa isa) {
  if (M <= 0 || W.N <= 0) {
    return;
  }
  // K = 0 (no block columns, no blocks): Y = act(bias). The reference writes that; the SIMD
  // tiers' M-vectorized path stores Y from its last K panel, and K = 0 has no panel at all
  // (Y was left as the allocator had it).
  if (W.K == 0) {
    sparse_matmul_f32_reference(A, M, W, bias, act, Y);
    return;
  }
  if (isa >= Isa::Avx512) {
    detail::sparse_matmul_f32_avx512(A, M, W, bias, act, Y, par);
  } else if (isa >= Isa::Avx2) {
    detail::sparse_matmul_f32_avx2(A, M, W, bias, act, Y, par);
  } else {
    sparse_matmul_f32_reference(A, M, W, bias, act, Y);
  }
}

}  // namespace graphopt
