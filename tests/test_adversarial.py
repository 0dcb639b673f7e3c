"""Adversarial layouts and indices: every one gives a clear error before any kernel runs.

"Before any kernel runs" is shown, not assumed: every backend's kernel entry points are
replaced by a function that fails the test if called, and the bad input must still raise the
expected ValueError / TypeError naming the argument.
"""
from __future__ import annotations

import pytest
import torch

import set_kernels as sk
from set_kernels import backends
from conftest import REQUIRED_CPU_BACKENDS, assert_close_scaled, gen, linear_ref, randn

BSL = sk.BlockSparseLayout
OPS = torch.ops.set_kernels
KERNELS = ("linear_forward", "linear_grad_input", "linear_grad_weight", "masked_adam_")


@pytest.fixture
def no_kernel(monkeypatch):
    """Every kernel of every loadable backend (and the torch reference) fails the test if called."""
    called = []
    for name in backends.BACKENDS:
        mod = backends.load(name)
        if mod is None:
            continue
        for op in KERNELS + ("to_dense", "from_dense"):
            if callable(getattr(mod, op, None)):
                def trap(*args, _n=f"{name}.{op}", **kwargs):
                    called.append(_n)
                    raise AssertionError(f"kernel {_n} ran on a bad input")
                monkeypatch.setattr(mod, op, trap)
    yield called
    assert not called, called


def csr(row_ptr, col_idx, dtype=torch.int64):
    return torch.tensor(row_ptr, dtype=dtype), torch.tensor(col_idx, dtype=dtype)


# 3 x 4 block grid (b = 16, shape 40 x 60: partial edge blocks).
SHAPE, B = (40, 60), 16


# --------------------------------------------------------------------------------- from_csr
@pytest.mark.parametrize("row_ptr,col_idx,match", [
    ([0, 2, 3, 4], [2, 1, 0, 3], "ascending"),               # unsorted columns in row 0
    ([0, 2, 3, 4], [1, 1, 0, 3], "ascending|duplicate"),     # duplicate block in row 0
    ([0, 1, 2, 3], [0, -1, 2], r"\[0, 4\)"),                 # negative column
    ([0, 1, 2, 3], [0, 4, 2], r"\[0, 4\)"),                  # column == C
    ([0, 1, 2, 3], [0, 1 << 40, 2], r"\[0, 4\)"),            # far out of range (int64)
    ([0, 1, 3], [0, 1, 2], "length 4"),                      # row_ptr too short
    ([0, 1, 2, 3, 3], [0, 1, 2], "length 4"),                # row_ptr too long
    ([0, 2, 1, 3], [0, 1, 2], "non-decreasing"),             # non-monotone row_ptr
    ([1, 1, 2, 3], [0, 1, 2], "start at 0"),                 # does not start at 0
    ([0, 1, 2, 2], [0, 1, 2], "end at nnz"),                 # does not end at nnz
    ([0, 1, 2, 5], [0, 1, 2], "end at nnz"),                 # claims more blocks than given
])
def test_from_csr_rejects(row_ptr, col_idx, match, no_kernel):
    rp, ci = csr(row_ptr, col_idx)
    with pytest.raises(ValueError, match=match):
        BSL.from_csr(rp, ci, B, SHAPE)


@pytest.mark.parametrize("bad", ["float_row_ptr", "float_col_idx", "bool_col_idx", "list"])
def test_from_csr_rejects_types(bad, no_kernel):
    rp, ci = csr([0, 1, 2, 3], [0, 1, 2])
    if bad == "float_row_ptr":
        rp, name = rp.float(), "row_ptr"
    elif bad == "float_col_idx":
        ci, name = ci.double(), "col_idx"
    elif bad == "bool_col_idx":
        ci, name = ci.bool(), "col_idx"
    else:
        rp, name = [0, 1, 2, 3], "row_ptr"
    with pytest.raises(TypeError, match=name):
        BSL.from_csr(rp, ci, B, SHAPE)


