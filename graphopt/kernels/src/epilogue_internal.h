// Internal to the epilogue: the ISA-specific row epilogues that apply_epilogue_row dispatches
// to, and the constants of graphopt's vectorized erf-GELU, shared by both ISA files.
//
// GELU(x) = x * Phi(x), Phi the standard normal CDF. With z = |x| / sqrt(2):
//   Phi(x) = erfc(z) / 2 for x < 0 and 1 - erfc(z) / 2 for x >= 0,
//   erfc(z) = t * exp(P(t) - z^2), t = 1 / (1 + z / 2)   (the form of Numerical Recipes' erfcc)
// where P is a degree-9 polynomial fitted here (weighted least squares iterated toward minimax,
// numpy, against scipy's erfcx on t in (0, 1]): |P - ln(erfcx(z) / t)| < 1e-7, so erfc has a
// relative error near 1e-7 for every z >= 0. Going through erfc rather than 1 + erf keeps the
// negative tail (x << 0, Phi tiny) relatively accurate instead of cancelling to noise.
// exp is 2^n * e^r with n = round(y / ln 2), |r| <= ln 2 / 2 and a degree-5 fit of e^r
// (relative error 8e-8).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace graphopt {
namespace detail {

// Same contract as apply_epilogue_row; only call after checking the ISA (their files are
// compiled with -mavx2 / -mavx512*).
void apply_epilogue_row_avx2(float* y, int64_t N, const float* bias, Activation act);
void apply_epilogue_row_avx512(float* y, int64_t N, const float* bias, Activation act);
// apply_epilogue_row on a chosen tier (tests compare the tiers; Scalar uses std::erf).
void apply_epilogue_row_isa(float* y, int64_t N, const float* bias, Activation act, Isa isa);

namespace gelu {
constexpr float kInvSqrt2 = 0.70710678118654752440f;
// P(t) = kP[0] + kP[1] t + ... + kP[9] t^9.
constexpr float kP[10] = {-1.26551223f, 1.00002265f,  0.374124885f, 0.096389398f,
                          -0.183971986f, 0.271367013f, -1.12112415f, 1.47327769f,
                          -0.813336492f, 0.168763205f};
// e^r ~ kE[0] + kE[1] r + ... + kE[5] r^5 on |r| <= ln 2 / 2.
constexpr float kE[6] = {1.00000012f,  0.999999702f,  0.499988943f,
                         0.166675746f, 0.0419153459f, 0.00829759426f};
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so n * kLn2Hi is exact
constexpr float kLn2Lo = 1.42860682030941723212e-6f;
// Below this exponent e^y underflows the normal range; erfc(z) < 1e-38 there and
// x * Phi(x) is negligible, so the exponent is clamped (keeps 2^n a normal number).
constexpr float kMinExponent = -87.0f;
}  // namespace gelu

}  // namespace detail
}  // namespace graphopt
