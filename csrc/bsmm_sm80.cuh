// The Ampere+ (sm_80, also used on sm_90) path of the block-sparse matmuls:
// CTA tiles computed by warp-level wmma tensor-core fragments.
//
// Structure
//   TileSm80<...>   the tile-level device code of this architecture: shared-memory
//                   layout of one A tile and one B tile, the warp-level mma over
//                   them (wmma fragments), and the accumulator hand-off to shared
//                   memory.  A Hopper path would provide its own tile / mainloop
//                   (wgmma + TMA) behind the same launcher (see bsmm_internal.cuh).
//   StageLoader     guarded, coalesced global -> register -> shared copies of one
//                   operand tile, with zero fill outside the valid region.
//   linear_kernel      linear_forward and linear_grad_input (the same loop over one output block row /
//                   column; grad_input reads W through the CSC index, so there are no atomics).
//   grad_weight_kernel      linear_grad_weight over (live block, output sub-tile, token split).
//   grad_weight_reduce      fixed-order sum of the split-K partials (deterministic).
//
// Edge handling: every global load is guarded; operand elements outside the matrix
// (tokens >= M, columns >= rows/cols) and entries of an edge block beyond the
// matrix edge are replaced by zeros in shared memory, so nothing past the edge is
// read into a result (even NaN there is harmless), and wmma only ever sees full
// 16x16 tiles at 32-byte aligned shared-memory addresses.  Stores are guarded.
//
// Pipelining: one shared-memory stage; the next tile's global loads are issued into
// registers before the current tile's mma, then stored after it (latency hiding
// without cp.async).  Loads are scalar (any alignment and row stride work).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "bsmm_internal.cuh"
#include "cuda_check.cuh"

namespace set_kernels {
namespace bsmm {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // 4 warps per CTA, for every kernel here
constexpr const char* kForwardName = "set_kernels._C.linear_forward";
constexpr const char* kGradInputName = "set_kernels._C.linear_grad_input";
constexpr const char* kGradWeightName = "set_kernels._C.linear_grad_weight";

// ---- element conversions --------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct DTypeName;
template <>
struct DTypeName<float> { static constexpr const char* value = "float32"; };
template <>
struct DTypeName<__half> { static constexpr const char* value = "float16"; };
template <>
struct DTypeName<__nv_bfloat16> { static constexpr const char* value = "bfloat16"; };

// wmma input type and K of the m16n16kK shape for each element type.
template <typename T>
struct MmaInput;
template <>
struct MmaInput<__half> { using type = __half; static constexpr int kK = 16; };
template <>
struct MmaInput<__nv_bfloat16> { using type = __nv_bfloat16; static constexpr int kK = 16; };
template <>
struct MmaInput<float> { using type = wmma::precision::tf32; static constexpr int kK = 8; };

constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
constexpr int cmax(int a, int b) { return a > b ? a : b; }

// ---- the tile of this architecture ----------------------------------------------------
// C (BM x BN, fp32) += A (BM x BK) * B (BK x BN), both operands in shared memory.
//   kAColMajor = false: A stored [BM][ldA] (k contiguous);  true: [BK][ldA] (m contiguous).
//   kBRowMajor = true:  B stored [BK][ldB] (n contiguous);  false: [BN][ldB] (k contiguous).
// Warps: WM x WN over the output, times WK splitting the K steps of a tile (their
// partial accumulators are summed in a fixed order in the epilogue).
// wmma requirements met by construction: fragment pointers 32-byte aligned (the
// shared buffer is 128-byte aligned, fragment offsets are multiples of 16 rows /
// 16 (8 for tf32) columns, row pitches are whole 16-byte multiples) and ldm a
// multiple of 8 elements (16-bit types) or 4 (float).
template <typename T, int BM, int BN, int BK, int WM, int WN, int WK, bool kAColMajor, bool kBRowMajor>
struct TileSm80 {
  static constexpr int kWarps = kThreads / 32;
  static_assert(WM * WN * WK == kWarps, "warp grid must use every warp");
  static constexpr int kK = MmaInput<T>::kK;
  static constexpr int FM = BM / (16 * WM);
  static constexpr int FN = BN / (16 * WN);
  static_assert(FM >= 1 && FN >= 1 && FM * 16 * WM == BM && FN * 16 * WN == BN, "bad warp tiling");
  static_assert(BK % kK == 0 && (BK / kK) % WK == 0, "K steps must split evenly over WK");

