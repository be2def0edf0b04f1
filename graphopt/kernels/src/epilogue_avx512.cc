// The row epilogue (bias, then none / ReLU / erf-GELU), AVX-512 (compiled with -mavx512f...):
// 16 outputs per step, the row's tail under a mask. The GELU math is in epilogue_internal.h.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "epilogue_internal.h"

namespace graphopt {
namespace detail {
namespace {

// x * Phi(x) for 16 lanes (see epilogue_internal.h for the formula and its accuracy).
inline __m512 gelu16(__m512 x) {
  using namespace gelu;
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 z = _mm512_mul_ps(ax, _mm512_set1_ps(kInvSqrt2));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                 _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(kP[9]);
  for (int i = 8; i >= 0; --i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kP[i]));
  // erfc(z) = t * exp(P - z^2), z^2 = x^2 / 2 carried as x2 + x2_lo (an exact product). The
  // exponent reaches -87: one float holding it would round off ~4e-6 of the result, so the
  // reduction subtracts n ln 2 from x2 / 2 first (exact enough) and adds the small P after.
  const __m512 x2 = _mm512_mul_ps(ax, ax);
  const __m512 x2_lo = _mm512_fmsub_ps(ax, ax, x2);
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 e = _mm512_fnmadd_ps(x2, half, p);  // only to choose n
  // Past kMinExponent erfc(z) < 1e-38 (and NaN x lands here too): Phi(x) is 0 or 1 there.
  const __mmask16 in_range = _mm512_cmp_ps_mask(e, _mm512_set1_ps(kMinExponent), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(e, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), _mm512_mul_ps(x2, _mm512_set1_ps(-0.5f)));
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  r = _mm512_add_ps(r, _mm512_fnmadd_ps(x2_lo, half, p));
  __m512 q = _mm512_set1_ps(kE[5]);
  for (int i = 4; i >= 0; --i) q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kE[i]));
  const __m512 half_erfc =
      _mm512_maskz_mul_ps(in_range, _mm512_scalef_ps(q, n), _mm512_mul_ps(t, half));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 phi =
      _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.0f), half_erfc), half_erfc);
  return _mm512_mul_ps(x, phi);
}

template <Activation kAct>
void row(float* y, int64_t N, const float* bias) {
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 m = N - n >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (N - n)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, y + n);
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n));
    // 0 first: vmaxps returns its second operand when either is NaN (see epilogue_avx2.cc).
    if (kAct == Activation::Relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);
    if (kAct == Activation::Gelu) v = gelu16(v);
    _mm512_mask_storeu_ps(y + n, m, v);
  }
}

}  // namespace

void apply_epilogue_row_avx512(float* y, int64_t N, const float* bias, Activation act) {
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
