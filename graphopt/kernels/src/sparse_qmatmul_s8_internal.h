// Internal to the int8 block-sparse kernel (sparse_qmatmul_s8*.cc): the ISA-specific entry
// points the dispatcher in sparse_qmatmul_s8.cc calls after checking the selected ISA, and the
// helpers they share. Each *_avx2.cc / *_avx512vnni.cc file is compiled with its own ISA flags,
// so only functions declared here (plain C++ types) cross those boundaries.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace graphopt {
namespace qs8 {

// Everything one call needs, so a part function gets a single pointer.
struct Problem {
  const uint8_t* A;
  int64_t M;
  float a_scale;
  uint8_t a_zero_point;
  const BsrS8* W;
  const float* bias;
  Activation act;
  float* Y;
};

// Splits block rows [0, nbr) into `parts` ranges of about equal nnzb (row_ptr is cumulative,
// so a binary search per boundary suffices). bounds has parts + 1 entries.
void balanced_bounds(const int32_t* row_ptr, int64_t nbr, int64_t parts, int64_t* bounds);

// How many parts to split a call into: 1 on one thread (no pool round trip), else a few per
// thread (load balance) but each with at least min_work of `work` (an estimate in the
// caller's units; double, as products of sizes may exceed int64 for absurd shapes).
int64_t choose_parts(const Parallel& par, int64_t nbr, double work, double min_work);

// nnzb * R * M: stored block rows times rows of A, the common factor of every work estimate.
inline double work_units(const BsrS8& W, int64_t M) {
  return static_cast<double>(W.nnzb) * static_cast<double>(W.R) * static_cast<double>(M);
}

// Float result of one output from its int32 dot sum_k a*w (a raw uint8): the zero point is
// removed through the weight row sum, then the two scales are applied.
// The correction is computed modulo 2^32, as the SIMD tiers' vpmulld/vpsubd do, so every tier
// agrees bit for bit and none has signed overflow (UB in C++) whatever w_rowsum holds. It is
// exact whenever the true sum_k (a - zero_point) * w fits int32: always for a w_rowsum that is
// the weight's own and K <= kMaxS8K (|a - zero_point| <= 255, |w| <= 128), even where the
// two terms alone would overflow.
inline float dequant(int32_t acc, const Problem& p, int64_t n) {
  const BsrS8& W = *p.W;
  const float ws = W.w_scale_size == 1 ? W.w_scale[0] : W.w_scale[n];
  const uint32_t correction =
      uint32_t{p.a_zero_point} * static_cast<uint32_t>(W.w_rowsum[n]);  // mod 2^32
  const auto corrected = static_cast<int32_t>(static_cast<uint32_t>(acc) - correction);
  return static_cast<float>(corrected) * (p.a_scale * ws);
}

// Portable, threaded over block rows (the fallback below AVX2).
void run_scalar(const Problem& p, const Parallel& par);
void run_avx2(const Problem& p, const Parallel& par);
void run_avx512vnni(const Problem& p, const Parallel& par);
// M = 1 on the row-lane layout (lanes built from *p.W, p.M == 1).
void run_lanes_avx512vnni(const Problem& p, const RowLanesS8& lanes, const Parallel& par);

}  // namespace qs8
}  // namespace graphopt
