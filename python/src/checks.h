// Argument checks of the set_kernels._C bindings: the one place where the raw arguments of a
// kernel (integers standing for pointers, sizes, strides, a dtype code) are checked, before any
// CUDA call, so the checks can be tested without a GPU.  The Python backends pass arguments that
// set_kernels.ops already validated; these checks guard what the kernels would otherwise read
// out of bounds, and fail with ValueError("set_kernels._C.<op>: <argument> ...").
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "masked_adam.h"  // dtype_is_valid

namespace set_kernels {
namespace binding {

class ArgChecker {
 public:
  using i64 = std::int64_t;
  explicit ArgChecker(const char* op) : op_(op) {}

  [[noreturn]] void fail(const std::string& msg) const {
    throw pybind11::value_error("set_kernels._C." + std::string(op_) + ": " + msg);
  }
  void dtype(int code) const {
    if (!dtype_is_valid(code)) {
      fail("unknown dtype code " + std::to_string(code) +
           " for argument 'dtype' (expected DTYPE_FLOAT32=0, DTYPE_FLOAT16=1 or DTYPE_BFLOAT16=2)");
    }
  }
  void at_least(const std::string& name, i64 value, i64 minimum) const {
    if (value < minimum) {
      fail(name + "=" + std::to_string(value) +
           (minimum == 0 ? " is negative" : " must be >= " + std::to_string(minimum)));
    }
  }
  // A data pointer: never negative; non-null when `required` (a non-empty tensor).
  void pointer(const std::string& name, i64 ptr, bool required) const {
    if (ptr < 0) fail(name + " is a negative pointer (" + std::to_string(ptr) + ")");
    if (ptr == 0 && required) fail(name + " is a null pointer for a non-empty tensor");
  }
  // One pointer a tensor, as long as `numels`; null only for empty tensors unless `nullable`.
  void pointers(const char* name, const std::vector<i64>& ptrs, const std::vector<i64>& numels,
                bool nullable) const {
    if (ptrs.size() != numels.size()) {
      fail("len(" + std::string(name) + ")=" + std::to_string(ptrs.size()) +
           " does not match len(numels)=" + std::to_string(numels.size()));
    }
    for (std::size_t i = 0; i < ptrs.size(); ++i) {
      pointer(std::string(name) + "[" + std::to_string(i) + "]", ptrs[i], !nullable && numels[i] > 0);
    }
  }
  void stream_and_device(i64 stream, int device) const {
    if (stream < 0) fail("stream is negative (" + std::to_string(stream) + ")");
    if (device < -1) fail("device=" + std::to_string(device) + " is invalid (expected >= 0, or -1 for current)");
  }

 private:
  const char* op_;
};

template <typename P>
P* as_ptr(std::int64_t v) {
  return reinterpret_cast<P*>(static_cast<std::uintptr_t>(v));
}

}  // namespace binding
}  // namespace set_kernels
