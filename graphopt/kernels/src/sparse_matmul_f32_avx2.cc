// fp32 BSR MatMul, AVX2 variant (compiled with -mavx2 -mfma). The kernels are the templates in
// sparse_f32_impl.h, instantiated here with 8-lane vectors.
#define GRAPHOPT_F32_SIMD_NS f32_avx2
#include "sparse_f32_impl.h"

namespace graphopt {
namespace detail {

void sparse_matmul_f32_avx2(const float* A, int64_t M, const BsrF32& W, const float* bias,
                            Activation act, float* Y, const Parallel& par) {
  // 16 ymm registers: up to 8 accumulators leave room for the A^T loads and the weight.
  f32_avx2::bsr_f32<f32_avx2::V8>(A, M, W, bias, act, Y, par, 4, 8);
}

}  // namespace detail
}  // namespace graphopt
