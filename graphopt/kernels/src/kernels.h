// graphopt's sparse kernels: the plain C++ interface every kernel file implements.
//
// The ORT binding (ort_binding.cc) and the standalone test binary (kernel_tests.cc) call only
// these functions, so a kernel never sees ORT types and can be tested under sanitizers alone.
// Layouts are documented in graphopt/kernels/LAYOUTS.md; graphopt/kernels/packing.py writes
// them. All sizes are int64_t; pointers are never null unless the comment says "may be null".
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace graphopt {

// Instruction-set tiers, lowest to highest. detect_isa() reads the CPU once;
// selected_isa() is detect_isa() capped by the environment variable GRAPHOPT_KERNELS_ISA
// (scalar|avx2|avx512|avx512vnni) so tests can force the fallback (a cap, never a raise).
// unknown_isa_cap() is the variable's value when it is set but names no tier (else null):
// selected_isa() then caps nothing, so the ORT binding refuses to create a kernel instead
// (someone ruling out a tier by a misspelt name must not silently get that tier).
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3 };
Isa detect_isa();
Isa selected_isa();
const char* unknown_isa_cap();
const char* isa_name(Isa isa);

// Fused epilogue after the bias: none, max(x, 0), or GELU (erf form, as ONNX's Gelu).
enum class Activation : int { None = 0, Relu = 1, Gelu = 2 };

// How a kernel splits work: calls fn(arg, i) for every i in [0, n), possibly concurrently.
// The ORT binding runs it on the session's intra-op pool (KernelContext_ParallelFor); tests
// run it serially or on std::threads. A kernel must give each i a disjoint part of Y.
struct Parallel {
  void (*run)(const Parallel& self, size_t n, void (*fn)(void* arg, size_t i), void* arg);
  void* state;      // for run's use
  int threads;      // how many run may use at once (>= 1), for choosing n
};
Parallel serial_parallel();  // runs fn(arg, 0..n-1) in order on the calling thread

// Block-sparse W (logical [K, N], the MatMul's B) in BSR over output rows:
// block row i covers outputs n in [i*R, i*R+R), block column j covers k in [j*C, j*C+C).
// values[b*R*C + r*C + c] = W[col_idx[b]*C + c, i*R + r] for b in [row_ptr[i], row_ptr[i+1]);
// entries past K or N are zero (padding). row_ptr has ceil(N/R)+1 entries, row_ptr[0] == 0.
struct BsrF32 {
  int64_t K, N;
  int32_t R, C;
  int64_t nnzb;
  const float* values;     // [nnzb, R, C]
  const int32_t* col_idx;  // [nnzb], each < ceil(K/C), increasing within a block row
  const int32_t* row_ptr;  // [ceil(N/R)+1]
};

// 2:4 along K: for output n and group g (k in [4g, 4g+4)), two kept values and their
// positions p0 < p1 in [0, 4). K % 4 == 0.
// values[n*(K/2) + 2g + t] is W[4g + p_t, n]; indices[n*ceil(K/8) + g/2] holds group g's
// positions in its low nibble (g even) or high nibble (g odd): bits 0-1 p0, bits 2-3 p1.
struct Packed24F32 {
  int64_t K, N;
  const float* values;     // [N, K/2]
  const uint8_t* indices;  // [N, ceil(K/8)]
};

// Int8 block-sparse W, same BSR layout as BsrF32 with int8 values, C % 4 == 0.
// Symmetric weights: w_real = w_scale[n] * w (w_scale_size is 1 or N).
// w_rowsum[n] = sum_k W[k, n] (int32, for the activation zero point), N entries.
// K <= kMaxS8K: every tier accumulates sum_k a*w in int32 (as vpdpbusd does, and as ORT's own
// int8 GEMMs assume), and |a*w| <= 255*128, so past that K a sum may not fit.
constexpr int64_t kMaxS8K = 2147483647 / (255 * 128);  // 65793
struct BsrS8 {
  int64_t K, N;
  int32_t R, C;
  int64_t nnzb;
  const int8_t* values;
  const int32_t* col_idx;
  const int32_t* row_ptr;
  const float* w_scale;
  int64_t w_scale_size;
  const int32_t* w_rowsum;
};

// Y[M, N] = act(A[M, K] @ W + bias); bias may be null. A and Y are row-major, contiguous.
// NaN and +-Inf in A, on every tier: each stored weight is multiplied (a zero inside a stored
// block, or kept in a 2:4 slot, included: 0 * Inf = NaN, as in the dense MatMul), a dropped
// block or an unkept 2:4 position never is, and padding (past K, past a row's blocks) adds
// exactly nothing. The activation is ONNX Runtime's: Relu keeps NaN, Gelu(-Inf) is NaN.
void sparse_matmul_f32(const float* A, int64_t M, const BsrF32& W, const float* bias,
                       Activation act, float* Y, const Parallel& par, Isa isa);
