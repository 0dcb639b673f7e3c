"""Index arithmetic past 2**31 elements, without allocating that much.

* W past 2**31 elements: a block-sparse W only stores its live blocks, so the real numba kernels
  run on a 65536 x 65536 W (2**32 elements) and on a 2**23 x 2**23 W whose block grid itself
  has 2**32 blocks, with live blocks in the far corners, against a float64 reference built
  from the blocks alone.
* x past 2**31 elements: shapes, checks and fake implementations on the meta device.
* The numba kernels: their typed IR shows every integer they compute with is 64-bit (only the
  int32 values loaded from the layout index are narrower), so no offset can wrap.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import set_kernels as sk
from conftest import gen, randn

BSL = sk.BlockSparseLayout
BIG = 2**31


def corner_layout(rows, cols, b):
    """Live blocks in the four corners, the middle and one off-diagonal spot, via from_csr."""
    n_rows, n_cols = -(-rows // b), -(-cols // b)
    spots = sorted({(0, 0), (0, n_cols - 1), (n_rows // 2, n_cols // 3), (n_rows // 2, n_cols - 2),
                    (n_rows - 1, 0), (n_rows - 1, n_cols - 1)})
    counts = torch.zeros(n_rows, dtype=torch.int64)
    for r, _ in spots:
        counts[r] += 1
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    col_idx = torch.tensor([c for _, c in spots], dtype=torch.int64)
    return BSL.from_csr(row_ptr, col_idx, b, (rows, cols)), spots


def blockwise_ref(x, values, spots, rows, cols, b, dy):
    """float64 y, dx and dvalues from the live blocks alone (no dense W)."""
    x64, dy64, v64 = x.double(), dy.double(), values.double()
    y = torch.zeros(x.shape[0], rows, dtype=torch.float64)
    dx = torch.zeros(x.shape[0], cols, dtype=torch.float64)
    dv = torch.zeros_like(v64)
    for k, (r, c) in enumerate(spots):
        r0, c0 = r * b, c * b
        rn, cn = min(b, rows - r0), min(b, cols - c0)
        blk = v64[k, :rn, :cn]
        y[:, r0:r0 + rn] += x64[:, c0:c0 + cn] @ blk.T
        dx[:, c0:c0 + cn] += dy64[:, r0:r0 + rn] @ blk
        dv[k, :rn, :cn] = dy64[:, r0:r0 + rn].T @ x64[:, c0:c0 + cn]
    return y, dx, dv


@pytest.mark.parametrize("rows,cols,b,m", [
    (65536, 65536, 128, 3),          # W: 2**32 elements, 512 x 512 blocks
    (65536 + 5, 2**16 + 77, 64, 2),  # partial edge blocks, W past 2**32
    (2**23, 2**23, 128, 1),          # a 65536 x 65536 block grid: 2**32 blocks, W 2**46 elements
])
def test_numba_kernels_on_w_past_2_31(rows, cols, b, m):
    assert rows * cols > BIG
    layout, spots = corner_layout(rows, cols, b)
    x = randn(m, cols, seed=1).requires_grad_()
    values = randn(len(spots), b, b, seed=2).requires_grad_()
    dy = randn(m, rows, seed=3)
    y = sk.ops.block_sparse_linear(x, values, layout, backend="numba")
    y.backward(dy)
    y_ref, dx_ref, dv_ref = blockwise_ref(x.detach(), values.detach(), spots, rows, cols, b, dy)
    for got, want, what in ((y, y_ref, "y"), (x.grad, dx_ref, "dx"), (values.grad, dv_ref, "dvalues")):
        err = (got.detach().double() - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), f"{what}: error {err:.3e}"
    # The transposed index agrees with the CSR on the huge grid.
    n_rows, n_cols = layout.grid
    assert layout.col_ptr[-1].item() == len(spots) and layout.col_ptr.numel() == n_cols + 1
    assert sorted(zip(layout.row_idx.tolist(), [layout.col_idx[p].item() for p in layout.perm.tolist()])) \
        == spots


def test_from_csr_ordering_check_on_a_2_32_block_grid():
    """Block keys r * C + c exceed 2**31 here: the sortedness check must not wrap."""
    rows = cols = 2**23  # 65536 x 65536 blocks of 128
    n = 65536
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[n] = 2
    row_ptr[n - 1] = 0  # both blocks in the last block row
    with pytest.raises(ValueError, match="ascending"):
        BSL.from_csr(row_ptr, torch.tensor([n - 1, 3]), 128, (rows, cols))
    layout = BSL.from_csr(row_ptr, torch.tensor([3, n - 1]), 128, (rows, cols))
    assert layout.block_row.tolist() == [n - 1, n - 1]
    # int32 input tensors as well (converted to int64 before any product).
    layout32 = BSL.from_csr(row_ptr.int(), torch.tensor([3, n - 1], dtype=torch.int32), 128, (rows, cols))
    assert layout32 == layout


def test_layout_refuses_grids_past_the_int32_index():
    with pytest.raises(ValueError, match="int32"):
        BSL(torch.zeros(2**31 + 1, dtype=torch.int64, device="meta"), torch.zeros(0, dtype=torch.int64,
            device="meta"), (2**31 * 16, 16), 16)


def test_meta_device_shapes_past_2_31():
    """x with 2**32 elements and W with 2**36: the checks, fake kernels and layers on meta."""
    layout = BSL.random(2**16, 2**20, 128, 0.01, generator=gen(0)).to("meta")
    x = torch.empty(2**12, 2**20, device="meta")  # 2**32 elements
    assert x.numel() > BIG
    values = torch.empty(layout.nnz_blocks, 128, 128, device="meta", requires_grad=True)
    y = sk.ops.block_sparse_linear(x, values, layout)
    assert y.shape == (2**12, 2**16) and y.device.type == "meta"
    y.sum().backward()
    assert values.grad.shape == values.shape
    assert sk.ops.to_dense(values, layout).shape == (2**16, 2**20)
    lin = sk.nn.SparseLinear(2**20, 2**16, density=0.01, block_size=128, device="meta")
    assert lin(torch.empty(4, 2**10, 2**20, device="meta")).shape == (4, 2**10, 2**16)


def test_fake_tensor_mode_past_2_31():
    """The custom ops' fake implementations under FakeTensorMode (what torch.compile traces with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = BSL.random(2**16, 2**20, 128, 0.001, generator=gen(0))
    rows, cols = real.shape
    with FakeTensorMode() as mode:
        index = mode.from_tensor(real.index)
        x = torch.empty(2**13, cols)
        values = torch.empty(real.nnz_blocks, 128, 128)
        ops = torch.ops.set_kernels
        assert ops.linear_forward(x, values, index, None, rows, cols, 128).shape == (2**13, rows)
        assert ops.linear_grad_input(torch.empty(2**13, rows), values, index, rows, cols, 128).shape == x.shape
        assert ops.linear_grad_weight(torch.empty(2**13, rows), x, index, rows, cols, 128).shape == values.shape


