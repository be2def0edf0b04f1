// The ONNX Runtime layer of graphopt's sparse kernels: three custom ops in domain "graphopt".
//
//   SparseMatMul    (A float, values float [nnzb,R,C], col_idx int32, row_ptr int32, bias?)
//   SparseMatMul24  (A float, values float [N,K/2], indices uint8 [N,ceil(K/8)], bias?)
//   SparseQMatMul   (A uint8, a_scale, a_zero_point, values int8 [nnzb,R,C], col_idx, row_ptr,
//                    w_scale [1]|[N], w_rowsum int32 [N], bias?)
//
// This file only parses attributes and inputs, checks them, and calls the kernels.h functions.
// Packed weights come from a model file, i.e. from whoever wrote it: every size and index is
// checked before a kernel runs, so a corrupted weight is an ORT error naming the input, never
// an out-of-bounds read. Errors travel as OrtStatus (the custom-op V2 entry points): no C++
// exception crosses into ORT.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include "kernels.h"

namespace graphopt {
namespace {

constexpr const char* kDomain = "graphopt";
// Block shapes beyond this are not block sparsity any more; the cap keeps R*C*nnzb far from
// int64 overflow in the size checks below.
constexpr int64_t kMaxBlockSide = 1 << 12;

#define GRAPHOPT_RETURN_IF_ERROR(expr)            \
  do {                                            \
    if (OrtStatus* status_ = (expr)) return status_; \
  } while (0)

OrtStatus* fail(const OrtApi& api, const std::string& op, const std::string& message) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, (op + ": " + message).c_str());
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ",";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

// ---- attributes ----------------------------------------------------------------------------

OrtStatus* int_attribute(const OrtApi& api, const OrtKernelInfo* info, const std::string& op,
                         const char* name, int64_t* out) {
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, out)) {
    api.ReleaseStatus(status);
    return fail(api, op, std::string("missing int attribute '") + name + "'");
  }
  return nullptr;
}

// "Op node 'name'": errors raised while ORT creates the kernel (attributes, the environment)
// reach the user without the node's name (ORT adds it only to errors of a run).
std::string node_label(const OrtApi& api, const OrtKernelInfo* info, const char* op) {
  std::string label = op;
  size_t size = 0;
  if (OrtStatus* status = api.KernelInfo_GetNodeName(info, nullptr, &size)) {
    api.ReleaseStatus(status);
    return label;
  }
  std::string name(size, '\0');
  if (OrtStatus* status = api.KernelInfo_GetNodeName(info, name.data(), &size)) {
    api.ReleaseStatus(status);
    return label;
  }
  name.resize(std::strlen(name.c_str()));
  return name.empty() ? label : label + " node '" + name + "'";
}

constexpr const char* kActivations = "\"\", \"none\", \"relu\" or \"gelu\"";

OrtStatus* activation_attribute(const OrtApi& api, const OrtKernelInfo* info,
                                const std::string& op, Activation* out) {
  *out = Activation::None;
  size_t size = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, "activation", nullptr, &size)) {
    // Absent means no activation; present with another type (INT, STRINGS, ...) is a model
    // error, never "no activation". The C API has no "has attribute" query, and the typed
    // getters cannot recognise every other type (STRINGS has none), so ORT's message tells:
    // "No attribute with name:'activation'is defined." for an absent one (op_node_proto_helper
    // in every ORT from 1.0 on), "Attribute name and type don't match" for another type.
    const std::string message = api.GetErrorMessage(status);
    api.ReleaseStatus(status);
    if (message.find("No attribute") != std::string::npos) return nullptr;
    return fail(api, op, std::string("attribute 'activation' must be a string (") + kActivations +
                             "), got one of another type");
  }
  // size counts the terminating NUL that ORT appends.
  std::string value(size, '\0');
  GRAPHOPT_RETURN_IF_ERROR(
      api.KernelInfoGetAttribute_string(info, "activation", value.data(), &size));
  const size_t length = size > 0 ? size - 1 : 0;
  if (std::strlen(value.c_str()) != length) {
    // A NUL inside the bytes ("relu\0tanh"): C strings would read "relu", ONNX's checker and
    // any other reader the whole value; no spelling of an activation holds one.
    return fail(api, op, std::string("attribute 'activation' holds a NUL byte; it must be ") +
                             kActivations);
  }
  value.resize(length);
  if (value.empty() || value == "none") return nullptr;
  if (value == "relu") {
    *out = Activation::Relu;
  } else if (value == "gelu") {
    *out = Activation::Gelu;
  } else {
    return fail(api, op,
                std::string("activation must be ") + kActivations + ", got \"" + value + "\"");
  }
  return nullptr;
}

