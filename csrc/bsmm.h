// Block-sparse matmuls (linear_forward / linear_grad_input / linear_grad_weight): host-side interface.
//
// Plain C++17 (no cuda_runtime.h, pybind11 or torch), like masked_adam.h, so the
// bindings in python/src/ compile with the host compiler alone.  Tensors are raw
// device pointers plus sizes and row strides; the layout is the int32 block
// CSR / CSC index of set_kernels.layout.BlockSparseLayout:
//
//   W (rows, cols) is made of b x b blocks; R = ceil(rows/b) block rows,
//   C = ceil(cols/b) block columns; values (nnz, b, b) in CSR order,
//   values[k, i, j] = W[block_row[k]*b + i, col_idx[k]*b + j].  Entries of edge
//   blocks beyond rows/cols are ignored (never read into a result) and dW writes
//   exact zeros there.
//
//   linear_forward:  y  (M, rows) = x (M, cols) @ W.T (+ bias (rows,))   CSR walk
//   linear_grad_input:  dx (M, cols) = dy (M, rows) @ W                      CSC walk, no atomics
//   linear_grad_weight:  dv (nnz, b, b), dv[k] = dy[:, rows of k].T @ x[:, cols of k]
//              deterministic split-K over the tokens M (fp32 partials in a
//              caller-provided workspace, then a fixed-order reduction pass)
//
// Dtypes fp32 / fp16 / bf16 (DType codes of masked_adam.h), fp32 accumulation,
// block sizes 16, 32, 64, 128.  The matmuls run on the tensor cores (wmma:
// m16n16k16 for fp16/bf16, m16n16k8 TF32 for fp32).  fp32 inputs use a 3xTF32
// split when `tf32 = false` (a = a_hi + a_lo, a*b ~ a_hi*b_hi + a_hi*b_lo + a_lo*b_hi,
// relative error of the products ~2^-21, i.e. close to fp32) and a single TF32
// pass when `tf32 = true` (10-bit mantissa inputs, ~1e-3 relative error, about
// 3x fewer tensor-core operations).  The Python backend sets the flag from
// torch's fp32 matmul precision (set_kernels/backends/_precision.py).
//
// The launchers check that a device exists before touching any pointer, make
// `device` current for the call (-1 = keep the current device), pick the
// kernel path for the device's architecture, and check every CUDA call and
// launch (std::runtime_error naming the kernel).  Argument validation (null
// pointers, sizes, strides, block size, dtype code, splits, workspace size) is
// done once, by the bindings (python/src/checks.h), before any CUDA call; the
// launchers only throw std::invalid_argument for a dtype or block size they
// have no kernel for.  Asynchronous on `stream`; no host synchronisation, no
// allocation.
#pragma once

#include <cstdint>

namespace set_kernels {

inline bool block_size_is_valid(int block) noexcept {
  return block == 16 || block == 32 || block == 64 || block == 128;
}

// The sizes, dtype and fp32 mode of a matmul (every op): W (rows, cols) of b x b blocks with nnz
// live, M tokens.  tf32: fp32 only, one TF32 pass instead of the 3xTF32 split.
struct MatmulShape {
  std::int64_t M = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t nnz = 0;
  int block = 0;
  int dtype = 0;
  bool tf32 = false;
};

// linear_forward and linear_grad_input share one argument set.
//   forward:    a = x (M, cols), ptr = row_ptr (R+1), idx = col_idx (nnz), perm unused,
//               out = y (M, rows), bias = (rows,) or null.
//   grad_input: a = dy (M, rows), ptr = col_ptr (C+1), idx = row_idx (nnz), perm (nnz),
//               out = dx (M, cols), bias must be null.
struct LinearArgs {
  const void* a = nullptr;
  std::int64_t lda = 0;  // row stride of a, in elements
  const void* values = nullptr;
  const std::int32_t* ptr = nullptr;
  const std::int32_t* idx = nullptr;
  const std::int32_t* perm = nullptr;
  const void* bias = nullptr;
  void* out = nullptr;
  std::int64_t ldo = 0;  // row stride of out, in elements
  MatmulShape shape;
};

void linear_forward(const LinearArgs& args, std::uintptr_t stream, int device);
void linear_grad_input(const LinearArgs& args, std::uintptr_t stream, int device);

struct GradWeightArgs {
  const void* dy = nullptr;  // (M, rows)
  std::int64_t lddy = 0;
  const void* x = nullptr;  // (M, cols)
  std::int64_t ldx = 0;
  const std::int32_t* block_row = nullptr;  // (nnz,)
  const std::int32_t* col_idx = nullptr;    // (nnz,)
  void* out = nullptr;                      // (nnz, b, b), contiguous
  float* workspace = nullptr;               // >= linear_grad_weight_workspace_numel(splits, nnz, b) floats
  std::int64_t workspace_numel = 0;
  MatmulShape shape;
  int splits = 1;  // token splits (split-K); 1 writes `out` directly
};

void linear_grad_weight(const GradWeightArgs& args, std::uintptr_t stream, int device);

// Largest accepted `splits`.
constexpr int kGradWeightMaxSplits = 1024;

// The split count linear_grad_weight uses by default: a function of the shape only (not
// of the GPU), so that results are bit-identical for a given shape: enough
// CTAs to fill a large GPU when few blocks are live, at least 512 tokens per
// split, at most 128 splits.
int linear_grad_weight_default_splits(std::int64_t M, std::int64_t nnz, int block) noexcept;

// fp32 elements of workspace linear_grad_weight needs for `splits` (0 when splits <= 1).
std::int64_t linear_grad_weight_workspace_numel(int splits, std::int64_t nnz, int block) noexcept;

}  // namespace set_kernels