  static constexpr int kPad = sizeof(T) == 2 ? 8 : 4;  // 16 bytes: keeps ldm legal, spreads banks
  static constexpr int kLdA = (kAColMajor ? BM : BK) + kPad;
  static constexpr int kRowsA = kAColMajor ? BK : BM;
  static constexpr int kLdB = (kBRowMajor ? BN : BK) + kPad;
  static constexpr int kRowsB = kBRowMajor ? BK : BN;
  static constexpr int kLdC = BN + 4;
  static_assert(kLdA % (sizeof(T) == 2 ? 8 : 4) == 0 && kLdB % (sizeof(T) == 2 ? 8 : 4) == 0, "ldm");
  static constexpr int kABytes = round_up(kRowsA * kLdA * static_cast<int>(sizeof(T)), 128);
  static constexpr int kBBytes = round_up(kRowsB * kLdB * static_cast<int>(sizeof(T)), 128);
  static constexpr int kCBytes = WK * BM * kLdC * 4;
  static constexpr int kSmemBytes = cmax(kABytes + kBBytes, kCBytes);
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
  static_assert((BM * kLdC * 4) % 32 == 0, "partial accumulators must stay 32-byte aligned");

  using In = typename MmaInput<T>::type;
  using ALayout = std::conditional_t<kAColMajor, wmma::col_major, wmma::row_major>;
  using BLayout = std::conditional_t<kBRowMajor, wmma::row_major, wmma::col_major>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kK, In, ALayout>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kK, In, BLayout>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, kK, float>;

  struct Acc {
    FragC c[FM][FN];
  };

  __device__ static int warp_m(int warp) { return (warp % (WM * WN)) / WN; }
  __device__ static int warp_n(int warp) { return (warp % (WM * WN)) % WN; }
  __device__ static int warp_k(int warp) {
    if constexpr (WK == 1) return 0;  // lets the compiler unroll the K steps fully
    else return warp / (WM * WN);
  }

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc.c[i][j], 0.0f);
  }

  __device__ static const T* a_ptr(const T* As, int m, int k) {
    return kAColMajor ? As + k * kLdA + m : As + m * kLdA + k;
  }
  __device__ static const T* b_ptr(const T* Bs, int k, int n) {
    return kBRowMajor ? Bs + k * kLdB + n : Bs + n * kLdB + k;
  }

