// pybind11 bindings of the block-sparse matmuls (csrc/bsmm.h): linear_forward,
// linear_grad_input, linear_grad_weight and the split-K helpers.
//
// Every argument is checked here, before any CUDA call, so that the checks can be
// tested on machines without a GPU: unknown dtype code, unsupported block size,
// negative or zero-where-invalid sizes, row strides narrower than the rows,
// negative pointers, null pointers of non-empty tensors, workspace too small.
// Failures raise ValueError("set_kernels._C.<op>: <argument> ...").

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bsmm.h"
#include "masked_adam.h"  // DType codes

namespace py = pybind11;

namespace {

using i64 = std::int64_t;

class Checker {
 public:
  explicit Checker(const char* op) : op_(op) {}

  [[noreturn]] void fail(const std::string& msg) const {
    throw py::value_error("set_kernels._C." + std::string(op_) + ": " + msg);
  }
  void dtype(int code) const {
    if (!set_kernels::dtype_is_valid(code)) {
      fail("unknown dtype code " + std::to_string(code) +
           " for argument 'dtype' (expected DTYPE_FLOAT32=0, DTYPE_FLOAT16=1 or DTYPE_BFLOAT16=2)");
    }
  }
  void block(int b) const {
    if (!set_kernels::bsmm_block_is_valid(b)) {
      fail("block_size=" + std::to_string(b) + " is not supported (expected 16, 32, 64 or 128)");
    }
  }
  void at_least(const char* name, i64 value, i64 minimum) const {
    if (value < minimum) {
      fail(std::string(name) + "=" + std::to_string(value) +
           (minimum == 0 ? " is negative" : " must be >= " + std::to_string(minimum)));
    }
  }
  // A data pointer: never negative; non-null when the tensor is non-empty.
  void pointer(const char* name, i64 ptr, bool required) const {
    if (ptr < 0) fail(std::string(name) + " is a negative pointer (" + std::to_string(ptr) + ")");
    if (ptr == 0 && required) fail(std::string(name) + " is a null pointer for a non-empty tensor");
  }
  void stream_and_device(i64 stream, int device) const {
    if (stream < 0) fail("stream is negative (" + std::to_string(stream) + ")");
    if (device < -1) fail("device=" + std::to_string(device) + " is invalid (expected >= 0, or -1 for current)");
  }

