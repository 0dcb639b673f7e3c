// CUDA runtime error handling shared by the launchers in csrc/ (host code only).
//
// Every CUDA runtime call of a launcher goes through check_cuda(), every kernel
// launch is followed by check_launch(); both throw std::runtime_error whose text
// starts with the op name ("set_kernels._C.<op>: ...") and names the failing call
// or kernel.  require_device() is called before any pointer is used, and
// DeviceGuard makes the requested device current for the duration of a call.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace set_kernels {

inline std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorString(err)) + " (" + cudaGetErrorName(err) + ")";
}

// Throws std::runtime_error "<op>: <what> failed: <error>" unless err == cudaSuccess.
inline void check_cuda(cudaError_t err, const char* op, const std::string& what) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so that later calls start clean
    throw std::runtime_error(std::string(op) + ": " + what + " failed: " + cuda_error_text(err));
  }
}

// After a <<<...>>> launch: a failed launch (bad configuration, no kernel image
// for this GPU, too many resources requested, ...) is reported by
// cudaGetLastError(); the error names the kernel.
inline void check_launch(const char* op, const std::string& kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": launch of " + kernel + " failed: " +
                             cuda_error_text(err));
  }
}

// Throws std::runtime_error "<op>: no CUDA device available (...)" when the
// runtime sees no device (no GPU, no driver, or a driver too old for this
// runtime); returns the number of devices otherwise.
inline int require_device(const char* op) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string(op) + ": no CUDA device available (cudaGetDeviceCount: " +
                             cuda_error_text(err) + ")");
  }
  if (count == 0) {
    throw std::runtime_error(std::string(op) +
                             ": no CUDA device available (cudaGetDeviceCount returned 0)");
  }
  return count;
}

// Makes `device` the current device of the calling thread until destruction,
// then restores the previous one.  device < 0 keeps the current device.
// Throws std::invalid_argument when device >= the number of devices.
class DeviceGuard {
 public:
  DeviceGuard(int device, int device_count, const char* op) {
    if (device >= device_count) {
      throw std::invalid_argument(std::string(op) + ": device=" + std::to_string(device) +
                                  " but only " + std::to_string(device_count) +
                                  " CUDA device(s) are visible");
    }
    check_cuda(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (device >= 0 && device != previous_) {
      check_cuda(cudaSetDevice(device), op, "cudaSetDevice(" + std::to_string(device) + ")");
      restore_ = true;
    }
    current_ = device >= 0 ? device : previous_;
  }
  ~DeviceGuard() {
    if (restore_) {
      if (cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  int device() const { return current_; }

 private:
  int previous_ = 0;
  int current_ = 0;
  bool restore_ = false;
};

}  // namespace set_kernels