  // v rounded to TF32 with the low 13 mantissa bits cleared.  PTX leaves those bits of
  // cvt.rna.tf32.f32 (what __float_to_tf32 emits) to the implementation, and the tensor cores
  // ignore them; the 3xTF32 split needs hi to be exactly the value the hardware multiplies,
  // or v - hi misses the difference (CUTLASS clears them too).  NaN stays NaN.
  __device__ static float to_tf32(float v) {
    const float r = __uint_as_float(__float_as_uint(wmma::__float_to_tf32(v)) & 0xffffe000u);
    return isnan(v) ? v : r;
  }
  // Rounds fp32 fragment elements to TF32 (hi) and the remainder to TF32 (lo).
  template <typename Frag>
  __device__ static void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
    for (int t = 0; t < hi.num_elements; ++t) {
      const float v = hi.x[t];
      const float h = to_tf32(v);
      hi.x[t] = h;
      lo.x[t] = to_tf32(v - h);  // exact difference: h is v rounded to 11 significant bits
    }
  }
  template <typename Frag>
  __device__ static void round_tf32(Frag& f) {
#pragma unroll
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = to_tf32(f.x[t]);
  }

  // acc += A * B over this warp's share of the tile's K steps.
  //
  // 3xTF32 (fp32 with split3): the three products of each K step go into a fresh per-tile
  // accumulator, which is then added to acc with ordinary fp32 adds (round to nearest).  The
  // tensor cores' own accumulation need not round to nearest (it is documented to truncate on
  // some parts); summed straight into acc, three truncations per K step of 8 over a long
  // reduction would cost more than the split gains: emulated with truncation, the error
  // relative to the largest entry grows to 4e-5 at K = 4096 and 3e-4 at K = 30000, against
  // 4e-7 and 9e-7 with this per-tile promotion (see tests/test_cuda_backend.py, long K).
  __device__ static void mma(Acc& acc, const T* As, const T* Bs, int warp, bool split3) {
    if constexpr (std::is_same_v<T, float>) {
      if (split3) {
        Acc part;
        zero(part);
        mma_steps(part, As, Bs, warp, true);
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
          for (int j = 0; j < FN; ++j)
#pragma unroll
            for (int t = 0; t < part.c[i][j].num_elements; ++t) acc.c[i][j].x[t] += part.c[i][j].x[t];
        return;
      }
    }
    mma_steps(acc, As, Bs, warp, false);
  }

  __device__ static void mma_steps(Acc& acc, const T* As, const T* Bs, int warp, bool split3) {
    const int m_base = warp_m(warp) * FM * 16;
    const int n_base = warp_n(warp) * FN * 16;
#pragma unroll
    for (int kk = warp_k(warp) * kK; kk < BK; kk += WK * kK) {
      FragA a[FM];
      FragB b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], a_ptr(As, m_base + 16 * i, kk), kLdA);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], b_ptr(Bs, kk, n_base + 16 * j), kLdB);
      if constexpr (std::is_same_v<T, float>) {
        if (split3) {
          // 3xTF32: a*b ~ a_lo*b_hi + a_hi*b_lo + a_hi*b_hi (small terms first).
          FragA a_lo[FM];
          FragB b_lo[FN];
#pragma unroll
          for (int i = 0; i < FM; ++i) split_tf32(a[i], a_lo[i]);
#pragma unroll
          for (int j = 0; j < FN; ++j) split_tf32(b[j], b_lo[j]);
#pragma unroll
          for (int i = 0; i < FM; ++i)
#pragma unroll
            for (int j = 0; j < FN; ++j) {
              wmma::mma_sync(acc.c[i][j], a_lo[i], b[j], acc.c[i][j]);
              wmma::mma_sync(acc.c[i][j], a[i], b_lo[j], acc.c[i][j]);
              wmma::mma_sync(acc.c[i][j], a[i], b[j], acc.c[i][j]);
            }
          continue;
        }
#pragma unroll
        for (int i = 0; i < FM; ++i) round_tf32(a[i]);
#pragma unroll
        for (int j = 0; j < FN; ++j) round_tf32(b[j]);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc.c[i][j], a[i], b[j], acc.c[i][j]);
    }
  }

  // Writes this warp's accumulators to Cs[warp_k][BM][kLdC] (fp32, shared).
  __device__ static void store(const Acc& acc, float* Cs, int warp) {
    float* base = Cs + warp_k(warp) * BM * kLdC;
    const int m_base = warp_m(warp) * FM * 16;
    const int n_base = warp_n(warp) * FN * 16;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::store_matrix_sync(base + (m_base + 16 * i) * kLdC + n_base + 16 * j, acc.c[i][j], kLdC,
                                wmma::mem_row_major);
  }

  // C[m][n] after store(): the WK partial sums added in a fixed order.
  __device__ static float result(const float* Cs, int m, int n) {
    float v = Cs[m * kLdC + n];
#pragma unroll
    for (int w = 1; w < WK; ++w) v += Cs[w * BM * kLdC + m * kLdC + n];
    return v;
  }
};

// Guarded copy of one operand tile, ROWS x WIDTH in shared-memory order (WIDTH is the
// contiguous dimension, in global as in shared memory), through registers.
template <typename T, int ROWS, int WIDTH, int LD>
struct StageLoader {
  static_assert((ROWS * WIDTH) % kThreads == 0, "tile must split evenly over the threads");
  static constexpr int kPerThread = ROWS * WIDTH / kThreads;
  T v[kPerThread];