# ------------------------------------------------------------------- numba integer widths
# Source files whose 32-bit arithmetic is by design and holds no offset: the dropout mask's hash
# (inlined into the element forward's ReLU + dropout epilogue) works in 32-bit lanes.
_HASH_SOURCES = ("dropout.py",)


def _narrow_integer_values(pyfunc, argtypes) -> list[str]:
    """Integer variables narrower than 64 bits that are computed (not loaded from an array),
    outside ``_HASH_SOURCES``."""
    from numba import njit, types
    from numba.core import ir

    disp = njit(fastmath=True)(pyfunc)  # serial compile: the same scalar typing as prange
    disp.compile(tuple(argtypes))
    annotation = disp.overloads[tuple(argtypes)].type_annotation
    typemap = annotation.typemap
    narrow = []
    for block in annotation.blocks.values():
        for stmt in block.body:
            if not isinstance(stmt, ir.Assign):
                continue
            ty = typemap.get(stmt.target.name)
            if not (isinstance(ty, types.Integer) and ty.bitwidth < 64):
                continue
            value = stmt.value
            loaded = isinstance(value, ir.Expr) and value.op in ("getitem", "static_getitem")
            copied = isinstance(value, (ir.Var, ir.Arg))
            if not (loaded or copied) and not (stmt.loc.filename or "").endswith(_HASH_SOURCES):
                narrow.append(f"line {stmt.loc.line}: {stmt.target.name} = {value} ({ty})")
    return narrow


