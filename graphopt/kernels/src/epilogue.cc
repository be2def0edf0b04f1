// The epilogue every kernel applies to a finished output row: bias, then the activation.
//
// ReLU and GELU give what ONNX Runtime's Relu and Gelu give on NaN and +-Inf as well: NaN
// through both, Relu(-Inf) = 0, Gelu(+Inf) = +Inf, Gelu(-Inf) = NaN (-Inf * 0).
//
// GELU is the erf form, as ONNX's Gelu (approximate="none") and as torch.nn.GELU() export it,
// so a fused SparseMatMul matches the MatMul + Add + Gelu it replaces. The AVX2 / AVX-512 rows
// (epilogue_avx2.cc / epilogue_avx512.cc) evaluate it with a vectorized erfc (see
// epilogue_internal.h) instead of scalar std::erf, which cost more than the sparse product
// itself at high sparsity. This file is compiled for baseline x86-64.
#include <cmath>

#include "epilogue_internal.h"
#include "kernels.h"

namespace graphopt {
namespace {

void epilogue_row_scalar(float* y, int64_t N, const float* bias, Activation act) {
  if (bias != nullptr) {
    for (int64_t n = 0; n < N; ++n) y[n] += bias[n];
  }
  switch (act) {
    case Activation::None:
      break;
    case Activation::Relu:
      // ONNX Runtime's Relu: y unless y < 0, so NaN stays NaN (and -0 stays -0), as the
      // vector tiers' max(0, y) gives it.
      for (int64_t n = 0; n < N; ++n) y[n] = y[n] < 0.0f ? 0.0f : y[n];
      break;
    case Activation::Gelu:
      for (int64_t n = 0; n < N; ++n) {
        const float x = y[n];
        y[n] = 0.5f * x * (1.0f + std::erf(x * detail::gelu::kInvSqrt2));
      }
      break;
  }
}

}  // namespace

namespace detail {

void apply_epilogue_row_isa(float* y, int64_t N, const float* bias, Activation act, Isa isa) {
  if (N <= 0 || (bias == nullptr && act == Activation::None)) return;
  if (isa >= Isa::Avx512) {
    apply_epilogue_row_avx512(y, N, bias, act);
  } else if (isa >= Isa::Avx2) {
    apply_epilogue_row_avx2(y, N, bias, act);
  } else {
    epilogue_row_scalar(y, N, bias, act);
  }
}

}  // namespace detail

void apply_epilogue_row(float* y, int64_t N, const float* bias, Activation act) {
  // The cap (GRAPHOPT_KERNELS_ISA) is read on every call, as the kernels' dispatch reads it:
  // once per output row and thread part, negligible next to the row's work. (The M-vectorized
  // kernels call their own tier's row epilogue directly.)
  detail::apply_epilogue_row_isa(y, N, bias, act, selected_isa());
}

}  // namespace graphopt
