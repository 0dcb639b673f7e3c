// pybind11 bindings of the block-sparse matmuls (csrc/bsmm.h): linear_forward,
// linear_grad_input, linear_grad_weight and the split-K helpers.
//
// The raw arguments are checked here (checks.h), before any CUDA call, so that the checks can be
// tested on machines without a GPU: unknown dtype code, unsupported block size, negative or
// zero-where-invalid sizes, more blocks than the grid holds, row strides narrower than the rows,
// negative pointers, null pointers of non-empty tensors, splits out of range, workspace too
// small.  Failures raise ValueError("set_kernels._C.<op>: <argument> ...").

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bsmm.h"
#include "checks.h"

namespace py = pybind11;

namespace {

using i64 = std::int64_t;
using set_kernels::binding::ArgChecker;
using set_kernels::binding::as_ptr;

i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// The checks every matmul shares: dtype code, block size, sizes, nnz within the block grid.
set_kernels::MatmulShape check_shape(const ArgChecker& ck, i64 M, i64 rows, i64 cols, i64 nnz, int block,
                                     int dtype, bool tf32) {
  ck.dtype(dtype);
  if (!set_kernels::block_size_is_valid(block)) {
    ck.fail("block_size=" + std::to_string(block) + " is not supported (expected 16, 32, 64 or 128)");
  }
  ck.at_least("M", M, 0);
  ck.at_least("rows", rows, 1);
  ck.at_least("cols", cols, 1);
  ck.at_least("nnz", nnz, 0);
  const i64 max_blocks = ceil_div(rows, block) * ceil_div(cols, block);
  if (nnz > max_blocks) {
    ck.fail("nnz=" + std::to_string(nnz) + " exceeds the " + std::to_string(max_blocks) + " blocks of a " +
            std::to_string(rows) + " x " + std::to_string(cols) + " matrix with block_size " + std::to_string(block));
  }
  return set_kernels::MatmulShape{M, rows, cols, nnz, block, dtype, tf32};
}

// The row stride `ld` of the dense operand `of` must cover its `width`.
void check_row_stride(const ArgChecker& ck, const char* ld_name, i64 ld, i64 width, const char* of) {
  if (ld < width) {
    ck.fail(std::string(ld_name) + "=" + std::to_string(ld) + " is smaller than the row width " +
            std::to_string(width) + " of " + of);
  }
}

// Argument names of linear_forward / linear_grad_input, for the messages.
struct LinearNames {
  const char* op;
  const char* a;
  const char* lda;
  const char* ptr;
  const char* idx;
  const char* out;
  const char* ldo;
};

// linear_forward (grad_input false: perm 0) and linear_grad_input (bias 0): checks, then launches.
void run_linear(const LinearNames& n, bool grad_input, i64 a, i64 lda, i64 values, i64 ptr, i64 idx, i64 perm,
                i64 bias, i64 out, i64 ldo, i64 M, i64 rows, i64 cols, i64 nnz, int block_size, int dtype,
                bool tf32, i64 stream, int device) {
  const ArgChecker ck(n.op);
  set_kernels::LinearArgs args;
  args.shape = check_shape(ck, M, rows, cols, nnz, block_size, dtype, tf32);
  check_row_stride(ck, n.lda, lda, grad_input ? rows : cols, n.a);
  check_row_stride(ck, n.ldo, ldo, grad_input ? cols : rows, n.out);
  const bool work = M > 0, blocks = M > 0 && nnz > 0;
  ck.pointer(n.a, a, work);
  ck.pointer("values", values, blocks);
  ck.pointer(n.ptr, ptr, work);
  ck.pointer(n.idx, idx, blocks);
  ck.pointer(n.out, out, work);
  ck.pointer(grad_input ? "perm" : "bias", grad_input ? perm : bias, grad_input && blocks);
  ck.stream_and_device(stream, device);

  args.a = as_ptr<const void>(a);
  args.lda = lda;
  args.values = as_ptr<const void>(values);
  args.ptr = as_ptr<const std::int32_t>(ptr);
  args.idx = as_ptr<const std::int32_t>(idx);
  args.perm = as_ptr<const std::int32_t>(perm);
  args.bias = as_ptr<const void>(bias);
  args.out = as_ptr<void>(out);
  args.ldo = ldo;
  py::gil_scoped_release release;
  if (grad_input) {
    set_kernels::linear_grad_input(args, static_cast<std::uintptr_t>(stream), device);
  } else {
    set_kernels::linear_forward(args, static_cast<std::uintptr_t>(stream), device);
  }
}

void linear_forward(i64 x, i64 ldx, i64 values, i64 row_ptr, i64 col_idx, i64 bias, i64 y, i64 ldy, i64 M,
                    i64 rows, i64 cols, i64 nnz, int block_size, int dtype, bool tf32, i64 stream, int device) {
  run_linear({"linear_forward", "x", "ldx", "row_ptr", "col_idx", "y", "ldy"}, false, x, ldx, values, row_ptr,
             col_idx, 0, bias, y, ldy, M, rows, cols, nnz, block_size, dtype, tf32, stream, device);
}

void linear_grad_input(i64 dy, i64 lddy, i64 values, i64 col_ptr, i64 row_idx, i64 perm, i64 dx, i64 lddx, i64 M,
                       i64 rows, i64 cols, i64 nnz, int block_size, int dtype, bool tf32, i64 stream, int device) {
  run_linear({"linear_grad_input", "dy", "lddy", "col_ptr", "row_idx", "dx", "lddx"}, true, dy, lddy, values,
             col_ptr, row_idx, perm, 0, dx, lddx, M, rows, cols, nnz, block_size, dtype, tf32, stream, device);
}

void linear_grad_weight(i64 dy, i64 lddy, i64 x, i64 ldx, i64 block_row, i64 col_idx, i64 out, i64 workspace,
                        i64 workspace_numel, i64 M, i64 rows, i64 cols, i64 nnz, int block_size, int dtype,
                        int splits, bool tf32, i64 stream, int device) {
  const ArgChecker ck("linear_grad_weight");
  set_kernels::GradWeightArgs args;
  args.shape = check_shape(ck, M, rows, cols, nnz, block_size, dtype, tf32);
  check_row_stride(ck, "lddy", lddy, rows, "dy");
  check_row_stride(ck, "ldx", ldx, cols, "x");
  if (splits < 1 || splits > set_kernels::kGradWeightMaxSplits) {
    ck.fail("splits=" + std::to_string(splits) + " must be in [1, " +
            std::to_string(set_kernels::kGradWeightMaxSplits) + "]");
  }
  ck.at_least("workspace_numel", workspace_numel, 0);
  const bool work = nnz > 0;
  ck.pointer("dy", dy, work && M > 0);
  ck.pointer("x", x, work && M > 0);
  ck.pointer("block_row", block_row, work);
  ck.pointer("col_idx", col_idx, work);
  ck.pointer("out", out, work);
  const i64 needed = M > 0 ? set_kernels::linear_grad_weight_workspace_numel(splits, nnz, block_size) : 0;
  ck.pointer("workspace", workspace, needed > 0);
  if (workspace_numel < needed) {
    ck.fail("workspace_numel=" + std::to_string(workspace_numel) + " is smaller than the " +
            std::to_string(needed) + " fp32 elements needed for splits=" + std::to_string(splits));
  }
  ck.stream_and_device(stream, device);

  args.dy = as_ptr<const void>(dy);
  args.lddy = lddy;
  args.x = as_ptr<const void>(x);
  args.ldx = ldx;
  args.block_row = as_ptr<const std::int32_t>(block_row);
  args.col_idx = as_ptr<const std::int32_t>(col_idx);
  args.out = as_ptr<void>(out);
  args.workspace = as_ptr<float>(workspace);
  args.workspace_numel = workspace_numel;
  args.splits = splits;
  py::gil_scoped_release release;
  set_kernels::linear_grad_weight(args, static_cast<std::uintptr_t>(stream), device);
}

}  // namespace

