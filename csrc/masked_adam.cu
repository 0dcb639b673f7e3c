// Masked Adam/AdamW: CUDA kernel, launcher and small CUDA runtime helpers.
//
// Per element, in fp32, following torch.optim.Adam / AdamW (single-tensor
// path, non-capturable):
//
//   if found_inf given and *found_inf != 0: no update at all
//   g = grad (/ *grad_scale if given)
//   if wd != 0: decoupled ? p *= 1 - lr*wd : g += wd*p
//   m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g
//   p -= lr/(1-beta1^step) * m / (sqrt(v)/sqrt(1-beta2^step) + eps)
//   where mask is false: p = m = v = 0
//
// One launch handles up to kMaxTensorsPerLaunch tensors of one dtype: the
// tensors' pointers travel in a by-value table (a kernel parameter), blockIdx.y
// selects the tensor and blocks stride over its elements in x (64-bit indexes).

#include "masked_adam.h"

#include "cuda_check.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

// Set by CMake to the configured CMAKE_CUDA_ARCHITECTURES, comma-separated.
#ifndef SET_KERNELS_CUDA_ARCHS
#define SET_KERNELS_CUDA_ARCHS ""
#endif

#define SET_KERNELS_STRINGIFY_(...) #__VA_ARGS__
#define SET_KERNELS_STRINGIFY(...) SET_KERNELS_STRINGIFY_(__VA_ARGS__)

namespace set_kernels {
namespace {

constexpr const char* kOpName = "set_kernels._C.masked_adam_";
constexpr int kMaxTensorsPerLaunch = 32;
constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocksPerTensor = 1024;

// ---- element math -----------------------------------------------------------

// Scalars prepared on the host (double precision there, fp32 here), mirroring
// how torch turns its Python-float hyper-parameters into fp32 kernel scalars.
struct ElementArgs {
  float beta2;
  float one_minus_beta1;  // lerp weight
  float one_minus_beta2;
  float eps;
  float weight_decay;  // used when l2 is true
  float decay_factor;  // 1 - lr*wd, used when decoupled_decay is true
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  bool l2;
  bool decoupled_decay;
};

__host__ __device__ __forceinline__ void adam_element(float& p, float g, float& m, float& v,
                                                      const ElementArgs& a) {
  if (a.decoupled_decay) p = p * a.decay_factor;  // param.mul_(1 - lr*wd)
  if (a.l2) g = g + a.weight_decay * p;            // grad.add(param, alpha=wd)
  // exp_avg.lerp_(grad, 1 - beta1), with torch's two-sided lerp formula.
  const float w = a.one_minus_beta1;
  m = (w < 0.5f) ? m + w * (g - m) : g - (g - m) * (1.0f - w);
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  v = v * a.beta2 + a.one_minus_beta2 * g * g;
  // denom = sqrt(v) / sqrt(bc2) + eps; param.addcdiv_(m, denom, value=-step_size)
  const float denom = sqrtf(v) / a.bc2_sqrt + a.eps;
  p = p + a.neg_step_size * (m / denom);
}

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr const char* name = "float32";
  __device__ __forceinline__ static float load(float x) { return x; }
  __device__ __forceinline__ static float store(float x) { return x; }
};
template <>
struct Elem<__half> {
  static constexpr const char* name = "float16";
  __device__ __forceinline__ static float load(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr const char* name = "bfloat16";
  __device__ __forceinline__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// ---- kernel -------------------------------------------------------------------

template <typename T>
struct TensorTable {
  T* param[kMaxTensorsPerLaunch];
  const T* grad[kMaxTensorsPerLaunch];
  float* exp_avg[kMaxTensorsPerLaunch];
  float* exp_avg_sq[kMaxTensorsPerLaunch];
  const std::uint8_t* mask[kMaxTensorsPerLaunch];
  std::int64_t numel[kMaxTensorsPerLaunch];
};
// Kernel parameters are limited to 4 KiB on older toolkits/drivers.
static_assert(sizeof(TensorTable<float>) + sizeof(ElementArgs) + 2 * sizeof(void*) <= 4000,
              "masked_adam_ kernel parameters too large");

template <typename T>
__global__ void __launch_bounds__(kThreads)
    masked_adam_kernel(const TensorTable<T> table, const ElementArgs args,
                       const float* __restrict__ grad_scale, const float* __restrict__ found_inf) {
  // AMP overflow: skip the whole step without a host synchronisation.
  if (found_inf != nullptr && *found_inf != 0.0f) return;

  const int t = blockIdx.y;
  const std::int64_t n = table.numel[t];
  T* __restrict__ p = table.param[t];
  const T* __restrict__ g = table.grad[t];
  float* __restrict__ m = table.exp_avg[t];
  float* __restrict__ v = table.exp_avg_sq[t];
  const std::uint8_t* __restrict__ mask = table.mask[t];
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;

  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    if (mask != nullptr && mask[i] == 0) {
      p[i] = Elem<T>::store(0.0f);
      m[i] = 0.0f;
      v[i] = 0.0f;
      continue;
    }
    float pf = Elem<T>::load(p[i]);
    float gf = Elem<T>::load(g[i]);
    if (grad_scale != nullptr) gf = gf / scale;
    float mf = m[i];
    float vf = v[i];
    adam_element(pf, gf, mf, vf, args);
    p[i] = Elem<T>::store(pf);
    m[i] = mf;
    v[i] = vf;
  }
}

// ---- launcher -------------------------------------------------------------------

ElementArgs make_element_args(const AdamHyperParams& hp) {
  const double step = static_cast<double>(hp.step);
  const double bc1 = 1.0 - std::pow(hp.beta1, step);
  const double bc2 = 1.0 - std::pow(hp.beta2, step);
  ElementArgs a{};
  a.beta2 = static_cast<float>(hp.beta2);
  a.one_minus_beta1 = static_cast<float>(1.0 - hp.beta1);
  a.one_minus_beta2 = static_cast<float>(1.0 - hp.beta2);
  a.eps = static_cast<float>(hp.eps);
  a.weight_decay = static_cast<float>(hp.weight_decay);
  a.decay_factor = static_cast<float>(1.0 - hp.lr * hp.weight_decay);
  a.neg_step_size = static_cast<float>(-(hp.lr / bc1));
  a.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  a.l2 = hp.weight_decay != 0.0 && !hp.decoupled;
  a.decoupled_decay = hp.weight_decay != 0.0 && hp.decoupled;
  return a;
}

template <typename T>
void launch_all(const std::vector<AdamTensor>& tensors, const ElementArgs& args,
                const AdamHyperParams& hp, cudaStream_t stream) {
  TensorTable<T> table{};
  int count = 0;
  std::int64_t max_numel = 0;

  auto flush = [&]() {
    if (count == 0) return;
    const std::int64_t blocks =
        std::min<std::int64_t>(std::max<std::int64_t>((max_numel + kThreads - 1) / kThreads, 1),
                               kMaxBlocksPerTensor);
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(count));
    masked_adam_kernel<T><<<grid, kThreads, 0, stream>>>(table, args, hp.grad_scale, hp.found_inf);
    check_launch(kOpName, std::string("masked_adam_kernel<") + Elem<T>::name + ">");
    table = TensorTable<T>{};
    count = 0;
    max_numel = 0;
  };