def test_from_csr_rejects_2d_and_split_devices(no_kernel):
    rp, ci = csr([0, 1, 2, 3], [0, 1, 2])
    with pytest.raises(ValueError, match="row_ptr.*1-D"):
        BSL.from_csr(rp.reshape(1, -1), ci, B, SHAPE)
    with pytest.raises(ValueError, match="col_idx.*meta"):
        BSL.from_csr(rp, ci.to("meta"), B, SHAPE)
    with pytest.raises(ValueError, match="row_ptr.*meta"):
        BSL.from_csr(rp.to("meta"), ci.to("meta"), B, SHAPE)


@pytest.mark.parametrize("backend", REQUIRED_CPU_BACKENDS)
def test_empty_rows_and_columns_are_valid(backend, poison_alloc):
    """Block rows 0 and 2 empty, block column 1 empty: valid, and computed exactly."""
    for dtype in (torch.int32, torch.int64):
        layout = BSL.from_csr(*csr([0, 0, 3, 3], [0, 2, 3], dtype=dtype), B, SHAPE)
        assert layout.nnz_blocks == 3 and layout.block_mask().sum() == 3
        x = randn(2, 3, 60, seed=1, dtype=torch.float64).requires_grad_()
        values = randn(3, B, B, seed=2, dtype=torch.float64).requires_grad_()
        bias = randn(40, seed=3, dtype=torch.float64).requires_grad_()
        dy = randn(2, 3, 40, seed=4, dtype=torch.float64)
        y = sk.ops.block_sparse_linear(x, values, layout, bias, backend=backend)
        y.backward(dy)
        y_ref, dx_ref, dv_ref, db_ref = linear_ref(x, values, layout, bias, dy)
        for got, want, what in ((y, y_ref, "y"), (x.grad, dx_ref, "dx"), (values.grad, dv_ref, "dv"),
                                (bias.grad, db_ref, "dbias")):
            assert_close_scaled(got, want, 1e-11, what)


# ------------------------------------------------------------------ layout on another device
@pytest.mark.parametrize("backend", [None] + list(REQUIRED_CPU_BACKENDS))
def test_layout_on_another_device(backend, no_kernel):
    """A layout on another device (meta stands in for a GPU) and CPU tensors: ValueError first."""
    layout = BSL.random(*SHAPE, B, 0.5, generator=gen(0)).to("meta")
    x = randn(3, 60, seed=1)
    values = randn(layout.nnz_blocks, B, B, seed=2)
    with pytest.raises(ValueError, match="layout.*meta"):
        sk.ops.block_sparse_linear(x, values, layout, backend=backend)
    with pytest.raises(ValueError, match="layout.*meta"):
        sk.ops.to_dense(values, layout)
    with pytest.raises(ValueError, match="layout.*meta"):
        sk.ops.from_dense(randn(*SHAPE, seed=3), layout)


def test_module_with_layout_on_another_device():
    lin = sk.nn.SparseLinear(60, 40, density=0.5, block_size=B, generator=gen(0))
    lin._set_layout_buffers(lin.layout.to("meta"))  # a module whose layout was left on another device
    with pytest.raises(ValueError, match="meta"):
        lin(randn(3, 60, seed=1))


def test_tensors_on_another_device_than_layout(no_kernel):
    layout = BSL.random(*SHAPE, B, 0.5, generator=gen(0))
    values = randn(layout.nnz_blocks, B, B, seed=2)
    with pytest.raises(ValueError, match="values.*meta"):
        sk.ops.block_sparse_linear(randn(3, 60, seed=1), values.to("meta"), layout)
    with pytest.raises(ValueError, match="bias.*meta"):
        sk.ops.block_sparse_linear(randn(3, 60, seed=1), values, layout, torch.zeros(40, device="meta"))


# ---------------------------------------------------------------- corrupted or raw indices
def _good():
    layout = BSL.random(*SHAPE, B, 0.5, generator=gen(0))
    return layout, randn(5, 60, seed=1), randn(layout.nnz_blocks, B, B, seed=2), randn(5, 40, seed=3)