 private:
  const char* op_;
};

template <typename P>
P* as_ptr(i64 v) {
  return reinterpret_cast<P*>(static_cast<std::uintptr_t>(v));
}

i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// Shared checks of dsd / dds. `a_width` is the width of the dense input, `o_width` of the output.
void check_dsd_like(const Checker& ck, const char* a_name, i64 a, i64 lda, const char* lda_name,
                    i64 values, const char* ptr_name, i64 ptr, const char* idx_name, i64 idx,
                    const char* out_name, i64 out, i64 ldo, const char* ldo_name, i64 M, i64 rows,
                    i64 cols, i64 nnz, int block, int dtype, bool dds) {
  ck.dtype(dtype);
  ck.block(block);
  ck.at_least("M", M, 0);
  ck.at_least("rows", rows, 1);
  ck.at_least("cols", cols, 1);
  ck.at_least("nnz", nnz, 0);
  const i64 max_blocks = ceil_div(rows, block) * ceil_div(cols, block);
  if (nnz > max_blocks) {
    ck.fail("nnz=" + std::to_string(nnz) + " exceeds the " + std::to_string(max_blocks) +
            " blocks of a " + std::to_string(rows) + " x " + std::to_string(cols) + " matrix with block_size " +
            std::to_string(block));
  }
  const i64 a_width = dds ? rows : cols;
  const i64 o_width = dds ? cols : rows;
  if (lda < a_width) {
    ck.fail(std::string(lda_name) + "=" + std::to_string(lda) + " is smaller than the row width " +
            std::to_string(a_width) + " of " + a_name);
  }
  if (ldo < o_width) {
    ck.fail(std::string(ldo_name) + "=" + std::to_string(ldo) + " is smaller than the row width " +
            std::to_string(o_width) + " of " + out_name);
  }
  ck.pointer(a_name, a, M > 0);
  ck.pointer("values", values, nnz > 0 && M > 0);
  ck.pointer(ptr_name, ptr, M > 0);
  ck.pointer(idx_name, idx, nnz > 0 && M > 0);
  ck.pointer(out_name, out, M > 0);
}

void linear_forward(i64 x, i64 ldx, i64 values, i64 row_ptr, i64 col_idx, i64 bias, i64 y, i64 ldy, i64 M,
              i64 rows, i64 cols, i64 nnz, int block_size, int dtype, bool tf32, i64 stream, int device) {
  const Checker ck("linear_forward");
  check_dsd_like(ck, "x", x, ldx, "ldx", values, "row_ptr", row_ptr, "col_idx", col_idx, "y", y, ldy, "ldy",
                 M, rows, cols, nnz, block_size, dtype, false);
  ck.pointer("bias", bias, false);
  ck.stream_and_device(stream, device);

  set_kernels::BsmmDsdArgs a;
  a.a = as_ptr<const void>(x);
  a.lda = ldx;
  a.values = as_ptr<const void>(values);
  a.ptr = as_ptr<const std::int32_t>(row_ptr);
  a.idx = as_ptr<const std::int32_t>(col_idx);
  a.bias = as_ptr<const void>(bias);
  a.out = as_ptr<void>(y);
  a.ldo = ldy;
  a.M = M;
  a.rows = rows;
  a.cols = cols;
  a.nnz = nnz;
  a.block = block_size;
  a.dtype = dtype;
  a.tf32 = tf32;
  py::gil_scoped_release release;
  set_kernels::linear_forward(a, static_cast<std::uintptr_t>(stream), device);
}

void linear_grad_input(i64 dy, i64 lddy, i64 values, i64 col_ptr, i64 row_idx, i64 perm, i64 dx, i64 lddx, i64 M,
              i64 rows, i64 cols, i64 nnz, int block_size, int dtype, bool tf32, i64 stream, int device) {
  const Checker ck("linear_grad_input");
  check_dsd_like(ck, "dy", dy, lddy, "lddy", values, "col_ptr", col_ptr, "row_idx", row_idx, "dx", dx, lddx,
                 "lddx", M, rows, cols, nnz, block_size, dtype, true);
  ck.pointer("perm", perm, nnz > 0 && M > 0);
  ck.stream_and_device(stream, device);

  set_kernels::BsmmDsdArgs a;
  a.a = as_ptr<const void>(dy);
  a.lda = lddy;
  a.values = as_ptr<const void>(values);
  a.ptr = as_ptr<const std::int32_t>(col_ptr);
  a.idx = as_ptr<const std::int32_t>(row_idx);
  a.perm = as_ptr<const std::int32_t>(perm);
  a.out = as_ptr<void>(dx);
  a.ldo = lddx;
  a.M = M;
  a.rows = rows;
  a.cols = cols;
  a.nnz = nnz;
  a.block = block_size;
  a.dtype = dtype;
  a.tf32 = tf32;
  py::gil_scoped_release release;
  set_kernels::linear_grad_input(a, static_cast<std::uintptr_t>(stream), device);
}

void linear_grad_weight(i64 dy, i64 lddy, i64 x, i64 ldx, i64 block_row, i64 col_idx, i64 out, i64 workspace,
              i64 workspace_numel, i64 M, i64 rows, i64 cols, i64 nnz, int block_size, int dtype, int splits,
              bool tf32, i64 stream, int device) {
  const Checker ck("linear_grad_weight");
  ck.dtype(dtype);
  ck.block(block_size);
  ck.at_least("M", M, 0);
  ck.at_least("rows", rows, 1);
  ck.at_least("cols", cols, 1);
  ck.at_least("nnz", nnz, 0);
  const i64 max_blocks = ceil_div(rows, block_size) * ceil_div(cols, block_size);
  if (nnz > max_blocks) {
    ck.fail("nnz=" + std::to_string(nnz) + " exceeds the " + std::to_string(max_blocks) + " blocks of the matrix");
  }
  if (lddy < rows) ck.fail("lddy=" + std::to_string(lddy) + " is smaller than the row width " + std::to_string(rows) + " of dy");
  if (ldx < cols) ck.fail("ldx=" + std::to_string(ldx) + " is smaller than the row width " + std::to_string(cols) + " of x");
  if (splits < 1 || splits > set_kernels::kBsmmSddMaxSplits) {
    ck.fail("splits=" + std::to_string(splits) + " must be in [1, " +
            std::to_string(set_kernels::kBsmmSddMaxSplits) + "]");
  }
  ck.at_least("workspace_numel", workspace_numel, 0);
  const bool work = nnz > 0;
  ck.pointer("dy", dy, work && M > 0);
  ck.pointer("x", x, work && M > 0);
  ck.pointer("block_row", block_row, work);
  ck.pointer("col_idx", col_idx, work);
  ck.pointer("out", out, work);
  const i64 needed = splits > 1 && M > 0 ? set_kernels::linear_grad_weight_workspace_numel(splits, nnz, block_size) : 0;
  ck.pointer("workspace", workspace, needed > 0);
  if (workspace_numel < needed) {
    ck.fail("workspace_numel=" + std::to_string(workspace_numel) + " is smaller than the " +
            std::to_string(needed) + " fp32 elements needed for splits=" + std::to_string(splits));
  }
  ck.stream_and_device(stream, device);

  set_kernels::BsmmSddArgs a;
  a.dy = as_ptr<const void>(dy);
  a.lddy = lddy;
  a.x = as_ptr<const void>(x);
  a.ldx = ldx;
  a.block_row = as_ptr<const std::int32_t>(block_row);
  a.col_idx = as_ptr<const std::int32_t>(col_idx);
  a.out = as_ptr<void>(out);
  a.workspace = as_ptr<float>(workspace);
  a.workspace_numel = workspace_numel;
  a.M = M;
  a.rows = rows;
  a.cols = cols;
  a.nnz = nnz;
  a.block = block_size;
  a.dtype = dtype;
  a.tf32 = tf32;
  a.splits = splits;
  py::gil_scoped_release release;
  set_kernels::linear_grad_weight(a, static_cast<std::uintptr_t>(stream), device);
}

}  // namespace