  for (const AdamTensor& t : tensors) {
    if (t.numel <= 0) continue;
    table.param[count] = static_cast<T*>(t.param);
    table.grad[count] = static_cast<const T*>(t.grad);
    table.exp_avg[count] = t.exp_avg;
    table.exp_avg_sq[count] = t.exp_avg_sq;
    table.mask[count] = t.mask;
    table.numel[count] = t.numel;
    max_numel = std::max(max_numel, t.numel);
    if (++count == kMaxTensorsPerLaunch) flush();
  }
  flush();
}

}  // namespace

const char* dtype_name(int dtype) noexcept {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "";
  }
}

void masked_adam_(const std::vector<AdamTensor>& tensors, int dtype, const AdamHyperParams& hp,
                 std::uintptr_t stream, int device) {
  // A device must exist before any pointer is used; then run on `device`.
  const int device_count = require_device(kOpName);
  DeviceGuard guard(device, device_count, kOpName);
  (void)cudaGetLastError();  // a launch failure below must not be confused with an older error

  const ElementArgs args = make_element_args(hp);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch_all<float>(tensors, args, hp, s); break;
    case kFloat16: launch_all<__half>(tensors, args, hp, s); break;
    case kBFloat16: launch_all<__nv_bfloat16>(tensors, args, hp, s); break;
    default: throw std::invalid_argument(std::string(kOpName) + ": unknown dtype code " + std::to_string(dtype));
  }
}

// ---- runtime helpers --------------------------------------------------------------

int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_device_error() noexcept {
  try {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return "cudaGetDeviceCount: " + cuda_error_text(err);
    }
    if (n == 0) return "cudaGetDeviceCount returned 0";
    return "";
  } catch (...) {
    return "cudaGetDeviceCount: unknown error";
  }
}

int cuda_runtime_version() noexcept {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

int cuda_driver_version() noexcept {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

std::vector<std::string> compiled_archs() {
  // Prefer the configured list: it keeps arch-specific suffixes ("90a") that
  // nvcc's __CUDA_ARCH_LIST__ drops.  Fall back to __CUDA_ARCH_LIST__ for the
  // special CMake values (all, all-major, native).
  std::vector<std::string> out;
  const std::string configured = SET_KERNELS_CUDA_ARCHS;
  bool special = configured.empty();
  std::size_t start = 0;
  while (!special && start <= configured.size()) {
    std::size_t end = configured.find(',', start);
    if (end == std::string::npos) end = configured.size();
    std::string tok = configured.substr(start, end - start);
    start = end + 1;
    if (tok.empty()) continue;
    std::string prefix = "sm_";
    const std::string real = "-real", virt = "-virtual";
    if (tok.size() > real.size() && tok.compare(tok.size() - real.size(), real.size(), real) == 0) {
      tok.resize(tok.size() - real.size());
    } else if (tok.size() > virt.size() &&
               tok.compare(tok.size() - virt.size(), virt.size(), virt) == 0) {
      tok.resize(tok.size() - virt.size());
      prefix = "compute_";
    }
    if (tok.empty() || tok[0] < '0' || tok[0] > '9') {
      special = true;
      break;
    }
    out.push_back(prefix + tok);
  }
  if (special) {
    out.clear();
#ifdef __CUDA_ARCH_LIST__
    const std::string list = SET_KERNELS_STRINGIFY(__CUDA_ARCH_LIST__);  // e.g. "800,900"
    std::size_t pos = 0;
    while (pos <= list.size()) {
      std::size_t end = list.find(',', pos);
      if (end == std::string::npos) end = list.size();
      std::string tok = list.substr(pos, end - pos);
      pos = end + 1;
      tok.erase(std::remove(tok.begin(), tok.end(), ' '), tok.end());
      if (tok.size() >= 2) out.push_back("sm_" + tok.substr(0, tok.size() - 1));
    }
#endif
  }
  std::vector<std::string> unique;  // drop duplicates, keep the configured order
  for (const std::string& a : out) {
    if (std::find(unique.begin(), unique.end(), a) == unique.end()) unique.push_back(a);
  }
  return unique;
}

}  // namespace set_kernels
