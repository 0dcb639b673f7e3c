// pybind11 bindings of set_kernels._C.  Bindings only: the kernels live in
// csrc/.  Tensors cross this boundary as integers (data pointers, sizes, a
// dtype code, the CUDA stream), so the module does not include or link
// libtorch and imports on machines without a GPU or CUDA driver.
//
// Python (set_kernels/backends/cuda) validates shapes, dtypes and devices
// before calling in; the checks here only reject clearly bad arguments, and
// they run before the CUDA device check so they can be tested without a GPU.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "masked_adam.h"

namespace py = pybind11;

void bind_bsmm(py::module_& m);  // python/src/bsmm.cc

namespace {

using PtrList = std::vector<std::int64_t>;

[[noreturn]] void bad_arg(const std::string& fn, const std::string& msg) {
  throw py::value_error("set_kernels._C." + fn + ": " + msg);
}

// Checks a list of data pointers: same length as `numels`, non-negative, and
// non-null for non-empty tensors unless `nullable` (masks: 0 = no mask).
void check_pointers(const char* fn, const char* name, const PtrList& ptrs,
                    const std::vector<std::int64_t>& numels, bool nullable) {
  if (ptrs.size() != numels.size()) {
    bad_arg(fn, "len(" + std::string(name) + ")=" + std::to_string(ptrs.size()) +
                    " does not match len(numels)=" + std::to_string(numels.size()));
  }
  for (std::size_t i = 0; i < ptrs.size(); ++i) {
    const std::string where = std::string(name) + "[" + std::to_string(i) + "]";
    if (ptrs[i] < 0) bad_arg(fn, where + " is a negative pointer (" + std::to_string(ptrs[i]) + ")");
    if (ptrs[i] == 0 && !nullable && numels[i] > 0) {
      bad_arg(fn, where + " is a null pointer for a tensor with numel=" +
                      std::to_string(numels[i]));
    }
  }
}

void check_optional_pointer(const char* fn, const char* name, std::int64_t ptr) {
  if (ptr < 0) bad_arg(fn, std::string(name) + " is a negative pointer (" + std::to_string(ptr) + ")");
}

void masked_adam(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                 const PtrList& exp_avg_sqs, const PtrList& masks,
                 const std::vector<std::int64_t>& numels, int dtype, std::int64_t step, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                 std::int64_t grad_scale_ptr, std::int64_t found_inf_ptr, std::int64_t stream,
                 int device) {
  const char* fn = "masked_adam";
  if (!set_kernels::dtype_is_valid(dtype)) {
    bad_arg(fn, "unknown dtype code " + std::to_string(dtype) +
                    " for argument 'dtype' (expected DTYPE_FLOAT32=0, DTYPE_FLOAT16=1 or "
                    "DTYPE_BFLOAT16=2)");
  }
  for (std::size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] < 0) {
      bad_arg(fn, "numels[" + std::to_string(i) + "]=" + std::to_string(numels[i]) +
                      " is negative");
    }
  }
  check_pointers(fn, "params", params, numels, false);
  check_pointers(fn, "grads", grads, numels, false);
  check_pointers(fn, "exp_avgs", exp_avgs, numels, false);
  check_pointers(fn, "exp_avg_sqs", exp_avg_sqs, numels, false);
  check_pointers(fn, "masks", masks, numels, true);
  if (step < 1) bad_arg(fn, "step must be >= 1, got " + std::to_string(step));
  check_optional_pointer(fn, "grad_scale_ptr", grad_scale_ptr);
  check_optional_pointer(fn, "found_inf_ptr", found_inf_ptr);
  if (stream < 0) bad_arg(fn, "stream is negative (" + std::to_string(stream) + ")");
  if (device < -1) {
    bad_arg(fn, "device=" + std::to_string(device) + " is invalid (expected >= 0, or -1 for current)");
  }

  std::vector<set_kernels::AdamTensor> tensors(numels.size());
  for (std::size_t i = 0; i < numels.size(); ++i) {
    set_kernels::AdamTensor& t = tensors[i];
    t.param = reinterpret_cast<void*>(static_cast<std::uintptr_t>(params[i]));
    t.grad = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(grads[i]));
    t.exp_avg = reinterpret_cast<float*>(static_cast<std::uintptr_t>(exp_avgs[i]));
    t.exp_avg_sq = reinterpret_cast<float*>(static_cast<std::uintptr_t>(exp_avg_sqs[i]));
    t.mask = reinterpret_cast<const std::uint8_t*>(static_cast<std::uintptr_t>(masks[i]));
    t.numel = numels[i];
  }
  set_kernels::AdamHyperParams hp;
  hp.step = step;
  hp.lr = lr;
  hp.beta1 = beta1;
  hp.beta2 = beta2;
  hp.eps = eps;
  hp.weight_decay = weight_decay;
  hp.decoupled = decoupled;
  hp.grad_scale = reinterpret_cast<const float*>(static_cast<std::uintptr_t>(grad_scale_ptr));
  hp.found_inf = reinterpret_cast<const float*>(static_cast<std::uintptr_t>(found_inf_ptr));

  // Launches are asynchronous; no Python objects are touched past this point.
  py::gil_scoped_release release;
  set_kernels::masked_adam(tensors, dtype, hp, static_cast<std::uintptr_t>(stream), device);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "set_kernels CUDA kernels (pybind11; tensors are passed as data pointers, "
      "no libtorch dependency).";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(set_kernels::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(set_kernels::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(set_kernels::kBFloat16);

  m.def("cuda_device_count", &set_kernels::cuda_device_count,
        "Number of visible CUDA devices; 0 when there is no device or driver (never raises).");
  m.def("cuda_device_error", &set_kernels::cuda_device_error,
        "Empty string when a CUDA device is usable, otherwise why not (never raises).");
  m.def("cuda_runtime_version", &set_kernels::cuda_runtime_version,
        "CUDA runtime version compiled in (statically linked), e.g. 13000 for 13.0.");
  m.def("cuda_driver_version", &set_kernels::cuda_driver_version,
        "CUDA version supported by the installed driver, e.g. 13000; 0 without a driver.");
  m.def("compiled_archs", &set_kernels::compiled_archs,
        "GPU architectures compiled into this module, e.g. ['sm_80', 'sm_90'].");

  bind_bsmm(m);

  m.def("masked_adam", &masked_adam, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("masks"), py::arg("numels"), py::arg("dtype"),
        py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"), py::arg("grad_scale_ptr") = 0,
        py::arg("found_inf_ptr") = 0, py::arg("stream") = 0, py::arg("device") = -1,
        R"doc(In-place masked Adam/AdamW step on CUDA tensors given as data pointers.

params, grads: pointers to tensors of the element type `dtype` (DTYPE_*);
exp_avgs, exp_avg_sqs: fp32; masks: bool (1 byte) or 0 for no mask;
numels: element count of each tensor. Math in fp32, as torch.optim.Adam
(decoupled=False) or AdamW (decoupled=True); where the mask is false,
param, exp_avg and exp_avg_sq are set to 0. grad_scale_ptr / found_inf_ptr:
optional fp32 device scalars (0 = none); if *found_inf != 0 nothing changes.
stream: cudaStream_t as an integer (0 = default stream); device: CUDA device
index made current for the call (-1 = current). Asynchronous.
Raises ValueError for bad arguments, RuntimeError for CUDA errors or when
no CUDA device is available.)doc");
}