void sparse_matmul_f32_reference(const float* A, int64_t M, const BsrF32& W, const float* bias,
                                 Activation act, float* Y);

void sparse_matmul_24_f32(const float* A, int64_t M, const Packed24F32& W, const float* bias,
                          Activation act, float* Y, const Parallel& par, Isa isa);
void sparse_matmul_24_f32_reference(const float* A, int64_t M, const Packed24F32& W,
                                    const float* bias, Activation act, float* Y);

// The "row lanes" layout of a 1x4 BsrS8 for M = 1, derived at run time (never in a file; see
// LAYOUTS.md, "Derived at run time"): a vector lane is an output row. K is cut into panels of
// 32*P dwords (128*P bytes of A); the outputs into chunks of 16*G (G groups of 16 lanes). In
// each panel a chunk's rows take the lanes in their own order, longest (most blocks in that
// panel) first, so the rows of a group of 16 have about as many blocks there; between panels
// the chunk's partial sums change lanes by shuffle[(c*panels + p)*16G + l] (lane l of the next
// order takes lane shuffle[..] of this one; after the last panel, the next order is the
// outputs' own). Slot s of (chunk c, panel p, group j), s in [slot_ptr[(c*panels + p)*G + j],
// the next entry), holds for each lane of the group one of its row's blocks in that panel:
// weights[s*64 + 4l .. +4] and the dword index inside the panel idx[s*16 + l] (< 32*P); a
// lane with fewer blocks there gets zero weights at index 0 (exact: 0 * a = 0).
// w_scale / w_rowsum: the BsrS8's per output, padded with zeros to whole chunks.
struct RowLanesS8 {
  int64_t K = 0, N = 0, nnzb = 0;  // of the BsrS8 it was built from (checked at each call)
  int32_t P = 1;                   // panel width in pairs of zmm (32 dwords each): 1..4
  int32_t G = 1;                   // groups of 16 lanes per chunk: 1 (no reordering), 2, 4, 8
  int64_t chunks = 0, panels = 0;
  std::vector<int32_t> slot_ptr;   // [chunks * panels * G + 1]
  std::vector<uint8_t> shuffle;    // [chunks * panels, 16 * G] (empty for G = 1)
  const int8_t* weights = nullptr;  // [slots, 16, 4], 64-byte aligned, in storage
  std::vector<uint8_t> idx;        // [slots, 16]
  std::vector<float> w_scale;      // [chunks * 16 * G]
  std::vector<int32_t> w_rowsum;   // [chunks * 16 * G]
  std::vector<int8_t> storage;     // holds weights (+63 bytes for the alignment)
  int64_t slots() const { return slot_ptr.empty() ? 0 : slot_ptr.back(); }
  int64_t bytes() const;           // heap bytes of the arrays above
};

// Builds the row-lane layout of W (already index-checked by the caller) choosing P and G by a
// cost model, or (tests, measurements) the given panel_pairs (1..4) and chunk_groups (1, 2,
// 4, 8). nullptr where it does not apply (blocks other than 1x4, K or N of 0, a P or G the
// kernel has no instance for) or where W breaks the BSR rules (the builder checks each index
// it uses rather than trusting the caller).
std::unique_ptr<RowLanesS8> build_row_lanes_s8(const BsrS8& W, int panel_pairs = 0,
                                               int chunk_groups = 0);

// Y[M, N] (float) = act(a_scale * w_scale[n] * sum_k (A[m,k] - a_zero_point) * W[k,n] + bias)
// A is uint8 [M, K] (as ORT's QLinearMatMul takes activations).
// lanes (may be null): build_row_lanes_s8(W); used at M = 1 on the AVX-512 VNNI tier.
void sparse_qmatmul_s8(const uint8_t* A, int64_t M, float a_scale, uint8_t a_zero_point,
                       const BsrS8& W, const float* bias, Activation act, float* Y,
                       const Parallel& par, Isa isa, const RowLanesS8* lanes = nullptr);
void sparse_qmatmul_s8_reference(const uint8_t* A, int64_t M, float a_scale,
                                 uint8_t a_zero_point, const BsrS8& W, const float* bias,
                                 Activation act, float* Y);

// Shared epilogue (epilogue.cc): Y[i] = act(Y[i] + bias[n]) for one row of N outputs.
void apply_epilogue_row(float* y, int64_t N, const float* bias, Activation act);

}  // namespace graphopt