struct Attributes {
  int64_t K = 0, N = 0, R = 1, C = 1;
  Activation act = Activation::None;
};

// K (a multiple of k_multiple, at most max_k), N, activation, and for the block-sparse ops
// block_r/block_c (C a multiple of c_multiple).
OrtStatus* read_attributes(const OrtApi& api, const OrtKernelInfo* info, const std::string& op,
                           bool blocks, int64_t k_multiple, int64_t c_multiple, int64_t max_k,
                           Attributes* out) {
  GRAPHOPT_RETURN_IF_ERROR(int_attribute(api, info, op, "K", &out->K));
  GRAPHOPT_RETURN_IF_ERROR(int_attribute(api, info, op, "N", &out->N));
  constexpr int64_t kMaxDim = int64_t{1} << 31;
  if (out->K < 0 || out->K >= kMaxDim || out->N < 0 || out->N >= kMaxDim) {
    return fail(api, op, "K and N must be in [0, 2^31), got K=" + std::to_string(out->K) +
                             " N=" + std::to_string(out->N));
  }
  if (out->K > max_k) {  // SparseQMatMul: kernels.h's kMaxS8K
    return fail(api, op, "K=" + std::to_string(out->K) + " exceeds " + std::to_string(max_k) +
                             ", the largest K whose int32 sum of u8*s8 products cannot overflow"
                             " (keep this MatMul dense)");
  }
  if (out->K % k_multiple != 0) {
    return fail(api, op, "K must be a multiple of " + std::to_string(k_multiple) + ", got " +
                             std::to_string(out->K));
  }
  if (blocks) {
    GRAPHOPT_RETURN_IF_ERROR(int_attribute(api, info, op, "block_r", &out->R));
    GRAPHOPT_RETURN_IF_ERROR(int_attribute(api, info, op, "block_c", &out->C));
    if (out->R < 1 || out->C < 1 || out->R > kMaxBlockSide || out->C > kMaxBlockSide) {
      return fail(api, op, "block_r and block_c must be in [1, " + std::to_string(kMaxBlockSide) +
                               "], got " + std::to_string(out->R) + "x" + std::to_string(out->C));
    }
    if (out->C % c_multiple != 0) {
      return fail(api, op, "block_c must be a multiple of " + std::to_string(c_multiple) +
                               ", got " + std::to_string(out->C));
    }
  }
  return activation_attribute(api, info, op, &out->act);
}

// ---- inputs --------------------------------------------------------------------------------

struct Input {
  bool present = false;
  const void* data = nullptr;
  std::vector<int64_t> shape;
  int64_t size = 0;
};

// Kernels take non-null pointers; an empty tensor may have none.
alignas(64) const unsigned char kEmpty[64] = {};

OrtStatus* get_input(const OrtApi& api, OrtKernelContext* context, size_t index, Input* out) {
  size_t count = 0;
  GRAPHOPT_RETURN_IF_ERROR(api.KernelContext_GetInputCount(context, &count));
  if (index >= count) return nullptr;  // an omitted trailing optional input
  const OrtValue* value = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api.KernelContext_GetInput(context, index, &value));
  if (value == nullptr) return nullptr;  // an omitted optional input ("" in the node)
  OrtTensorTypeAndShapeInfo* info = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api.GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = api.GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    out->shape.resize(rank);
    status = api.GetDimensions(info, out->shape.data(), rank);
  }
  api.ReleaseTensorTypeAndShapeInfo(info);
  if (status) return status;
  void* data = nullptr;
  // The C API has no const accessor; the data is only read.
  GRAPHOPT_RETURN_IF_ERROR(api.GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out->present = true;
  out->size = 1;
  for (int64_t d : out->shape) out->size *= d;
  out->data = (out->size == 0 || data == nullptr) ? static_cast<const void*>(kEmpty) : data;
  return nullptr;
}