def _corruptions(layout):
    """(name, index tensor, expected exception) for a packed index made wrong in one way."""
    n_rows, n_cols = layout.grid
    nnz = layout.nnz_blocks
    col_idx_at = n_rows + 1
    block_row_at = col_idx_at + nnz
    col_ptr_at = block_row_at + nnz
    row_idx_at = col_ptr_at + n_cols + 1
    perm_at = row_idx_at + nnz

    def poke(pos, value):
        t = layout.index.clone()
        t[pos] = value
        return t

    return [
        ("col_idx too large", poke(col_idx_at, n_cols), ValueError),
        ("col_idx negative", poke(col_idx_at + 1, -1), ValueError),
        ("block_row too large", poke(block_row_at, n_rows + 7), ValueError),
        ("row_ptr past nnz", poke(1, nnz + 5), ValueError),
        ("row_ptr decreasing", poke(2, -3), ValueError),
        ("col_ptr does not start at 0", poke(col_ptr_at, 1), ValueError),
        ("row_idx too large", poke(row_idx_at, 1 << 30), ValueError),
        ("perm too large", poke(perm_at, nnz), ValueError),
        ("perm negative", poke(perm_at + 1, -5), ValueError),
        ("int64 index", layout.index.long(), TypeError),
        ("float index", layout.index.float(), TypeError),
        ("truncated", layout.index[:-1].clone(), ValueError),
        ("2-D", layout.index.reshape(1, -1), ValueError),
        ("non-contiguous", torch.stack([layout.index, layout.index], 1)[:, 0], ValueError),
    ]


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("case", range(14))
def test_raw_ops_reject_bad_index_before_kernel(backend, case, no_kernel):
    """torch.ops.set_kernels.* called directly with a corrupted index never reach a kernel."""
    layout, x, values, dy = _good()
    name, index, exc = _corruptions(layout)[case]
    rows, cols = SHAPE
    calls = [
        lambda: OPS.linear_forward(x, values, index, None, rows, cols, B),
        lambda: OPS.linear_grad_input(dy, values, index, rows, cols, B),
        lambda: OPS.linear_grad_weight(dy, x, index, rows, cols, B),
        lambda: OPS.to_dense(values, index, rows, cols, B),
        lambda: OPS.from_dense(randn(rows, cols, seed=4), index, rows, cols, B),
    ]
    with backends.use(backend):
        for call in calls:
            with pytest.raises(exc, match="index"):
                call()


@pytest.mark.parametrize("case", range(14))
def test_public_ops_reject_corrupted_layout(case, no_kernel):
    """A layout whose packed index was replaced or edited in place after it was built."""
    layout, x, values, _ = _good()
    name, index, exc = _corruptions(layout)[case]
    if name in ("int64 index", "float index", "truncated", "2-D", "non-contiguous"):
        layout.index = index  # replaced
    else:
        layout.index.copy_(index)  # edited in place (bumps the tensor's version)
    with pytest.raises(exc, match="index"):
        sk.ops.block_sparse_linear(x, values, layout)
    with pytest.raises(exc, match="index"):
        sk.ops.to_dense(values, layout)


def test_index_check_is_cached_but_sees_in_place_edits():
    """A good index is checked once; an in-place edit afterwards is caught at the next call."""
    layout, x, values, _ = _good()
    sk.ops.block_sparse_linear(x, values, layout)  # checked and remembered
    sk.ops.block_sparse_linear(x, values, layout)
    n_rows = layout.grid[0]
    layout.index[n_rows + 1] = 99  # col_idx[0]
    with pytest.raises(ValueError, match="col_idx < C"):
        sk.ops.block_sparse_linear(x, values, layout)


