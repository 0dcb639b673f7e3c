// Launcher of the block-sparse matmuls: the one entry point per op, which checks
// for a device, makes the requested device current, picks the kernel path for the
// device's architecture and the kernel for the dtype and block size.
//
// Architecture paths (select_path):
//   kSm80Wmma  sm_80 and newer (A100, RTX 30xx/40xx, H100/H200 too): warp-level wmma
//              tensor-core tiles, bsmm_sm80.cuh.  The only path today.
//   Extension point: a Hopper path (wgmma + TMA, sm_90a) would add an enum value,
//   a case in select_path() for major == 9 when compiled for sm_90a, and
//   launch_{linear,grad_weight}_sm90<T> (declared in bsmm_internal.cuh) in new .cu files.

#include "bsmm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "bsmm_internal.cuh"
#include "cuda_check.cuh"
#include "masked_adam.h"  // DType codes

namespace set_kernels {
namespace {

constexpr const char* kForward = "set_kernels._C.linear_forward";
constexpr const char* kGradInput = "set_kernels._C.linear_grad_input";
constexpr const char* kGradWeight = "set_kernels._C.linear_grad_weight";

enum class Path { kSm80Wmma };

Path select_path(const char* op, int device) {
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), op,
             "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), op,
             "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  if (major < 8) {
    throw std::runtime_error(std::string(op) + ": needs a GPU of compute capability 8.0 or newer "
                             "(bf16/tf32 tensor cores); device " + std::to_string(device) + " is sm_" +
                             std::to_string(major) + std::to_string(minor));
  }
  return Path::kSm80Wmma;
}

// Checks that a device exists, makes `device` current (restored on return), picks the kernel
// path of the device and calls `launch(path, tag)`, `tag` a null T* for the element type T of
// `dtype`.  Throws std::invalid_argument for a dtype code with no kernel (the bindings checked it).
template <typename Launch>
void launch_on_device(const char* op, int device, int dtype, Launch&& launch) {
  const int count = require_device(op);
  DeviceGuard guard(device, count, op);
  const Path path = select_path(op, guard.device());
  (void)cudaGetLastError();  // a launch failure below must not be confused with an older error
  switch (dtype) {
    case kFloat32: launch(path, static_cast<float*>(nullptr)); break;
    case kFloat16: launch(path, static_cast<__half*>(nullptr)); break;
    case kBFloat16: launch(path, static_cast<__nv_bfloat16*>(nullptr)); break;
    default: throw std::invalid_argument(std::string(op) + ": unknown dtype code " + std::to_string(dtype));
  }
}

void run_linear(const char* op, const LinearArgs& a, bool grad_input, std::uintptr_t stream, int device) {
  const MatmulShape& sh = a.shape;
  if (sh.M == 0) return;  // nothing to write
  bsmm::LinearParams p{};
  p.a = a.a;
  p.lda = a.lda;
  p.values = a.values;
  p.ptr = a.ptr;
  p.idx = a.idx;
  p.perm = grad_input ? a.perm : nullptr;
  p.bias = grad_input ? nullptr : a.bias;
  p.out = a.out;
  p.ldo = a.ldo;
  p.M = sh.M;
  p.k_total = grad_input ? sh.rows : sh.cols;
  p.n_out = grad_input ? sh.cols : sh.rows;
  p.split3 = sh.tf32 ? 0 : 1;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  launch_on_device(op, device, sh.dtype, [&](Path path, auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    switch (path) {
      case Path::kSm80Wmma: bsmm::launch_linear_sm80<T>(p, sh.block, grad_input, s); break;
    }
  });
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace

void linear_forward(const LinearArgs& args, std::uintptr_t stream, int device) {
  run_linear(kForward, args, false, stream, device);
}

void linear_grad_input(const LinearArgs& args, std::uintptr_t stream, int device) {
  run_linear(kGradInput, args, true, stream, device);
}

int linear_grad_weight_default_splits(std::int64_t M, std::int64_t nnz, int block) noexcept {
  if (M <= 0 || nnz <= 0 || !block_size_is_valid(block)) return 1;
  const std::int64_t sub = block > 64 ? block / 64 : 1;
  const std::int64_t tiles = nnz * sub * sub;        // CTAs without splitting
  const std::int64_t kTargetCtas = 1024;              // fills a 132-SM GPU several times over
  const std::int64_t kMinTokensPerSplit = 512;
  const std::int64_t by_work = ceil_div(kTargetCtas, tiles);
  const std::int64_t by_tokens = ceil_div(M, kMinTokensPerSplit);
  std::int64_t s = by_work < by_tokens ? by_work : by_tokens;
  if (s > 128) s = 128;
  return static_cast<int>(s < 1 ? 1 : s);
}

std::int64_t linear_grad_weight_workspace_numel(int splits, std::int64_t nnz, int block) noexcept {
  if (splits <= 1 || nnz <= 0) return 0;
  return static_cast<std::int64_t>(splits) * nnz * block * block;
}

void linear_grad_weight(const GradWeightArgs& a, std::uintptr_t stream, int device) {
  const MatmulShape& sh = a.shape;
  if (sh.nnz == 0) return;  // empty output
  // Tokens per split: a whole number of K tiles; drop splits that would be empty (so at most
  // a.splits, whose workspace the bindings checked).
  const std::int64_t M = sh.M > 0 ? sh.M : 0;
  const std::int64_t quantum = bsmm::kGradWeightChunkQuantum;
  std::int64_t chunk = ceil_div(ceil_div(M, a.splits > 0 ? a.splits : 1), quantum) * quantum;
  if (chunk == 0) chunk = quantum;
  bsmm::GradWeightParams p{};
  p.dy = a.dy;
  p.lddy = a.lddy;
  p.x = a.x;
  p.ldx = a.ldx;
  p.block_row = a.block_row;
  p.col_idx = a.col_idx;
  p.out = a.out;
  p.workspace = a.workspace;
  p.M = M;
  p.rows = sh.rows;
  p.cols = sh.cols;
  p.nnz = sh.nnz;
  p.chunk = chunk;
  p.splits = M > 0 ? static_cast<int>(ceil_div(M, chunk)) : 1;
  p.split3 = sh.tf32 ? 0 : 1;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  launch_on_device(kGradWeight, device, sh.dtype, [&](Path path, auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    switch (path) {
      case Path::kSm80Wmma: bsmm::launch_grad_weight_sm80<T>(p, sh.block, s); break;
    }
  });
}

}  // namespace set_kernels