OrtStatus* expect_shape(const OrtApi& api, const std::string& op, const char* name,
                        const Input& input, const std::vector<int64_t>& shape) {
  if (!input.present) return fail(api, op, std::string("input '") + name + "' is missing");
  if (input.shape != shape) {
    return fail(api, op, std::string("input '") + name + "' has shape " +
                             shape_text(input.shape) + ", expected " + shape_text(shape));
  }
  return nullptr;
}

OrtStatus* expect_scalar(const OrtApi& api, const std::string& op, const char* name,
                         const Input& input) {
  if (!input.present || input.size != 1 || input.shape.size() > 1) {
    return fail(api, op,
                std::string("input '") + name + "' must hold exactly one value, got shape " +
                    shape_text(input.shape));
  }
  return nullptr;
}

// A: [..., K] -> M (leading dims flattened); the output's shape is [..., N].
OrtStatus* activation_rows(const OrtApi& api, const std::string& op, const Input& a, int64_t K,
                           int64_t N, int64_t* M, std::vector<int64_t>* y_shape) {
  if (a.shape.empty() || a.shape.back() != K) {
    return fail(api, op,
                "input 'A' has shape " + shape_text(a.shape) +
                    ", its last dimension must be K=" + std::to_string(K));
  }
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < a.shape.size(); ++i) rows *= a.shape[i];
  *M = rows;
  *y_shape = a.shape;
  y_shape->back() = N;
  return nullptr;
}

// Optional bias [N]; an empty tensor counts as absent.
OrtStatus* bias_input(const OrtApi& api, const std::string& op, const Input& bias, int64_t N,
                      const float** out) {
  *out = nullptr;
  if (!bias.present || (bias.size == 0 && N != 0)) return nullptr;
  if (bias.size != N || bias.shape.size() != 1) {
    return fail(api, op, "input 'bias' has shape " + shape_text(bias.shape) + ", expected [" +
                             std::to_string(N) + "]");
  }
  *out = static_cast<const float*>(bias.data);
  return nullptr;
}

// The BSR index arrays: row_ptr starts at 0, never decreases and ends at nnzb; every col_idx
// is a block column inside K and increases within its block row.
// ``deep`` false skips the O(nnzb) walk over the indices: for weights already checked (see
// KernelBase::already_checked); the O(1) shape checks always run.
OrtStatus* check_bsr(const OrtApi& api, const std::string& op, const Attributes& at,
                     const Input& values, const Input& col_idx, const Input& row_ptr,
                     bool deep, int64_t* nnzb) {
  const int64_t block_rows = (at.N + at.R - 1) / at.R;
  const int64_t block_cols = (at.K + at.C - 1) / at.C;
  if (!values.present || values.shape.size() != 3 || values.shape[1] != at.R ||
      values.shape[2] != at.C) {
    return fail(api, op, "input 'values' has shape " + shape_text(values.shape) +
                             ", expected [nnzb," + std::to_string(at.R) + "," +
                             std::to_string(at.C) + "]");
  }
  *nnzb = values.shape[0];
  // A block never repeats within a block row, so more than that is corrupt (and this bounds
  // nnzb before any product with it).
  if (*nnzb > block_rows * block_cols) {
    return fail(api, op, "nnzb=" + std::to_string(*nnzb) + " exceeds the " +
                             std::to_string(block_rows * block_cols) + " blocks of a K=" +
                             std::to_string(at.K) + " N=" + std::to_string(at.N) + " weight");
  }
  GRAPHOPT_RETURN_IF_ERROR(expect_shape(api, op, "col_idx", col_idx, {*nnzb}));
  GRAPHOPT_RETURN_IF_ERROR(expect_shape(api, op, "row_ptr", row_ptr, {block_rows + 1}));
  const auto* ptr = static_cast<const int32_t*>(row_ptr.data);
  const auto* col = static_cast<const int32_t*>(col_idx.data);
  if (ptr[0] != 0 || ptr[block_rows] != *nnzb) {
    return fail(api, op, "row_ptr must start at 0 and end at nnzb=" + std::to_string(*nnzb) +
                             ", got " + std::to_string(ptr[0]) + " .. " +
                             std::to_string(ptr[block_rows]));
  }
  if (!deep) return nullptr;
  // row_ptr first, whole: only a monotone row_ptr makes [ptr[i], ptr[i+1]) a range in col_idx.
  for (int64_t i = 0; i < block_rows; ++i) {
    if (ptr[i + 1] < ptr[i]) {
      return fail(api, op, "row_ptr decreases at block row " + std::to_string(i) + " (" +
                               std::to_string(ptr[i]) + " > " + std::to_string(ptr[i + 1]) + ")");
    }
  }
  for (int64_t i = 0; i < block_rows; ++i) {
    for (int64_t b = ptr[i]; b < ptr[i + 1]; ++b) {
      if (col[b] < 0 || col[b] >= block_cols) {
        return fail(api, op, "col_idx[" + std::to_string(b) + "]=" + std::to_string(col[b]) +
                                 " is outside [0, " + std::to_string(block_cols) + ") (K=" +
                                 std::to_string(at.K) + ", block_c=" + std::to_string(at.C) + ")");
      }
      if (b > ptr[i] && col[b] <= col[b - 1]) {
        return fail(api, op, "col_idx must increase within a block row: col_idx[" +
                                 std::to_string(b) + "]=" + std::to_string(col[b]) + " after " +
                                 std::to_string(col[b - 1]) + " in block row " + std::to_string(i));
      }
    }
  }
  return nullptr;
}