  // get(r, c) returns the (already guarded) element at tile row r, column c.
  template <typename Get>
  __device__ void load(Get&& get) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * kThreads;
      v[i] = get(e / WIDTH, e % WIDTH);
    }
  }
  __device__ void store(T* s) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * kThreads;
      s[(e / WIDTH) * LD + e % WIDTH] = v[i];
    }
  }
};

// ---- linear_forward / linear_grad_input ----------------------------------------------------------------
// CTA: 64 tokens x BN output columns of one output block (row for forward, column for grad_input);
// b = 128 uses two 64-wide sub-tiles.  K walks the live blocks of the output block, BK at a time.
template <typename T, int B, bool kGradInput>
struct LinearConfig {
  static constexpr int BN = B < 64 ? B : 64;
  static constexpr int BK = B < 32 ? B : 32;
  static constexpr int BM = 64;
  static constexpr int WN = BN == 64 ? 2 : 1;
  static constexpr int WM = 4 / WN;
  static constexpr int NSUB = B / BN;
  static constexpr int KT = B / BK;  // K tiles per block
  using Tile = TileSm80<T, BM, BN, BK, WM, WN, 1, /*A col-major*/ false, /*B row-major*/ kGradInput>;
};

template <typename T, int B, bool kGradInput>
__global__ void __launch_bounds__(kThreads) linear_kernel(const LinearParams p) {
  using Cfg = LinearConfig<T, B, kGradInput>;
  using Tile = typename Cfg::Tile;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, KT = Cfg::KT;
  __shared__ __align__(128) unsigned char smem[Tile::kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + Tile::kABytes);
  float* Cs = reinterpret_cast<float*>(smem);  // aliases As/Bs after the main loop

  const std::int64_t ob = blockIdx.x / Cfg::NSUB;  // output block
  const int n0 = static_cast<int>(blockIdx.x % Cfg::NSUB) * BN;
  const std::int64_t n_edge = p.n_out - ob * B;  // valid output columns of this block (may exceed B)
  const int n_valid = static_cast<int>((n_edge < B ? n_edge : B) - n0);
  if (n_valid <= 0) return;  // sub-tile entirely past the matrix edge (uniform over the CTA)

  const T* __restrict__ A = static_cast<const T*>(p.a);
  const T* __restrict__ V = static_cast<const T*>(p.values);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ Y = static_cast<T*>(p.out);
  const int begin = p.ptr[ob];
  const int ntiles = (p.ptr[ob + 1] - begin) * KT;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const bool split3 = p.split3 != 0;
  const std::int64_t m_tiles = (p.M + BM - 1) / BM;

  StageLoader<T, BM, BK, Tile::kLdA> la;
  StageLoader<T, Tile::kRowsB, kGradInput ? BN : BK, Tile::kLdB> lb;

  for (std::int64_t mt = blockIdx.y; mt < m_tiles; mt += gridDim.y) {
    const std::int64_t m0 = mt * BM;
    const std::int64_t m_valid = p.M - m0;

    auto load = [&](int t) {
      const int e = begin + t / KT;
      const int kc = (t % KT) * BK;
      const std::int64_t kb = static_cast<std::int64_t>(p.idx[e]) * B;  // first column of a
      const std::int64_t v = kGradInput ? static_cast<std::int64_t>(p.perm[e]) : static_cast<std::int64_t>(e);
      const std::int64_t k_edge = p.k_total - kb - kc;  // valid k in this chunk (clipped below)
      const int k_valid = static_cast<int>(k_edge < BK ? k_edge : BK);
      const T* __restrict__ blk = V + v * (B * B);
      const T* __restrict__ arow = A + kb + kc;
      la.load([&](int r, int c) {
        return (r < m_valid && c < k_valid) ? arow[(m0 + r) * p.lda + c] : from_float<T>(0.0f);
      });
      if constexpr (kGradInput) {  // B tile (k, n) = values[v][kc + k][n0 + n]
        lb.load([&](int r, int c) {
          return r < k_valid ? blk[(kc + r) * B + n0 + c] : from_float<T>(0.0f);
        });
      } else {  // B tile stored [n][k]: values[v][n0 + n][kc + k]
        lb.load([&](int r, int c) {
          return c < k_valid ? blk[(n0 + r) * B + kc + c] : from_float<T>(0.0f);
        });
      }
    };

    typename Tile::Acc acc;
    Tile::zero(acc);
    if (ntiles > 0) {
      load(0);
      la.store(As);
      lb.store(Bs);
    }
    __syncthreads();
    for (int t = 0; t < ntiles; ++t) {
      const bool more = t + 1 < ntiles;
      if (more) load(t + 1);  // in flight during the mma below
      Tile::mma(acc, As, Bs, warp, split3);
      __syncthreads();
      if (more) {
        la.store(As);
        lb.store(Bs);
        __syncthreads();
      }
    }

    // Epilogue: accumulators -> shared (fp32) -> + bias -> one rounding -> global.
    Tile::store(acc, Cs, warp);
    __syncthreads();
    const std::int64_t col0 = ob * B + n0;
    for (int e = static_cast<int>(threadIdx.x); e < BM * BN; e += kThreads) {
      const int r = e / BN;
      const int c = e % BN;
      if (r < m_valid && c < n_valid) {
        float y = Tile::result(Cs, r, c);
        if (bias != nullptr) y += to_float(bias[col0 + c]);
        Y[(m0 + r) * p.ldo + col0 + c] = from_float<T>(y);
      }
    }
    __syncthreads();  // Cs aliases As/Bs of the next token tile
  }
}