def test_library_built_layouts_are_trusted_until_edited():
    """Layouts the library builds from known-valid positions (random, SET updates: _from_flat)
    are recorded as checked without a read; an in-place edit afterwards is still caught."""
    from set_kernels.ops import _library

    layout = BSL.random(40, 30, 1, 0.3, generator=gen(1))
    key = id(layout.index)
    assert key in _library._CHECKED and _library.checked_nnz(layout.index, 40, 30, 1) == layout.nnz_blocks
    assert _library.checked_nnz(layout.index, 40, 31, 1) is None  # another grid: not vouched for
    x = randn(3, 30, seed=1)
    sk.ops.block_sparse_linear(x, randn(layout.nnz_blocks, 1, 1, seed=2), layout)
    layout.index[layout.grid[0] + 1] = 99  # col_idx[0]
    assert _library.checked_nnz(layout.index, 40, 30, 1) is None
    with pytest.raises(ValueError, match="col_idx < C"):
        sk.ops.block_sparse_linear(x, randn(layout.nnz_blocks, 1, 1, seed=2), layout)


def test_index_check_cache_lets_dropped_indices_go():
    """The cache of checked indices holds no dropped index (nor its memory): SET drops layouts at
    every update, and a cache that kept them grew by the size of every dropped index."""
    import gc
    import weakref

    from set_kernels.ops import _library

    refs = []
    for seed in range(3):
        layout = BSL.random(64, 48, 1, 0.3, generator=gen(seed))
        x = randn(5, 48, seed=seed)
        sk.ops.block_sparse_linear(x, randn(layout.nnz_blocks, 1, 1, seed=seed), layout)  # checked, cached
        assert id(layout.index) in _library._CHECKED
        refs.append((id(layout.index), weakref.ref(layout.index)))
        del layout
    gc.collect()
    for key, ref in refs:
        assert ref() is None, "a dropped layout index is still alive"
        assert key not in _library._CHECKED


def test_checked_numpy_views_follow_the_check():
    """The numpy views of a checked index are made once and kept with the check; they are the
    index's own memory; an in-place edit drops them with the check (the edit is then caught),
    and a dropped index leaves with its views."""
    import gc
    import weakref

    from set_kernels.ops import _library

    layout = BSL.random(40, 30, 1, 0.3, generator=gen(4))
    views = _library.checked_numpy(layout.index, 40, 30, 1)
    assert _library.checked_numpy(layout.index, 40, 30, 1) is views
    for view, part in zip(views, _library.check_index(layout.index, 40, 30, 1)):
        assert view.ctypes.data == part.data_ptr() and view.shape == tuple(part.shape)
    layout.index[layout.grid[0] + 1] = 99  # col_idx[0]
    with pytest.raises(ValueError, match="col_idx < C"):
        _library.checked_numpy(layout.index, 40, 30, 1)
    other = BSL.random(40, 30, 1, 0.3, generator=gen(5))
    _library.checked_numpy(other.index, 40, 30, 1)
    ref = weakref.ref(other.index)
    del other
    gc.collect()
    assert ref() is None, "the cached numpy views kept a dropped index alive"


def test_layout_with_wrong_nnz_count(no_kernel):
    layout, x, values, _ = _good()
    layout._nnz += 1  # nnz_blocks disagrees with the index
    with pytest.raises(ValueError, match="layout"):
        sk.ops.block_sparse_linear(x, randn(layout.nnz_blocks, B, B, seed=2), layout)


@pytest.mark.parametrize("bad,exc,match", [
    ("values_count", ValueError, "values"),
    ("values_block", ValueError, "values"),
    ("x_cols", ValueError, "x"),
    ("dtype", TypeError, "values"),
    ("bias_shape", ValueError, "bias"),
    ("int_x", TypeError, "x"),
])
def test_public_op_shape_errors_before_kernel(bad, exc, match, no_kernel):
    layout, x, values, _ = _good()
    bias = None
    if bad == "values_count":
        values = values[:-1]
    elif bad == "values_block":
        values = randn(layout.nnz_blocks, B, 2 * B, seed=2)
    elif bad == "x_cols":
        x = randn(5, 61, seed=1)
    elif bad == "dtype":
        values = values.double()
    elif bad == "bias_shape":
        bias = randn(41, seed=3)
    elif bad == "int_x":
        x = torch.ones(5, 60, dtype=torch.int32)
    with pytest.raises(exc, match=match):
        sk.ops.block_sparse_linear(x, values, layout, bias)