OrtStatus* make_output(const OrtApi& api, OrtKernelContext* context,
                       const std::vector<int64_t>& shape, float** out) {
  OrtValue* y = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api.KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &y));
  void* data = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api.GetTensorMutableData(y, &data));
  *out = static_cast<float*>(data);
  return nullptr;
}

// ---- threads -------------------------------------------------------------------------------

// Parallel::run on ORT's intra-op pool. ORT runs the loop inline when the session has one
// thread (intra_op_num_threads=1), so the kernels follow the session's setting.
struct PoolState {
  const OrtApi* api;
  OrtKernelContext* context;
  OrtStatus* error;  // the first failure of KernelContext_ParallelFor, returned by Compute
};

struct Call {
  void (*fn)(void*, size_t);
  void* arg;
};

void trampoline(void* call, size_t i) {
  const Call* c = static_cast<const Call*>(call);
  c->fn(c->arg, i);
}

void run_on_pool(const Parallel& self, size_t n, void (*fn)(void* arg, size_t i), void* arg) {
  auto* state = static_cast<PoolState*>(self.state);
  if (n == 0 || state->error != nullptr) return;
  if (n == 1) {
    fn(arg, 0);
    return;
  }
  Call call{fn, arg};
  state->error = state->api->KernelContext_ParallelFor(state->context, &trampoline, n, 0, &call);
}

// The C API does not say how many threads the pool has; kernels only use the number to choose
// how many pieces to cut the work into. So count it, once per kernel instance: every task of a
// probe loop records its thread and then waits until a common deadline, so each pool thread
// that wakes up in that window takes one task (and only one). Without a pool
// (intra_op_num_threads=1) ORT runs the loop inline and exactly one thread is seen; with one,
// a thread still asleep at the deadline is missed, so the count may fall short (fewer pieces),
// never above the pool's size. Costs kProbeWindow once per kernel, on the first run.
constexpr auto kProbeWindow = std::chrono::microseconds(500);

struct Probe {
  std::mutex lock;
  std::vector<std::thread::id> seen;
  std::chrono::steady_clock::time_point deadline;
};

void probe_task(void* arg, size_t) {
  auto* probe = static_cast<Probe*>(arg);
  {
    std::lock_guard<std::mutex> guard(probe->lock);
    const auto id = std::this_thread::get_id();
    if (std::find(probe->seen.begin(), probe->seen.end(), id) == probe->seen.end()) {
      probe->seen.push_back(id);
    }
  }
  while (std::chrono::steady_clock::now() < probe->deadline) std::this_thread::yield();
}

int count_pool_threads(const OrtApi& api, OrtKernelContext* context) {
  Probe probe;
  probe.deadline = std::chrono::steady_clock::now() + kProbeWindow;
  constexpr size_t kTasks = 256;  // more than any pool this library will meet
  OrtStatus* status = api.KernelContext_ParallelFor(context, &probe_task, kTasks, 0, &probe);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return 1;
  }
  return std::max<int>(1, static_cast<int>(probe.seen.size()));
}

// ---- kernels -------------------------------------------------------------------------------

class KernelBase {
 public:
  KernelBase(const OrtApi& api, Attributes attributes, bool constant_weights)
      : api_(api), at_(attributes), isa_(selected_isa()), constant_weights_(constant_weights) {}

