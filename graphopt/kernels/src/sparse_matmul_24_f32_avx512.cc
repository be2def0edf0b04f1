// fp32 2:4 MatMul, AVX-512 variant (compiled with -mavx512f/bw/vl/dq -mfma). The kernels are the
// templates in sparse_f32_impl.h, instantiated here with the AVX-512 vector traits.
#define GRAPHOPT_F32_SIMD_NS f32_avx512
#include "sparse_f32_impl.h"

namespace graphopt {
namespace detail {

void sparse_matmul_24_f32_avx512(const float* A, int64_t M, const Packed24F32& W,
                               const float* bias, Activation act, float* Y, const Parallel& par) {
  f32_avx512::s24_f32<f32_avx512::V16>(A, M, W, bias, act, Y, par, 4);
}

}  // namespace detail
}  // namespace graphopt