def _numba_signatures():
    from numba import types

    from set_kernels.backends import numba as nb

    bsmm, adam, _, spmm, _ = nb._load()
    arr = lambda dt, nd: types.Array(dt, nd, "C")  # noqa: E731
    f32, i64, boolean = types.float32, types.int64, types.boolean
    idx = arr(types.int32, 1)
    return [
        (bsmm._to_blocks, (arr(f32, 2), i64, i64, arr(f32, 3))),
        (bsmm._to_blocks_t, (arr(f32, 2), i64, i64, arr(f32, 3))),
        (bsmm._forward_core, (arr(f32, 3), arr(f32, 3), idx, idx, idx, boolean, boolean, arr(f32, 1), boolean,
                          arr(f32, 2), i64, i64, i64, i64, i64, i64)),
        (bsmm._grad_weight_core, (arr(f32, 3), arr(f32, 3), idx, idx, arr(f32, 3), i64, i64, i64, i64)),
        (adam.masked_adam_, (arr(f32, 1),) * 4 + (arr(types.uint8, 1), boolean, arr(f32, 1), boolean, boolean, i64)),
        # element sparsity (block size 1)
        (spmm.transpose, (arr(f32, 2), arr(f32, 2))),
        (spmm._spmm_t, (arr(f32, 2), i64, arr(f32, 1), idx, idx, idx, boolean, arr(f32, 1), boolean, arr(f32, 2),
                        i64, arr(i64, 1), types.float64, boolean)),
        (spmm._sddmm_t, (arr(f32, 2), arr(f32, 2), i64, idx, idx, arr(f32, 1), i64)),
        (spmm._backward_t, (arr(f32, 2), arr(f32, 2), i64, arr(f32, 1), idx, idx, idx, arr(f32, 2), arr(f32, 1),
                            i64, boolean)),
        (spmm._spmm_long, (arr(f32, 2), i64, arr(f32, 1), idx, idx, arr(f32, 1), boolean, arr(f32, 2), i64, i64,
                           arr(i64, 1), types.float64)),
        (spmm.transpose_act_grad, (arr(f32, 2), arr(f32, 2), types.float64, arr(f32, 2), arr(f32, 1))),
        (spmm.act_grad_tm, (arr(f32, 2), arr(f32, 2), i64, types.float64, arr(f32, 1))),
        (spmm.readout_forward_t, (arr(f32, 2), i64, arr(f32, 2), arr(f32, 1), boolean, arr(f32, 2), arr(f32, 3))),
        (spmm.readout_backward_t, (arr(f32, 2), arr(f32, 2), i64, arr(f32, 2), types.float64, arr(f32, 2),
                                   arr(f32, 2), boolean, arr(f32, 1))),
    ]


@pytest.mark.parametrize("case", range(14), ids=["to_blocks", "to_blocks_t", "forward_core", "grad_weight_core", "adam",
                                                 "transpose", "spmm_t", "sddmm_t", "backward_t", "spmm_long",
                                                 "transpose_act_grad", "act_grad_tm", "readout_forward_t",
                                                 "readout_backward_t"])
def test_numba_kernels_compute_offsets_in_64_bit(case):
    fn, sig = _numba_signatures()[case]
    narrow = _narrow_integer_values(fn.py_func, sig)
    assert not narrow, "\n".join(narrow)


def test_integer_width_audit_catches_int32_arithmetic():
    """The audit is not vacuous: an explicit int32 offset is reported."""
    from numba import types

    def narrow_offset(a, out):
        k = np.int32(a[0]) * np.int32(a[1])
        out[0] = k
        return np.int32(k + np.int32(1))

    arr = types.Array(types.int32, 1, "C")
    found = _narrow_integer_values(narrow_offset, (arr, arr))
    assert found, "the audit missed an explicit int32 computation"