 protected:
  // Whether the packed weight at these addresses passed the deep index check already. Only
  // weights that are constant initializers are remembered: ORT hands every run the same
  // immutable tensors, so walking their indices again costs time and proves nothing (at M=1
  // the walk took as long as the product). Weights computed at run time are checked on
  // every run, and a weight at other addresses than the remembered ones is checked again.
  bool already_checked(const std::array<const void*, 3>& weights) const {
    return checked_.load(std::memory_order_acquire) && checked_weights_ == weights;
  }
  void remember_checked(const std::array<const void*, 3>& weights) {
    if (!constant_weights_ || checked_.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> guard(check_lock_);
    if (checked_.load(std::memory_order_relaxed)) return;
    checked_weights_ = weights;
    checked_.store(true, std::memory_order_release);  // publishes checked_weights_
  }

  // Runs body(par) with a Parallel on the session's pool; returns its or the pool's error.
  template <typename Body>
  OrtStatus* with_pool(OrtKernelContext* context, Body&& body) {
    int threads = threads_.load(std::memory_order_relaxed);
    if (threads == 0) {
      threads = count_pool_threads(api_, context);
      threads_.store(threads, std::memory_order_relaxed);
    }
    PoolState state{&api_, context, nullptr};
    Parallel par{&run_on_pool, &state, threads};
    try {
      body(par);
    } catch (const std::exception& error) {  // bad_alloc from a kernel's scratch vector
      if (state.error) api_.ReleaseStatus(state.error);
      const std::string message = std::string("graphopt sparse kernel: ") + error.what();
      return api_.CreateStatus(ORT_FAIL, message.c_str());
    }
    return state.error;
  }

  bool constant_weights() const { return constant_weights_; }

  const OrtApi& api_;
  const Attributes at_;
  const Isa isa_;  // chosen when the session is created (GRAPHOPT_KERNELS_ISA read then)
  std::atomic<int> threads_{0};

 private:
  const bool constant_weights_;  // every index/weight input is a constant initializer
  std::mutex check_lock_;
  std::array<const void*, 3> checked_weights_{};
  std::atomic<bool> checked_{false};
};

class SparseMatMulKernel : public KernelBase {
 public:
  using KernelBase::KernelBase;

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    const std::string op = "SparseMatMul";
    Input a, values, col_idx, row_ptr, bias_in;
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 0, &a));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 1, &values));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 2, &col_idx));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 3, &row_ptr));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 4, &bias_in));
    int64_t M = 0, nnzb = 0;
    std::vector<int64_t> y_shape;
    const float* bias = nullptr;
    GRAPHOPT_RETURN_IF_ERROR(activation_rows(api_, op, a, at_.K, at_.N, &M, &y_shape));
    const std::array<const void*, 3> weights{values.data, col_idx.data, row_ptr.data};
    const bool deep = !already_checked(weights);
    GRAPHOPT_RETURN_IF_ERROR(check_bsr(api_, op, at_, values, col_idx, row_ptr, deep, &nnzb));
    if (deep) remember_checked(weights);
    GRAPHOPT_RETURN_IF_ERROR(bias_input(api_, op, bias_in, at_.N, &bias));
    float* y = nullptr;
    GRAPHOPT_RETURN_IF_ERROR(make_output(api_, context, y_shape, &y));
    if (M == 0 || at_.N == 0) return nullptr;
    const BsrF32 w{at_.K,
                   at_.N,
                   static_cast<int32_t>(at_.R),
                   static_cast<int32_t>(at_.C),
                   nnzb,
                   static_cast<const float*>(values.data),
                   static_cast<const int32_t*>(col_idx.data),
                   static_cast<const int32_t*>(row_ptr.data)};
    const auto* A = static_cast<const float*>(a.data);
    return with_pool(context, [&](const Parallel& par) {
      sparse_matmul_f32(A, M, w, bias, at_.act, y, par, isa_);
    });
  }
};