// ---- linear_grad_weight -----------------------------------------------------------------------------
// CTA: one BI x BI sub-tile of one live block's gradient, over one token split; K = tokens.
// b = 16 has a single 16x16 fragment per tile, so its 4 warps split K instead (WK = 4).
template <typename T, int B>
struct GradWeightConfig {
  static constexpr int BI = B < 64 ? B : 64;
  static constexpr int BK = B == 16 ? 64 : 32;
  static constexpr int WM = BI >= 32 ? 2 : 1;
  static constexpr int WN = WM;
  static constexpr int WK = 4 / (WM * WN);
  static constexpr int NSUB = B / BI;
  static_assert(kGradWeightChunkQuantum % BK == 0, "split chunks must be whole K tiles");
  using Tile = TileSm80<T, BI, BI, BK, WM, WN, WK, /*A col-major*/ true, /*B row-major*/ true>;
};

template <typename T, int B>
__global__ void __launch_bounds__(kThreads) grad_weight_kernel(const GradWeightParams p) {
  using Cfg = GradWeightConfig<T, B>;
  using Tile = typename Cfg::Tile;
  constexpr int BI = Cfg::BI, BK = Cfg::BK, NSUB = Cfg::NSUB;
  __shared__ __align__(128) unsigned char smem[Tile::kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + Tile::kABytes);
  float* Cs = reinterpret_cast<float*>(smem);

  const std::int64_t blk = blockIdx.x / (NSUB * NSUB);
  const int sub = static_cast<int>(blockIdx.x % (NSUB * NSUB));
  const int i0 = (sub / NSUB) * BI;
  const int j0 = (sub % NSUB) * BI;
  const std::int64_t r = p.block_row[blk];
  const std::int64_t c = p.col_idx[blk];
  const std::int64_t i_edge = p.rows - r * B;
  const std::int64_t j_edge = p.cols - c * B;
  const int i_valid = static_cast<int>((i_edge < B ? i_edge : B) - i0);
  const int j_valid = static_cast<int>((j_edge < B ? j_edge : B) - j0);
  const int split = static_cast<int>(blockIdx.y);
  T* __restrict__ out_blk = static_cast<T*>(p.out) + blk * (B * B);

  if (i_valid <= 0 || j_valid <= 0) {
    // Sub-tile entirely past the matrix edge: exact zeros (the reduction pass masks it
    // when splitting, so the workspace is not written).
    if (p.splits == 1) {
      for (int e = static_cast<int>(threadIdx.x); e < BI * BI; e += kThreads)
        out_blk[(i0 + e / BI) * B + j0 + e % BI] = from_float<T>(0.0f);
    }
    return;
  }

  const T* __restrict__ DY = static_cast<const T*>(p.dy) + r * B + i0;
  const T* __restrict__ X = static_cast<const T*>(p.x) + c * B + j0;
  const std::int64_t t_begin = static_cast<std::int64_t>(split) * p.chunk;
  const std::int64_t t_stop = t_begin + p.chunk < p.M ? t_begin + p.chunk : p.M;
  const int ntiles = t_stop > t_begin ? static_cast<int>((t_stop - t_begin + BK - 1) / BK) : 0;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const bool split3 = p.split3 != 0;

  StageLoader<T, BK, BI, Tile::kLdA> la;  // A = dy tile stored [token][i]
  StageLoader<T, BK, BI, Tile::kLdB> lb;  // B = x tile stored [token][j]
  auto load = [&](int t) {
    const std::int64_t tb = t_begin + static_cast<std::int64_t>(t) * BK;
    const std::int64_t t_valid = t_stop - tb;
    la.load([&](int rr, int cc) {
      return (rr < t_valid && cc < i_valid) ? DY[(tb + rr) * p.lddy + cc] : from_float<T>(0.0f);
    });
    lb.load([&](int rr, int cc) {
      return (rr < t_valid && cc < j_valid) ? X[(tb + rr) * p.ldx + cc] : from_float<T>(0.0f);
    });
  };

  typename Tile::Acc acc;
  Tile::zero(acc);
  if (ntiles > 0) {
    load(0);
    la.store(As);
    lb.store(Bs);
  }
  __syncthreads();
  for (int t = 0; t < ntiles; ++t) {
    const bool more = t + 1 < ntiles;
    if (more) load(t + 1);
    Tile::mma(acc, As, Bs, warp, split3);
    __syncthreads();
    if (more) {
      la.store(As);
      lb.store(Bs);
      __syncthreads();
    }
  }

  Tile::store(acc, Cs, warp);
  __syncthreads();
  if (p.splits == 1) {
    for (int e = static_cast<int>(threadIdx.x); e < BI * BI; e += kThreads) {
      const int i = e / BI;
      const int j = e % BI;
      const float v = (i < i_valid && j < j_valid) ? Tile::result(Cs, i, j) : 0.0f;
      out_blk[(i0 + i) * B + j0 + j] = from_float<T>(v);
    }
  } else {
    float* __restrict__ ws = p.workspace + (static_cast<std::int64_t>(split) * p.nnz + blk) * (B * B);
    for (int e = static_cast<int>(threadIdx.x); e < BI * BI; e += kThreads) {
      const int i = e / BI;
      const int j = e % BI;
      ws[(i0 + i) * B + j0 + j] = Tile::result(Cs, i, j);
    }
  }
}

