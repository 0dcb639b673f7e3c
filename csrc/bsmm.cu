// Launcher of the block-sparse matmuls: the one entry point per op, which checks
// for a device, makes the requested device current, picks the kernel path for the
// device's architecture and the kernel for the dtype and block size.
//
// Architecture paths (select_path):
//   kSm80Wmma  sm_80 and newer (A100, RTX 30xx/40xx, H100/H200 too): warp-level wmma
//              tensor-core tiles, bsmm_sm80.cuh.  The only path today.
//   Extension point: a Hopper path (wgmma + TMA, sm_90a) would add an enum value,
//   a case in select_path() for major == 9 when compiled for sm_90a, and
//   launch_{dsd,sdd}_sm90<T> (declared in bsmm_internal.cuh) in new .cu files.

#include "bsmm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "bsmm_internal.cuh"
#include "cuda_check.cuh"
#include "masked_adam.h"  // DType codes

namespace set_kernels {
namespace {

constexpr const char* kDsd = "set_kernels._C.linear_forward";
constexpr const char* kDds = "set_kernels._C.linear_grad_input";
constexpr const char* kSdd = "set_kernels._C.linear_grad_weight";

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

void check_common(const char* op, int dtype, int block) {
  if (!dtype_is_valid(dtype)) {
    throw std::invalid_argument(std::string(op) + ": unknown dtype code " + std::to_string(dtype));
  }
  if (!bsmm_block_is_valid(block)) {
    throw std::invalid_argument(std::string(op) + ": unsupported block_size " + std::to_string(block) +
                                " (expected 16, 32, 64 or 128)");
  }
}

void run_dsd(const char* op, const BsmmDsdArgs& a, bool dds, std::uintptr_t stream, int device) {
  check_common(op, a.dtype, a.block);
  if (a.M == 0) return;  // nothing to write (rows/cols >= 1 are checked by the bindings)
  const int count = require_device(op);
  DeviceGuard guard(device, count, op);
  const Path path = select_path(op, guard.device());
  (void)cudaGetLastError();  // a launch failure below must not be confused with an older error

  bsmm::DsdParams p{};
  p.a = a.a;
  p.lda = a.lda;
  p.values = a.values;
  p.ptr = a.ptr;
  p.idx = a.idx;
  p.perm = dds ? a.perm : nullptr;
  p.bias = dds ? nullptr : a.bias;
  p.out = a.out;
  p.ldo = a.ldo;
  p.M = a.M;
  p.k_total = dds ? a.rows : a.cols;
  p.n_out = dds ? a.cols : a.rows;
  p.split3 = a.tf32 ? 0 : 1;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (path) {
    case Path::kSm80Wmma:
      switch (a.dtype) {
        case kFloat32: bsmm::launch_dsd_sm80<float>(p, a.block, dds, s); break;
        case kFloat16: bsmm::launch_dsd_sm80<__half>(p, a.block, dds, s); break;
        case kBFloat16: bsmm::launch_dsd_sm80<__nv_bfloat16>(p, a.block, dds, s); break;
      }
      break;
  }
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace

void linear_forward(const BsmmDsdArgs& args, std::uintptr_t stream, int device) {
  run_dsd(kDsd, args, false, stream, device);
}

void linear_grad_input(const BsmmDsdArgs& args, std::uintptr_t stream, int device) {
  run_dsd(kDds, args, true, stream, device);
}

int linear_grad_weight_default_splits(std::int64_t M, std::int64_t nnz, int block) noexcept {
  if (M <= 0 || nnz <= 0 || !bsmm_block_is_valid(block)) return 1;
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

void linear_grad_weight(const BsmmSddArgs& a, std::uintptr_t stream, int device) {
  check_common(kSdd, a.dtype, a.block);
  if (a.splits < 1 || a.splits > kBsmmSddMaxSplits) {
    throw std::invalid_argument(std::string(kSdd) + ": splits must be in [1, " +
                                std::to_string(kBsmmSddMaxSplits) + "], got " + std::to_string(a.splits));
  }
  if (a.nnz == 0) return;  // empty output
  // Tokens per split: a whole number of K tiles; drop splits that would be empty.
  const std::int64_t M = a.M > 0 ? a.M : 0;
  std::int64_t chunk = ceil_div(ceil_div(M, a.splits), bsmm::kSddChunkQuantum) * bsmm::kSddChunkQuantum;
  if (chunk == 0) chunk = bsmm::kSddChunkQuantum;
  const int splits = M > 0 ? static_cast<int>(ceil_div(M, chunk)) : 1;
  if (splits > 1 && a.workspace_numel < linear_grad_weight_workspace_numel(splits, a.nnz, a.block)) {
    throw std::invalid_argument(std::string(kSdd) + ": workspace_numel=" + std::to_string(a.workspace_numel) +
                                " is smaller than the " +
                                std::to_string(linear_grad_weight_workspace_numel(splits, a.nnz, a.block)) +
                                " fp32 elements needed for " + std::to_string(splits) + " splits");
  }
  const int count = require_device(kSdd);
  DeviceGuard guard(device, count, kSdd);
  const Path path = select_path(kSdd, guard.device());
  (void)cudaGetLastError();

  bsmm::SddParams p{};
  p.dy = a.dy;
  p.lddy = a.lddy;
  p.x = a.x;
  p.ldx = a.ldx;
  p.block_row = a.block_row;
  p.col_idx = a.col_idx;
  p.out = a.out;
  p.workspace = a.workspace;
  p.M = M;
  p.rows = a.rows;
  p.cols = a.cols;
  p.nnz = a.nnz;
  p.chunk = chunk;
  p.splits = splits;
  p.split3 = a.tf32 ? 0 : 1;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (path) {
    case Path::kSm80Wmma:
      switch (a.dtype) {
        case kFloat32: bsmm::launch_sdd_sm80<float>(p, a.block, s); break;
        case kFloat16: bsmm::launch_sdd_sm80<__half>(p, a.block, s); break;
        case kBFloat16: bsmm::launch_sdd_sm80<__nv_bfloat16>(p, a.block, s); break;
      }
      break;
  }
}

}  // namespace set_kernels