class SparseMatMul24Kernel : public KernelBase {
 public:
  using KernelBase::KernelBase;

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    const std::string op = "SparseMatMul24";
    Input a, values, indices, bias_in;
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 0, &a));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 1, &values));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 2, &indices));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 3, &bias_in));
    int64_t M = 0;
    std::vector<int64_t> y_shape;
    const float* bias = nullptr;
    GRAPHOPT_RETURN_IF_ERROR(activation_rows(api_, op, a, at_.K, at_.N, &M, &y_shape));
    const int64_t stride = (at_.K + 7) / 8;
    GRAPHOPT_RETURN_IF_ERROR(expect_shape(api_, op, "values", values, {at_.N, at_.K / 2}));
    GRAPHOPT_RETURN_IF_ERROR(expect_shape(api_, op, "indices", indices, {at_.N, stride}));
    // Positions are 2-bit fields (always inside their group of 4); p0 < p1 is the layout's
    // promise, and a packer that broke it wrote something else than a 2:4 weight.
    const auto* idx = static_cast<const uint8_t*>(indices.data);
    const std::array<const void*, 3> weights{values.data, indices.data, nullptr};
    const bool deep = !already_checked(weights);
    for (int64_t n = 0; deep && n < at_.N; ++n) {
      for (int64_t g = 0; g < at_.K / 4; ++g) {
        const uint8_t byte = idx[n * stride + g / 2];
        const int nibble = (g % 2) ? byte >> 4 : byte & 15;
        if ((nibble & 3) >= ((nibble >> 2) & 3)) {
          return fail(api_, op, "indices: row " + std::to_string(n) + " group " +
                                    std::to_string(g) + " has positions p0=" +
                                    std::to_string(nibble & 3) + " p1=" +
                                    std::to_string((nibble >> 2) & 3) + " (p0 < p1 required)");
        }
      }
    }
    if (deep) remember_checked(weights);
    GRAPHOPT_RETURN_IF_ERROR(bias_input(api_, op, bias_in, at_.N, &bias));
    float* y = nullptr;
    GRAPHOPT_RETURN_IF_ERROR(make_output(api_, context, y_shape, &y));
    if (M == 0 || at_.N == 0) return nullptr;
    const Packed24F32 w{at_.K, at_.N, static_cast<const float*>(values.data), idx};
    const auto* A = static_cast<const float*>(a.data);
    return with_pool(context, [&](const Parallel& par) {
      sparse_matmul_24_f32(A, M, w, bias, at_.act, y, par, isa_);
    });
  }
};

class SparseQMatMulKernel : public KernelBase {
 public:
  using KernelBase::KernelBase;

 private:
  // The M = 1 row-lane layout (kernels.h RowLanesS8), derived from the weight on the first
  // M = 1 run where it can serve: 1x4 blocks, the AVX-512 VNNI tier, and every weight input a
  // constant initializer (ORT hands each run the same immutable tensors, so the layout stays
  // true). Built once per kernel instance under lanes_lock_ (concurrent runs of one session
  // may race to it); a run whose weights sit at other addresses than the ones it was built
  // from, or whose weights are not constant, takes the BSR path. Called only after the
  // weights passed check_bsr in this run.
  using WeightKey = std::array<const void*, 5>;
  const RowLanesS8* row_lanes(const BsrS8& w, const WeightKey& key) {
    if (!constant_weights() || at_.R != 1 || at_.C != 4 || isa_ < Isa::Avx512Vnni) {
      return nullptr;
    }
    if (!lanes_done_.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> guard(lanes_lock_);
      if (!lanes_done_.load(std::memory_order_relaxed)) {
        try {
          lanes_ = build_row_lanes_s8(w);
        } catch (const std::bad_alloc&) {
          lanes_.reset();  // an optional speed-up: without memory for it, the BSR path
        }
        lanes_key_ = key;
        lanes_done_.store(true, std::memory_order_release);  // publishes lanes_, lanes_key_
      }
    }
    return lanes_key_ == key ? lanes_.get() : nullptr;
  }

  std::mutex lanes_lock_;
  std::unique_ptr<RowLanesS8> lanes_;  // null where the builder declined
  WeightKey lanes_key_{};
  std::atomic<bool> lanes_done_{false};

