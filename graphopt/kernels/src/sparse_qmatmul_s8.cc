// Int8 block-sparse matmul (SparseQMatMul): u8 activations x s8 symmetric BSR weights, float out.
//
// This file holds the portable reference (baseline x86-64, no intrinsics) and the dispatcher.
// The dispatcher calls the AVX-512 VNNI or AVX2 kernels only when `isa` allows them; those live
// in files CMake compiles with their ISA flags (sparse_qmatmul_s8_{avx2,avx512vnni}.cc).
//
// Arithmetic, shared by every variant so they agree bit for bit: acc = sum_k A[m,k] * W[k,n] in
// int32 over stored blocks only (k < K, n < N; padding entries are never read against A), then
// y = a_scale * w_scale[n] * (acc - a_zero_point * w_rowsum[n]), then bias and activation via
// apply_epilogue_row. int32 is exact: |a*w| <= 255*128, so K up to kMaxS8K = 65793 cannot
// overflow (kernels.h); the ORT binding refuses a larger K when it creates the kernel. Past
// that contract the sums wrap modulo 2^32 on every tier (the scalar code adds in uint32, so
// a caller that breaks it gets wrong numbers, never signed overflow).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <numeric>
#include <vector>

#include "kernels.h"
#include "sparse_qmatmul_s8_internal.h"

namespace graphopt {
namespace qs8 {

void balanced_bounds(const int32_t* row_ptr, int64_t nbr, int64_t parts, int64_t* bounds) {
  const int64_t total = row_ptr[nbr];
  bounds[0] = 0;
  for (int64_t t = 1; t < parts; ++t) {
    // First block row whose start reaches t/parts of the nonzero blocks; rows are never split.
    const int64_t target = total * t / parts;
    const int32_t* it = std::lower_bound(row_ptr, row_ptr + nbr, static_cast<int32_t>(target));
    int64_t b = it - row_ptr;
    b = std::max(b, bounds[t - 1]);
    bounds[t] = std::min(b, nbr);
  }
  bounds[parts] = nbr;
}

int64_t choose_parts(const Parallel& par, int64_t nbr, double work, double min_work) {
  if (par.threads <= 1 || nbr <= 1) return 1;
  const double by_work = std::max(1.0, std::floor(work / std::max(1.0, min_work)));
  int64_t parts = static_cast<int64_t>(par.threads) * 4;
  if (by_work < static_cast<double>(parts)) parts = static_cast<int64_t>(by_work);
  return std::max<int64_t>(1, std::min(parts, nbr));
}

namespace {

// Rows m of Y for block rows [i0, i1) (outputs [i0*R, min(i1*R, N))), all m in [m0, m1).
void scalar_rows(const Problem& p, int64_t i0, int64_t i1, int64_t m0, int64_t m1) {
  const BsrS8& W = *p.W;
  const int64_t R = W.R, C = W.C, K = W.K, N = W.N;
  const int64_t n0 = i0 * R, n1 = std::min(i1 * R, N);
  if (n1 <= n0) return;
  // uint32: adds modulo 2^32 like vpaddd (see the top of the file); s itself is exact (at
  // most C <= 4096 products of at most 255*128).
  std::vector<uint32_t> acc(static_cast<size_t>(n1 - n0));
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* a = p.A + m * K;
    std::fill(acc.begin(), acc.end(), 0u);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t b = W.row_ptr[i]; b < W.row_ptr[i + 1]; ++b) {
        const int64_t k0 = static_cast<int64_t>(W.col_idx[b]) * C;
        const int64_t kc = std::min(C, K - k0);  // last block column may hang past K
        const int8_t* v = W.values + b * R * C;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t n = i * R + r;
          if (n >= N) break;
          int32_t s = 0;
          for (int64_t c = 0; c < kc; ++c) s += static_cast<int32_t>(a[k0 + c]) * v[r * C + c];
          acc[static_cast<size_t>(n - n0)] += static_cast<uint32_t>(s);
        }
      }
    }
    float* y = p.Y + m * N + n0;
    for (int64_t n = n0; n < n1; ++n) {
      y[n - n0] = dequant(static_cast<int32_t>(acc[static_cast<size_t>(n - n0)]), p, n);
    }
    apply_epilogue_row(y, n1 - n0, p.bias ? p.bias + n0 : nullptr, p.act);
  }
}

struct ScalarJob {
  const Problem* p;
  const int64_t* bounds;
};

