// pybind11 bindings of set_kernels._C.  Bindings only: the kernels live in
// csrc/.  Tensors cross this boundary as integers (data pointers, sizes, a
// dtype code, the CUDA stream), so the module does not include or link
// libtorch and imports on machines without a GPU or CUDA driver.
//
// set_kernels.ops validates shapes, dtypes and devices before calling in; the
// checks here (checks.h) only reject raw arguments a kernel cannot run with,
// before the CUDA device check, so they can be tested without a GPU.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "checks.h"
#include "masked_adam.h"

namespace py = pybind11;

void bind_bsmm(py::module_& m);  // python/src/bsmm.cc

namespace {

using set_kernels::binding::ArgChecker;
using set_kernels::binding::as_ptr;
using PtrList = std::vector<std::int64_t>;

void masked_adam_(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                  const PtrList& exp_avg_sqs, const PtrList& masks,
                  const std::vector<std::int64_t>& numels, int dtype, std::int64_t step, double lr,
                  double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                  std::int64_t grad_scale_ptr, std::int64_t found_inf_ptr, std::int64_t stream,
                  int device) {
  const ArgChecker ck("masked_adam_");
  ck.dtype(dtype);
  for (std::size_t i = 0; i < numels.size(); ++i) ck.at_least("numels[" + std::to_string(i) + "]", numels[i], 0);
  ck.pointers("params", params, numels, false);
  ck.pointers("grads", grads, numels, false);
  ck.pointers("exp_avgs", exp_avgs, numels, false);
  ck.pointers("exp_avg_sqs", exp_avg_sqs, numels, false);
  ck.pointers("masks", masks, numels, true);
  ck.at_least("step", step, 1);
  ck.pointer("grad_scale_ptr", grad_scale_ptr, false);
  ck.pointer("found_inf_ptr", found_inf_ptr, false);
  ck.stream_and_device(stream, device);

  std::vector<set_kernels::AdamTensor> tensors(numels.size());
  for (std::size_t i = 0; i < numels.size(); ++i) {
    set_kernels::AdamTensor& t = tensors[i];
    t.param = as_ptr<void>(params[i]);
    t.grad = as_ptr<const void>(grads[i]);
    t.exp_avg = as_ptr<float>(exp_avgs[i]);
    t.exp_avg_sq = as_ptr<float>(exp_avg_sqs[i]);
    t.mask = as_ptr<const std::uint8_t>(masks[i]);
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
  hp.grad_scale = as_ptr<const float>(grad_scale_ptr);
  hp.found_inf = as_ptr<const float>(found_inf_ptr);

  // Launches are asynchronous; no Python objects are touched past this point.
  py::gil_scoped_release release;
  set_kernels::masked_adam_(tensors, dtype, hp, static_cast<std::uintptr_t>(stream), device);
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

  m.def("masked_adam_", &masked_adam_, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
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
