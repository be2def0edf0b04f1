// fp32 2:4 structured-sparse MatMul: the plain reference kernel and the dispatcher that picks
// the vectorized variant for the ISA. This file is compiled for baseline x86-64.
#include "kernels.h"
#include "sparse_f32_impl.h"

namespace graphopt {

void sparse_matmul_24_f32_reference(const float* A, int64_t M, const Packed24F32& W,
                                    const float* bias, Activation act, float* Y) {
  const int64_t K = W.K, N = W.N;
  const int64_t groups = K / 4, half = K / 2, idx_stride = (K + 7) / 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * K;
    float* y = Y + m * N;
    for (int64_t n = 0; n < N; ++n) {
      const float* v = W.values + n * half;
      const uint8_t* idx = W.indices + n * idx_stride;
      double acc = 0.0;
      for (int64_t g = 0; g < groups; ++g) {
        const int nibble = (idx[g / 2] >> (4 * (g & 1))) & 0xF;
        acc += static_cast<double>(v[2 * g]) * static_cast<double>(a[4 * g + (nibble & 3)]);
        acc += static_cast<double>(v[2 * g + 1]) * static_cast<double>(a[4 * g + (nibble >> 2)]);
      }
      y[n] = static_cast<float>(acc);
    }
    apply_epilogue_row(y, N, bias, act);
  }
}

void sparse_matmul_24_f32(const float* A, int64_t M, const Packed24F32& W, const float* bias,
                          Activation act, float* Y, const Parallel& par, Isa isa) {
  if (M <= 0 || W.N <= 0) {
    return;
  }
  // K = 0: Y = act(bias), from the reference, as in sparse_matmul_f32 (whose SIMD tiers loop
  // over K panels and would never store); these tiers happen to store it, but need not.
  if (W.K == 0) {
    sparse_matmul_24_f32_reference(A, M, W, bias, act, Y);
    return;
  }
  if (isa >= Isa::Avx512) {
    detail::sparse_matmul_24_f32_avx512(A, M, W, bias, act, Y, par);
  } else if (isa >= Isa::Avx2) {
    detail::sparse_matmul_24_f32_avx2(A, M, W, bias, act, Y, par);
  } else {
    sparse_matmul_24_f32_reference(A, M, W, bias, act, Y);
  }
}

}  // namespace graphopt
