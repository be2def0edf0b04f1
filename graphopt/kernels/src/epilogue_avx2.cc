// The row epilogue (bias, then none / ReLU / erf-GELU), AVX2 + FMA (compiled with -mavx2
// -mfma): 8 outputs per step, the row's tail through an 8-float buffer. The GELU math is in
// epilogue_internal.h.
#include <immintrin.h>

#include <cstring>

#include "epilogue_internal.h"

namespace graphopt {
namespace detail {
namespace {

// x * Phi(x) for 8 lanes (see epilogue_internal.h for the formula and its accuracy).
inline __m256 gelu8(__m256 x) {
  using namespace gelu;
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 z = _mm256_mul_ps(ax, _mm256_set1_ps(kInvSqrt2));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                                 _mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(kP[9]);
  for (int i = 8; i >= 0; --i) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kP[i]));
  // erfc(z) = t * exp(P - z^2), z^2 = x^2 / 2 carried as x2 + x2_lo (an exact product). The
  // exponent reaches -87: one float holding it would round off ~4e-6 of the result, so the
  // reduction subtracts n ln 2 from x2 / 2 first (exact enough) and adds the small P after.
  const __m256 x2 = _mm256_mul_ps(ax, ax);
  const __m256 x2_lo = _mm256_fmsub_ps(ax, ax, x2);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 e0 = _mm256_fnmadd_ps(x2, half, p);  // only to choose n
  // Past kMinExponent erfc(z) < 1e-38 (and NaN x lands here too): Phi(x) is 0 or 1 there.
  // The clamp keeps n in [-126, 0], so 2^n is built in the exponent bits.
  const __m256 in_range = _mm256_cmp_ps(e0, _mm256_set1_ps(kMinExponent), _CMP_GE_OQ);
  const __m256 e = _mm256_max_ps(e0, _mm256_set1_ps(kMinExponent));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(e, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), _mm256_mul_ps(x2, _mm256_set1_ps(-0.5f)));
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  r = _mm256_add_ps(r, _mm256_fnmadd_ps(x2_lo, half, p));
  __m256 q = _mm256_set1_ps(kE[5]);
  for (int i = 4; i >= 0; --i) q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(kE[i]));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 half_erfc = _mm256_and_ps(
      in_range, _mm256_mul_ps(_mm256_mul_ps(q, _mm256_castsi256_ps(bits)), _mm256_mul_ps(t, half)));
  const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 phi =
      _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), half_erfc), half_erfc, negative);
  return _mm256_mul_ps(x, phi);
}

template <Activation kAct>
inline __m256 step(__m256 v, const float* bias) {
  if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
  // maxps returns its second operand when either is NaN (or both are zeros): 0 first, so a
  // NaN y stays NaN and -0 stays -0, as ONNX Runtime's Relu gives them.
  if (kAct == Activation::Relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
  if (kAct == Activation::Gelu) v = gelu8(v);
  return v;
}

template <Activation kAct>
void row(float* y, int64_t N, const float* bias) {
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    const float* b = bias != nullptr ? bias + n : nullptr;
    _mm256_storeu_ps(y + n, step<kAct>(_mm256_loadu_ps(y + n), b));
  }
  if (n < N) {
    const size_t bytes = static_cast<size_t>(N - n) * sizeof(float);
    alignas(32) float yt[8] = {}, bt[8] = {};
    std::memcpy(yt, y + n, bytes);
    if (bias != nullptr) std::memcpy(bt, bias + n, bytes);
    _mm256_store_ps(yt, step<kAct>(_mm256_load_ps(yt), bias != nullptr ? bt : nullptr));
    std::memcpy(y + n, yt, bytes);
  }
}

}  // namespace

void apply_epilogue_row_avx2(float* y, int64_t N, const float* bias, Activation act) {
  switch (act) {
    case Activation::None:
      row<Activation::None>(y, N, bias);
      break;
    case Activation::Relu:
      row<Activation::Relu>(y, N, bias);
      break;
    case Activation::Gelu:
      row<Activation::Gelu>(y, N, bias);
      break;
  }
}

}  // namespace detail
}  // namespace graphopt