 public:
  OrtStatus* ComputeV2(OrtKernelContext* context) {
    const std::string op = "SparseQMatMul";
    Input a, a_scale, a_zero, values, col_idx, row_ptr, w_scale, w_rowsum, bias_in;
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 0, &a));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 1, &a_scale));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 2, &a_zero));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 3, &values));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 4, &col_idx));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 5, &row_ptr));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 6, &w_scale));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 7, &w_rowsum));
    GRAPHOPT_RETURN_IF_ERROR(get_input(api_, context, 8, &bias_in));
    int64_t M = 0, nnzb = 0;
    std::vector<int64_t> y_shape;
    const float* bias = nullptr;
    GRAPHOPT_RETURN_IF_ERROR(activation_rows(api_, op, a, at_.K, at_.N, &M, &y_shape));
    GRAPHOPT_RETURN_IF_ERROR(expect_scalar(api_, op, "a_scale", a_scale));
    GRAPHOPT_RETURN_IF_ERROR(expect_scalar(api_, op, "a_zero_point", a_zero));
    const std::array<const void*, 3> weights{values.data, col_idx.data, row_ptr.data};
    const bool deep = !already_checked(weights);
    GRAPHOPT_RETURN_IF_ERROR(check_bsr(api_, op, at_, values, col_idx, row_ptr, deep, &nnzb));
    if (!w_scale.present || w_scale.shape.size() != 1 ||
        (w_scale.size != 1 && w_scale.size != at_.N)) {
      return fail(api_, op, "input 'w_scale' has shape " + shape_text(w_scale.shape) +
                                ", expected [1] or [" + std::to_string(at_.N) + "]");
    }
    GRAPHOPT_RETURN_IF_ERROR(expect_shape(api_, op, "w_rowsum", w_rowsum, {at_.N}));
    // A row sum of K int8 weights lies in [-128K, 127K]; one outside is not this weight's (and
    // would make a_zero_point * w_rowsum overflow int32 even for a K the kernels allow). Inside
    // that range a wrong sum still gives wrong numbers, never undefined behaviour (dequant).
    // Checked with the indices (w_rowsum is constant whenever they are remembered).
    const auto* rowsum = static_cast<const int32_t*>(w_rowsum.data);
    for (int64_t n = 0; deep && n < at_.N; ++n) {
      if (rowsum[n] < -128 * at_.K || rowsum[n] > 127 * at_.K) {
        return fail(api_, op, "w_rowsum[" + std::to_string(n) + "]=" + std::to_string(rowsum[n]) +
                                  " is outside [" + std::to_string(-128 * at_.K) + ", " +
                                  std::to_string(127 * at_.K) + "], the sums of K=" +
                                  std::to_string(at_.K) + " int8 weights");
      }
    }
    if (deep) remember_checked(weights);  // after every deep check: a failed one is rerun
    GRAPHOPT_RETURN_IF_ERROR(bias_input(api_, op, bias_in, at_.N, &bias));
    float* y = nullptr;
    GRAPHOPT_RETURN_IF_ERROR(make_output(api_, context, y_shape, &y));
    if (M == 0 || at_.N == 0) return nullptr;
    const BsrS8 w{at_.K,
                  at_.N,
                  static_cast<int32_t>(at_.R),
                  static_cast<int32_t>(at_.C),
                  nnzb,
                  static_cast<const int8_t*>(values.data),
                  static_cast<const int32_t*>(col_idx.data),
                  static_cast<const int32_t*>(row_ptr.data),
                  static_cast<const float*>(w_scale.data),
                  w_scale.size,
                  static_cast<const int32_t*>(w_rowsum.data)};
    const auto* A = static_cast<const uint8_t*>(a.data);
    const float scale = *static_cast<const float*>(a_scale.data);
    const uint8_t zero = *static_cast<const uint8_t*>(a_zero.data);
    const WeightKey key{values.data, col_idx.data, row_ptr.data, w_scale.data, w_rowsum.data};
    return with_pool(context, [&](const Parallel& par) {
      const RowLanesS8* lanes = M == 1 ? row_lanes(w, key) : nullptr;
      sparse_qmatmul_s8(A, M, scale, zero, w, bias, at_.act, y, par, isa_, lanes);
    });
  }
};

// ---- op descriptions -----------------------------------------------------------------------