void bind_bsmm(py::module_& m) {
  m.attr("BSMM_BLOCK_SIZES") = py::make_tuple(16, 32, 64, 128);
  m.attr("BSMM_SDD_MAX_SPLITS") = set_kernels::kBsmmSddMaxSplits;

  m.def("linear_forward", &linear_forward, py::arg("x"), py::arg("ldx"), py::arg("values"), py::arg("row_ptr"),
        py::arg("col_idx"), py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("M"), py::arg("rows"),
        py::arg("cols"), py::arg("nnz"), py::arg("block_size"), py::arg("dtype"), py::arg("tf32") = false,
        py::arg("stream") = 0, py::arg("device") = -1,
        R"doc(Forward y (M, rows) = x (M, cols) @ W.T + bias, W block-sparse (block CSR).

Pointers are data_ptr()s: x (M, cols) with row stride ldx; values (nnz, b, b)
contiguous; row_ptr int32 (ceil(rows/b)+1,), col_idx int32 (nnz,); bias (rows,)
or 0; y (M, rows) with row stride ldy. dtype: DTYPE_*; block_size 16/32/64/128.
tf32: fp32 only, one TF32 tensor-core pass instead of the 3xTF32 split.
stream: cudaStream_t as an integer; device: CUDA device index (-1 = current).
ValueError for bad arguments (before any CUDA call), RuntimeError for CUDA errors
or no device. Asynchronous.)doc");

  m.def("linear_grad_input", &linear_grad_input, py::arg("dy"), py::arg("lddy"), py::arg("values"), py::arg("col_ptr"),
        py::arg("row_idx"), py::arg("perm"), py::arg("dx"), py::arg("lddx"), py::arg("M"), py::arg("rows"),
        py::arg("cols"), py::arg("nnz"), py::arg("block_size"), py::arg("dtype"), py::arg("tf32") = false,
        py::arg("stream") = 0, py::arg("device") = -1,
        R"doc(Input gradient dx (M, cols) = dy (M, rows) @ W through the transposed (CSC) index.

col_ptr int32 (ceil(cols/b)+1,), row_idx and perm int32 (nnz,). No atomics: each
output block column is owned by one CTA column. Other arguments as linear_forward.)doc");

  m.def("linear_grad_weight", &linear_grad_weight, py::arg("dy"), py::arg("lddy"), py::arg("x"), py::arg("ldx"),
        py::arg("block_row"), py::arg("col_idx"), py::arg("out"), py::arg("workspace"),
        py::arg("workspace_numel"), py::arg("M"), py::arg("rows"), py::arg("cols"), py::arg("nnz"),
        py::arg("block_size"), py::arg("dtype"), py::arg("splits") = 1, py::arg("tf32") = false,
        py::arg("stream") = 0, py::arg("device") = -1,
        R"doc(Weight gradient on the live blocks: out (nnz, b, b), out[k] = dy[:, rows of k].T @ x[:, cols of k].

dy (M, rows) row stride lddy, x (M, cols) row stride ldx, block_row / col_idx int32
(nnz,), out contiguous. splits > 1 splits the tokens (split-K): fp32 partials go to
workspace (at least linear_grad_weight_workspace_numel(splits, nnz, block_size) floats), then
a second pass sums them in a fixed order (deterministic, no atomics). Entries past
the matrix edge are exact zeros.)doc");

  m.def("linear_grad_weight_splits", &set_kernels::linear_grad_weight_default_splits, py::arg("M"), py::arg("nnz"),
        py::arg("block_size"),
        "Default split-K factor of linear_grad_weight for this shape (a function of the shape only).");
  m.def("linear_grad_weight_workspace_numel", &set_kernels::linear_grad_weight_workspace_numel, py::arg("splits"),
        py::arg("nnz"), py::arg("block_size"),
        "fp32 elements of workspace linear_grad_weight needs for `splits` (0 when splits <= 1).");
}