void scalar_part(void* arg, size_t t) {
  const auto* job = static_cast<const ScalarJob*>(arg);
  scalar_rows(*job->p, job->bounds[t], job->bounds[t + 1], 0, job->p->M);
}

}  // namespace

void run_scalar(const Problem& p, const Parallel& par) {
  const BsrS8& W = *p.W;
  const int64_t nbr = (W.N + W.R - 1) / W.R;
  const int64_t parts = choose_parts(par, nbr, work_units(W, p.M) * W.C, 65536);
  std::vector<int64_t> bounds(static_cast<size_t>(parts + 1));
  balanced_bounds(W.row_ptr, nbr, parts, bounds.data());
  ScalarJob job{&p, bounds.data()};
  if (parts == 1) {
    scalar_part(&job, 0);
  } else {
    par.run(par, static_cast<size_t>(parts), scalar_part, &job);
  }
}

// ---- the M = 1 row-lane layout (LAYOUTS.md, "Derived at run time") ----------------------

namespace {

// The cost model that picks P and G, in ns, from the slot counts of each choice:
//   slots * kSlotNs[P] + groups * panels * kPanelNs + chunks * panels * kShuffleNs[G].
// A slot is one 16-lane table lookup (P vpermi2d, P - 1 compares and selects), one vpdpbusd
// and 80 bytes of layout: the loads dominate up to P = 2, the lookups above. Wider panels
// and chunks pad less (fewer slots); wider panels look up more slowly, wider chunks shuffle
// more between panels (mostly hidden). Measured on Zen 5 (AMD EPYC, 2 shared vCPUs,
// AVX-512 VNNI), one thread: all 16 (P, G) layouts of random 1x4 weights of K x N = 768 x 3072
// and 3072 x 768 at 80/90/95% block sparsity, median of 400 calls each with L2 swept between
// calls (as between the sessions of a model), three runs, least squares over the 288 timings
// (7.5% rms error; plus ~0.8 us a call; the per-panel term, 0.0-0.4 ns between fits, is
// rounded to 0.2). With L2 hot the slots cost 0.49/0.56/0.82/1.06 ns.
constexpr double kSlotNs[] = {0.78, 0.76, 0.89, 1.14};  // P = 1, 2, 3, 4
constexpr double kPanelNs = 0.2;                          // the loop around a group's panel
constexpr double kShuffleNs[] = {0.0, 0.6, 1.6, 3.5};     // G = 1, 2, 4, 8

// Blocks of each row in each panel of `width` dwords: cnt[n * panels + p].
std::vector<int32_t> panel_counts(const BsrS8& W, int64_t width, int64_t panels) {
  std::vector<int32_t> cnt(static_cast<size_t>(W.N * panels), 0);
  for (int64_t n = 0; n < W.N; ++n) {
    for (int64_t b = W.row_ptr[n]; b < W.row_ptr[n + 1]; ++b) {
      ++cnt[n * panels + W.col_idx[b] / width];
    }
  }
  return cnt;
}

// Slots of the layout with these panels and chunks of 16*G rows: per chunk and panel, the
// rows' counts in descending order (G > 1) or as they come (G = 1), each group of 16 as long
// as its longest.
int64_t count_slots(const BsrS8& W, const std::vector<int32_t>& cnt, int64_t panels, int G) {
  const int64_t C = 16 * G;
  std::vector<int32_t> v(static_cast<size_t>(C));
  int64_t total = 0;
  for (int64_t r0 = 0; r0 < W.N; r0 += C) {
    for (int64_t p = 0; p < panels; ++p) {
      std::fill(v.begin(), v.end(), 0);
      for (int64_t r = r0; r < std::min(W.N, r0 + C); ++r) v[r - r0] = cnt[r * panels + p];
      if (G > 1) std::sort(v.begin(), v.end(), std::greater<int32_t>());
      for (int64_t j = 0; j < C; j += 16) {
        total += *std::max_element(v.begin() + j, v.begin() + j + 16);
      }
    }
  }
  return total;
}

}  // namespace

}  // namespace qs8

int64_t RowLanesS8::bytes() const {
  return static_cast<int64_t>(slot_ptr.size() * sizeof(int32_t) + shuffle.size() + idx.size() +
                              storage.size() + w_scale.size() * sizeof(float) +
                              w_rowsum.size() * sizeof(int32_t));
}