void bind_bsmm(py::module_& m) {
  m.attr("BLOCK_SIZES") = py::make_tuple(16, 32, 64, 128);
  m.attr("GRAD_WEIGHT_MAX_SPLITS") = set_kernels::kGradWeightMaxSplits;

  m.def("linear_forward", &linear_forward, py::arg("x"), py::arg("ldx"), py::arg("values"), py::arg("row_ptr"),
        py::arg("col_idx"), py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("M"), py::arg("rows"),
        py::arg("cols"), py::arg("nnz"), py::arg("block_size"), py::arg("dtype"), py::arg("tf32") = false,
        py::arg("stream") = 0, py::arg("device") = -1,
        R"doc(Forward y (M, rows) = x (M, cols) @ W.T + bias, W block-sparse (block CSR).

Pointers are data_ptr()s: x (M, cols) with row stride ldx; values (nnz, b, b)
contiguous; row_ptr int32 (ceil(rows/b)+1,), col_idx int32 (nnz,); bias (rows,)
or 0; y (M, rows) with row stride ldy. dtype: DTYPE_*; block_size 16/32/64/128.
tf32: fp32 only, one TF32 tensor-core pass instead of the 3xTF32 split (the Python
backend sets it from torch's fp32 matmul precision, set_kernels/backends/_precision.py).
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