template <typename TOp, typename TKernel>
struct OpBase : Ort::CustomOpBase<TOp, TKernel, true> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    const std::string label = node_label(api, info, TOp::kName);
    if (const char* cap = unknown_isa_cap()) {
      return fail(api, label,
                  std::string("GRAPHOPT_KERNELS_ISA=\"") + cap +
                      "\" names no tier: use scalar, avx2, avx512 or avx512vnni, or unset it");
    }
    Attributes attributes;
    GRAPHOPT_RETURN_IF_ERROR(read_attributes(api, info, label, TOp::kBlocks, TOp::kKMultiple,
                                             TOp::kCMultiple, TOp::kMaxK, &attributes));
    // Constant packed weights (the lowering always writes initializers) are index-checked on
    // the first run only; see KernelBase::already_checked.
    bool constant = true;
    for (size_t index : TOp::kWeightInputs) {
      int is_constant = 0;
      const OrtValue* value = nullptr;
      GRAPHOPT_RETURN_IF_ERROR(
          api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value));
      constant = constant && is_constant != 0;
    }
    *kernel = new (std::nothrow) TKernel(api, attributes, constant);
    if (*kernel == nullptr) return api.CreateStatus(ORT_FAIL, "graphopt: out of memory");
    return nullptr;
  }
  const char* GetName() const { return TOp::kName; }
  size_t GetInputTypeCount() const { return TOp::kInputs.size(); }
  ONNXTensorElementDataType GetInputType(size_t index) const { return TOp::kInputs[index]; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index + 1 == TOp::kInputs.size() ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kI32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
constexpr auto kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr auto kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;

struct SparseMatMulOp : OpBase<SparseMatMulOp, SparseMatMulKernel> {
  static constexpr const char* kName = "SparseMatMul";
  static constexpr bool kBlocks = true;
  static constexpr int64_t kKMultiple = 1;
  static constexpr int64_t kCMultiple = 1;
  static constexpr int64_t kMaxK = INT64_MAX;  // read_attributes: K < 2^31
  static constexpr std::array<ONNXTensorElementDataType, 5> kInputs{kF32, kF32, kI32, kI32, kF32};
  static constexpr std::array<size_t, 3> kWeightInputs{1, 2, 3};
};

struct SparseMatMul24Op : OpBase<SparseMatMul24Op, SparseMatMul24Kernel> {
  static constexpr const char* kName = "SparseMatMul24";
  static constexpr bool kBlocks = false;
  static constexpr int64_t kKMultiple = 4;
  static constexpr int64_t kCMultiple = 1;
  static constexpr int64_t kMaxK = INT64_MAX;
  static constexpr std::array<ONNXTensorElementDataType, 4> kInputs{kF32, kF32, kU8, kF32};
  static constexpr std::array<size_t, 2> kWeightInputs{1, 2};
};

struct SparseQMatMulOp : OpBase<SparseQMatMulOp, SparseQMatMulKernel> {
  static constexpr const char* kName = "SparseQMatMul";
  static constexpr bool kBlocks = true;
  static constexpr int64_t kKMultiple = 1;
  static constexpr int64_t kCMultiple = 4;
  static constexpr int64_t kMaxK = kMaxS8K;  // int32 accumulation (kernels.h)
  static constexpr std::array<ONNXTensorElementDataType, 9> kInputs{kU8, kF32, kU8, kI8, kI32,
                                                                    kI32, kF32, kI32, kF32};
  static constexpr std::array<size_t, 5> kWeightInputs{3, 4, 5, 6, 7};
};

}  // namespace
}  // namespace graphopt

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace graphopt;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Too old a runtime for our headers: report with the oldest API, which every ORT has.
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest->CreateStatus(ORT_FAIL, "graphopt kernels need ONNX Runtime 1.21 or newer");
  }
  Ort::InitApi(api);
  // The ops and the domain must outlive every session that uses them: static ops, and one
  // domain per registration that is never freed (a few bytes per SessionOptions).
  // The ops implement version 1 of the domain, but ORT runs them for any version the model
  // imports (>= 1): it makes one schema per op name, valid from its start version on, and an
  // op's end version does not limit that schema. graphopt's own sessions refuse another version
  // (graphopt/backends/ort_custom_ops.py, check_own_domain_version).
  static SparseMatMulOp sparse_matmul;
  static SparseMatMul24Op sparse_matmul_24;
  static SparseQMatMulOp sparse_qmatmul;
  OrtCustomOpDomain* domain = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api->CreateCustomOpDomain(kDomain, &domain));
  GRAPHOPT_RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &sparse_matmul));
  GRAPHOPT_RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &sparse_matmul_24));
  GRAPHOPT_RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &sparse_qmatmul));
  return api->AddCustomOpDomain(options, domain);
}