// Second pass of the split-K: out[e] = sum over splits s = 0, 1, ... (in this order) of
// workspace[s][e]; exact zeros past the matrix edge.  Grid-stride over nnz * b * b.
template <typename T>
__global__ void __launch_bounds__(256) grad_weight_reduce_kernel(const GradWeightParams p, int B) {
  const std::int64_t bb = static_cast<std::int64_t>(B) * B;
  const std::int64_t total = p.nnz * bb;
  T* __restrict__ out = static_cast<T*>(p.out);
  const float* __restrict__ ws = p.workspace;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const std::int64_t k = e / bb;
    const int rem = static_cast<int>(e - k * bb);
    const int i = rem / B;
    const int j = rem % B;
    const bool valid = i < p.rows - static_cast<std::int64_t>(p.block_row[k]) * B &&
                       j < p.cols - static_cast<std::int64_t>(p.col_idx[k]) * B;
    float s = 0.0f;
    if (valid) {
      for (int sp = 0; sp < p.splits; ++sp) s += ws[sp * total + e];
    }
    out[e] = from_float<T>(s);
  }
}

// ---- launchers (instantiated per dtype in bsmm_sm80_*.cu) ---------------------------------
inline unsigned grid_y_for(std::int64_t tiles) {
  return static_cast<unsigned>(tiles < 65535 ? (tiles > 0 ? tiles : 1) : 65535);
}

