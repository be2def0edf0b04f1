// fp32 BSR MatMul, AVX-512 variant (compiled with -mavx512f/bw/vl/dq -mfma). The kernels are
// the templates in sparse_f32_impl.h, instantiated here with 16-lane vectors.
#define GRAPHOPT_F32_SIMD_NS f32_avx512
#include "sparse_f32_impl.h"

namespace graphopt {
namespace detail {

void sparse_matmul_f32_avx512(const float* A, int64_t M, const BsrF32& W, const float* bias,
                              Activation act, float* Y, const Parallel& par) {
  // 4 vectors of M (Mt = 64) keep the A^T tile of K = 3072 within a 1 MiB L2; up to 16
  // accumulators leave registers for the A^T loads and the broadcast weights.
  f32_avx512::bsr_f32<f32_avx512::V16>(A, M, W, bias, act, Y, par, 4, 16);
}

}  // namespace detail
}  // namespace graphopt
