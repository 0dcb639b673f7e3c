// Internal interface between the bsmm launcher (bsmm.cu) and the per-architecture,
// per-dtype kernel files (bsmm_sm80_*.cu).  CUDA host code; not seen by the bindings.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace set_kernels {
namespace bsmm {

// Kernel arguments of linear_forward / linear_grad_input (passed by value to the kernel).
//   out[m, ob*b + n] = sum over live blocks e of output block ob:
//       sum_k a[m, idx[e]*b + k] * Wt[e](k, n)   (+ bias[ob*b + n])
//   forward:    ob = block row, Wt[e](k, n) = values[e][n][k]        (W.T)
//   grad_input: ob = block col, Wt[e](k, n) = values[perm[e]][k][n]  (W through the CSC index)
struct LinearParams {
  const void* a;
  std::int64_t lda;
  const void* values;
  const std::int32_t* ptr;
  const std::int32_t* idx;
  const std::int32_t* perm;  // grad_input only
  const void* bias;          // forward only, may be null
  void* out;
  std::int64_t ldo;
  std::int64_t M;
  std::int64_t k_total;  // width of a: cols (forward) / rows (grad_input)
  std::int64_t n_out;    // width of out: rows (forward) / cols (grad_input)
  int split3;            // fp32 only: 1 = 3xTF32, 0 = one TF32 pass
};

// Kernel arguments of linear_grad_weight.
struct GradWeightParams {
  const void* dy;
  std::int64_t lddy;
  const void* x;
  std::int64_t ldx;
  const std::int32_t* block_row;
  const std::int32_t* col_idx;
  void* out;          // (nnz, b, b), written when splits == 1
  float* workspace;   // (splits, nnz, b, b) fp32 partials when splits > 1
  std::int64_t M;
  std::int64_t rows;
  std::int64_t cols;
  std::int64_t nnz;
  std::int64_t chunk;  // tokens per split, a multiple of every tile's K step
  int splits;
  int split3;
};

// Tokens per split are rounded to a multiple of this (every grad_weight tile K step divides it).
constexpr std::int64_t kGradWeightChunkQuantum = 64;

// ---- the Ampere+ path: warp-level wmma tensor-core tiles (bsmm_sm80.cuh) -------------
// Defined, for T in {float, __half, __nv_bfloat16}, in bsmm_sm80_{forward,grad_weight}_<dtype>.cu.
// `block` is one of 16, 32, 64, 128 (checked by the caller).  Throw std::runtime_error
// naming the kernel when a launch fails.
template <typename T>
void launch_linear_sm80(const LinearParams& p, int block, bool grad_input, cudaStream_t stream);
template <typename T>
void launch_grad_weight_sm80(const GradWeightParams& p, int block, cudaStream_t stream);

// (A Hopper path -- wgmma fed by TMA from a multi-stage shared-memory pipeline --
// would add launch_linear_sm90 / launch_grad_weight_sm90 here with the same parameters, in
// its own bsmm_sm90_*.cu files compiled for sm_90a only, and one more case in
// select_path() in bsmm.cu.  It does not exist yet.)

}  // namespace bsmm
}  // namespace set_kernels