std::unique_ptr<RowLanesS8> build_row_lanes_s8(const BsrS8& W, int panel_pairs,
                                               int chunk_groups) {
  if (W.R != 1 || W.C != 4 || W.K <= 0 || W.N <= 0 || W.nnzb < 0) return nullptr;
  if (panel_pairs < 0 || panel_pairs > 4 || chunk_groups < 0 || chunk_groups > 8 ||
      (chunk_groups & (chunk_groups - 1)) != 0)
    return nullptr;
  const int64_t N = W.N, kd = (W.K + 3) / 4;
  // The caller checked W; the builder still verifies every index it will turn into a panel
  // index (a check, not an assumption): row_ptr monotone from 0 to nnzb, col_idx inside
  // [0, kd) and increasing within a row. Then each block falls in exactly one panel, at a
  // local index below 32*P, and the layout's reads of A stay inside the padded panels.
  if (W.row_ptr[0] != 0 || W.row_ptr[N] != W.nnzb) return nullptr;
  for (int64_t n = 0; n < N; ++n) {
    const int32_t b0 = W.row_ptr[n], b1 = W.row_ptr[n + 1];
    if (b1 < b0 || b1 > W.nnzb) return nullptr;
    for (int32_t b = b0; b < b1; ++b) {
      const int32_t col = W.col_idx[b];
      if (col < 0 || col >= kd || (b > b0 && col <= W.col_idx[b - 1])) return nullptr;
    }
  }
  int best_p = 0, best_g = 0;
  int64_t best_slots = 0;
  double best_cost = 0.0;
  for (int P = 1; P <= 4; ++P) {
    if (panel_pairs != 0 && panel_pairs != P) continue;
    const int64_t width = 32 * static_cast<int64_t>(P), panels = (kd + width - 1) / width;
    const std::vector<int32_t> cnt = qs8::panel_counts(W, width, panels);
    for (int gi = 0; gi < 4; ++gi) {
      const int G = 1 << gi;
      if (chunk_groups != 0 && chunk_groups != G) continue;
      const int64_t chunks = (N + 16 * G - 1) / (16 * G);
      const int64_t slots = qs8::count_slots(W, cnt, panels, G);
      const double cost = static_cast<double>(slots) * qs8::kSlotNs[P - 1] +
                          static_cast<double>(chunks * G * panels) * qs8::kPanelNs +
                          static_cast<double>(chunks * panels) * qs8::kShuffleNs[gi];
      if (best_p == 0 || cost < best_cost) {
        best_p = P, best_g = G, best_slots = slots, best_cost = cost;
      }
    }
  }
  if (best_p == 0) return nullptr;
  auto L = std::make_unique<RowLanesS8>();
  const int64_t width = 32 * static_cast<int64_t>(best_p);
  const int64_t G = best_g, C = 16 * G;
  L->K = W.K, L->N = N, L->nnzb = W.nnzb, L->P = best_p, L->G = best_g;
  L->chunks = (N + C - 1) / C;
  L->panels = (kd + width - 1) / width;
  L->storage.assign(static_cast<size_t>(best_slots * 64 + 63), 0);
  auto* base = reinterpret_cast<int8_t*>(
      (reinterpret_cast<uintptr_t>(L->storage.data()) + 63) & ~uintptr_t{63});
  L->weights = base;
  L->idx.assign(static_cast<size_t>(best_slots * 16), 0);
  if (G > 1) L->shuffle.assign(static_cast<size_t>(L->chunks * L->panels * C), 0);
  L->w_scale.assign(static_cast<size_t>(L->chunks * C), 0.0f);
  L->w_rowsum.assign(static_cast<size_t>(L->chunks * C), 0);
  for (int64_t n = 0; n < N; ++n) {
    L->w_scale[static_cast<size_t>(n)] = W.w_scale_size == 1 ? W.w_scale[0] : W.w_scale[n];
    L->w_rowsum[static_cast<size_t>(n)] = W.w_rowsum[n];
  }
  L->slot_ptr.reserve(static_cast<size_t>(L->chunks * L->panels * G + 1));
  L->slot_ptr.push_back(0);
  int64_t slot = 0;
  std::vector<int64_t> cur(static_cast<size_t>(C)), end(static_cast<size_t>(C));
  std::vector<int32_t> cnt(static_cast<size_t>(C)), order(static_cast<size_t>(C));
  std::vector<int32_t> lane_of(static_cast<size_t>(C)), prev_lane_of(static_cast<size_t>(C));
  for (int64_t c = 0; c < L->chunks; ++c) {
    const int64_t r0 = c * C;
    for (int64_t r = 0; r < C; ++r) {
      cur[r] = end[r] = 0;
      if (r0 + r < N) cur[r] = W.row_ptr[r0 + r], end[r] = W.row_ptr[r0 + r + 1];
    }
    for (int64_t p = 0; p < L->panels; ++p) {
      const int64_t lim = (p + 1) * width;
      for (int64_t r = 0; r < C; ++r) {
        int64_t e = cur[r];
        while (e < end[r] && W.col_idx[e] < lim) ++e;
        cnt[r] = static_cast<int32_t>(e - cur[r]);
      }
      // This panel's lane order: longest rows first (stable: deterministic), or as they come.
      std::iota(order.begin(), order.end(), 0);
      if (G > 1) {
        std::stable_sort(order.begin(), order.end(),
                         [&](int32_t x, int32_t y) { return cnt[x] > cnt[y]; });
      }
      for (int64_t l = 0; l < C; ++l) lane_of[order[l]] = static_cast<int32_t>(l);
      if (G > 1 && p > 0) {  // the previous panel's lanes into this panel's order
        uint8_t* t = L->shuffle.data() + ((c * L->panels + p - 1) * C);
        for (int64_t l = 0; l < C; ++l) t[l] = static_cast<uint8_t>(prev_lane_of[order[l]]);
      }
      for (int64_t j = 0; j < G; ++j) {
        int64_t used = 0;
        for (int64_t l = 0; l < 16; ++l) {
          const int32_t r = order[j * 16 + l];
          for (int64_t s = 0; s < cnt[r]; ++s) {
            const int64_t b = cur[r] + s;
            const int64_t local = W.col_idx[b] - p * width;
            if (local < 0 || local >= width || slot + s >= best_slots) return nullptr;
            std::copy(W.values + b * 4, W.values + b * 4 + 4, base + (slot + s) * 64 + l * 4);
            L->idx[static_cast<size_t>((slot + s) * 16 + l)] = static_cast<uint8_t>(local);
          }
          used = std::max<int64_t>(used, cnt[r]);
        }
        slot += used;
        L->slot_ptr.push_back(static_cast<int32_t>(slot));
      }
      for (int64_t r = 0; r < C; ++r) cur[r] += cnt[r];
      std::swap(lane_of, prev_lane_of);
    }
    if (G > 1) {  // after the last panel: back to the outputs' order (row r in lane r)
      uint8_t* t = L->shuffle.data() + ((c * L->panels + L->panels - 1) * C);
      for (int64_t r = 0; r < C; ++r) t[r] = static_cast<uint8_t>(prev_lane_of[r]);
    }
    for (int64_t r = 0; r < C; ++r) {
      if (cur[r] != end[r]) return nullptr;  // a block no panel took: W broke the rules
    }
  }
  if (slot != best_slots) return nullptr;
  return L;
}

