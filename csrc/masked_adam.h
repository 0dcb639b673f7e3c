// Masked Adam/AdamW CUDA kernel: host-side interface.
//
// This header is plain C++17: it does not include cuda_runtime.h, pybind11 or
// torch, so the binding sources in python/src/ compile with the host compiler
// alone.  Everything is expressed with integers and raw pointers; the caller
// (the pybind11 binding, and above it the Python ops layer) is responsible for
// validating shapes, dtypes and devices.
//
// Errors are reported with C++ exceptions:
//   * std::invalid_argument for bad arguments (pybind11 maps it to ValueError);
//   * std::runtime_error for CUDA failures and missing devices (RuntimeError).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace set_kernels {

// Element type codes shared with Python (exported as _C.DTYPE_*).
enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

// Returns "float32", "float16", "bfloat16", or "" for an unknown code.
const char* dtype_name(int dtype) noexcept;
inline bool dtype_is_valid(int dtype) noexcept {
  return dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16;
}

// One tensor of the optimizer: raw device pointers, numel elements each.
// param and grad have the element type given by the dtype code; exp_avg and
// exp_avg_sq are fp32; mask is torch.bool storage (1 byte per element,
// nonzero = keep) or nullptr for no mask.
// Pointers may be null only when numel == 0.
struct AdamTensor {
  void* param = nullptr;
  const void* grad = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  const std::uint8_t* mask = nullptr;
  std::int64_t numel = 0;
};

// Scalar hyper-parameters, as received from Python (double precision; the
// bias corrections are computed on the host in double, the per-element math
// on the device in fp32).
struct AdamHyperParams {
  std::int64_t step = 1;  // >= 1
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = false;  // true: AdamW (p *= 1 - lr*wd); false: Adam L2 (g += wd*p)
  const float* grad_scale = nullptr;  // optional fp32 device scalar: g /= *grad_scale
  const float* found_inf = nullptr;   // optional fp32 device scalar: skip if != 0
};

// Applies one masked Adam/AdamW step to every tensor, in place, on `stream`
// (a cudaStream_t passed as an integer; 0 = legacy default stream) on CUDA
// device `device` (made current for the call and restored afterwards; -1 = the
// calling thread's current device).  Asynchronous: no host synchronisation.
//
// Checks that a CUDA device is available before touching any pointer, and
// checks every CUDA call and every kernel launch; throws std::runtime_error
// naming the kernel on failure.  Argument validation (dtype code, null
// pointers, sizes, step >= 1) is the caller's job (python/src/checks.h); an
// unknown dtype code still throws std::invalid_argument, after the device check.
void masked_adam_(const std::vector<AdamTensor>& tensors, int dtype,
                 const AdamHyperParams& hp, std::uintptr_t stream, int device = -1);

// ---- CUDA runtime helpers (never throw) -----------------------------------

// Number of visible CUDA devices; 0 when there is no device or no driver.
int cuda_device_count() noexcept;

// "" when at least one CUDA device is usable, otherwise a human-readable
// reason, e.g. "cudaGetDeviceCount: CUDA driver version is insufficient for
// CUDA runtime version (cudaErrorInsufficientDriver)".
std::string cuda_device_error() noexcept;

// CUDA runtime version this module was built against (e.g. 13000 for 13.0).
int cuda_runtime_version() noexcept;

// Version supported by the installed driver (e.g. 13000); 0 if no driver.
int cuda_driver_version() noexcept;

// GPU architectures compiled into this module, e.g. {"sm_80", "sm_90"};
// PTX-only entries are reported as "compute_XX".
std::vector<std::string> compiled_archs();

}  // namespace set_kernels