template <typename T, int B, bool kGradInput>
void launch_linear_block(const LinearParams& p, cudaStream_t stream) {
  using Cfg = LinearConfig<T, B, kGradInput>;
  const std::int64_t out_blocks = (p.n_out + B - 1) / B;
  const std::int64_t gx = out_blocks * Cfg::NSUB;
  const std::int64_t m_tiles = (p.M + Cfg::BM - 1) / Cfg::BM;
  const char* op = kGradInput ? kGradInputName : kForwardName;
  if (gx > 0x7fffffffLL) throw std::invalid_argument(std::string(op) + ": too many output blocks");
  const dim3 grid(static_cast<unsigned>(gx), grid_y_for(m_tiles));
  linear_kernel<T, B, kGradInput><<<grid, kThreads, 0, stream>>>(p);
  check_launch(op, std::string(kGradInput ? "linear_grad_input" : "linear_forward") + "_kernel<" + DTypeName<T>::value +
                       ", b=" + std::to_string(B) + ">");
}

template <typename T>
void launch_linear_sm80(const LinearParams& p, int block, bool grad_input, cudaStream_t stream) {
  switch (block) {
    case 16: grad_input ? launch_linear_block<T, 16, true>(p, stream) : launch_linear_block<T, 16, false>(p, stream); break;
    case 32: grad_input ? launch_linear_block<T, 32, true>(p, stream) : launch_linear_block<T, 32, false>(p, stream); break;
    case 64: grad_input ? launch_linear_block<T, 64, true>(p, stream) : launch_linear_block<T, 64, false>(p, stream); break;
    case 128: grad_input ? launch_linear_block<T, 128, true>(p, stream) : launch_linear_block<T, 128, false>(p, stream); break;
    default: throw std::invalid_argument(std::string(grad_input ? kGradInputName : kForwardName) + ": unsupported block size " +
                                         std::to_string(block));
  }
}

template <typename T, int B>
void launch_grad_weight_block(const GradWeightParams& p, cudaStream_t stream) {
  using Cfg = GradWeightConfig<T, B>;
  const std::int64_t gx = p.nnz * Cfg::NSUB * Cfg::NSUB;
  if (gx > 0x7fffffffLL) throw std::invalid_argument(std::string(kGradWeightName) + ": nnz is too large");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(p.splits));
  grad_weight_kernel<T, B><<<grid, kThreads, 0, stream>>>(p);
  check_launch(kGradWeightName, std::string("linear_grad_weight_kernel<") + DTypeName<T>::value + ", b=" + std::to_string(B) + ">");
  if (p.splits > 1) {
    const std::int64_t total = p.nnz * B * B;
    const std::int64_t blocks = (total + 255) / 256;
    const unsigned rg = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
    grad_weight_reduce_kernel<T><<<rg, 256, 0, stream>>>(p, B);
    check_launch(kGradWeightName, std::string("linear_grad_weight_reduce_kernel<") + DTypeName<T>::value + ">");
  }
}

template <typename T>
void launch_grad_weight_sm80(const GradWeightParams& p, int block, cudaStream_t stream) {
  switch (block) {
    case 16: launch_grad_weight_block<T, 16>(p, stream); break;
    case 32: launch_grad_weight_block<T, 32>(p, stream); break;
    case 64: launch_grad_weight_block<T, 64>(p, stream); break;
    case 128: launch_grad_weight_block<T, 128>(p, stream); break;
    default: throw std::invalid_argument(std::string(kGradWeightName) + ": unsupported block size " + std::to_string(block));
  }
}

}  // namespace bsmm
}  // namespace set_kernels