void sparse_qmatmul_s8_reference(const uint8_t* A, int64_t M, float a_scale,
                                 uint8_t a_zero_point, const BsrS8& W, const float* bias,
                                 Activation act, float* Y) {
  if (M <= 0 || W.N <= 0) return;
  const qs8::Problem p{A, M, a_scale, a_zero_point, &W, bias, act, Y};
  qs8::scalar_rows(p, 0, (W.N + W.R - 1) / W.R, 0, M);
}

void sparse_qmatmul_s8(const uint8_t* A, int64_t M, float a_scale, uint8_t a_zero_point,
                       const BsrS8& W, const float* bias, Activation act, float* Y,
                       const Parallel& par, Isa isa, const RowLanesS8* lanes) {
  if (M <= 0 || W.N <= 0) return;
  const qs8::Problem p{A, M, a_scale, a_zero_point, &W, bias, act, Y};
  // The SIMD kernels read weights 4 consecutive k at a time; the contract guarantees C % 4 == 0
  // but the check keeps a violating caller correct (scalar) rather than out of bounds.
  const bool simd_ok = W.C % 4 == 0 && W.R >= 1 && W.K > 0;
  // The row-lane layout only where it is the one built from this W (same sizes).
  const bool use_lanes = lanes != nullptr && M == 1 && W.R == 1 && W.C == 4 &&
                         lanes->K == W.K && lanes->N == W.N && lanes->nnzb == W.nnzb;
  if (use_lanes && isa >= Isa::Avx512Vnni) {
    qs8::run_lanes_avx512vnni(p, *lanes, par);
  } else if (simd_ok && isa >= Isa::Avx512Vnni) {
    qs8::run_avx512vnni(p, par);
  } else if (simd_ok && isa >= Isa::Avx2) {
    qs8::run_avx2(p, par);
  } else {
    qs8::run_scalar(p, par);
  }
}

}  // namespace graphopt
