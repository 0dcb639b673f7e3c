"""BlockSparseLayout: construction, CSR / CSC consistency, partial edge blocks, validation, devices."""
from __future__ import annotations

import pytest
import torch

import set_kernels as sk
from conftest import blocks_ref, csr_blocks, dense_ref, gen, randn

BSL = sk.BlockSparseLayout


def ceil_div(a, b):
    return -(-a // b)


def check_csr_invariants(layout):
    """Independent re-derivation of every index tensor from the block mask."""
    n_rows, n_cols = layout.grid
    mask = layout.block_mask()
    assert mask.dtype == torch.bool and tuple(mask.shape) == (n_rows, n_cols)
    nnz = layout.nnz_blocks
    assert int(mask.sum()) == nnz
    for name in ("row_ptr", "col_idx", "block_row", "col_ptr", "row_idx", "perm"):
        t = getattr(layout, name)
        assert t.dtype == torch.int32, name
        assert t.is_contiguous(), name
    row_ptr = layout.row_ptr.tolist()
    col_idx = layout.col_idx.tolist()
    block_row = layout.block_row.tolist()
    assert len(row_ptr) == n_rows + 1 and row_ptr[0] == 0 and row_ptr[-1] == nnz
    # CSR: row by row, strictly ascending columns, and exactly the True entries of the mask.
    expected_csr = [(r, c) for r in range(n_rows) for c in range(n_cols) if mask[r, c]]
    got_csr = []
    for r in range(n_rows):
        cols = col_idx[row_ptr[r]:row_ptr[r + 1]]
        assert cols == sorted(set(cols)), f"block row {r}: columns not strictly ascending: {cols}"
        got_csr += [(r, c) for c in cols]
    assert got_csr == expected_csr
    assert block_row == [r for r, _ in expected_csr]
    # CSC (transposed index): column by column, rows ascending, perm points at the same block.
    col_ptr = layout.col_ptr.tolist()
    row_idx = layout.row_idx.tolist()
    perm = layout.perm.tolist()
    assert len(col_ptr) == n_cols + 1 and col_ptr[0] == 0 and col_ptr[-1] == nnz
    assert sorted(perm) == list(range(nnz))
    expected_csc = [(r, c) for c in range(n_cols) for r in range(n_rows) if mask[r, c]]
    got_csc = []
    for c in range(n_cols):
        for q in range(col_ptr[c], col_ptr[c + 1]):
            got_csc.append((row_idx[q], c))
            # values[perm[q]] is the block at (row_idx[q], c)
            assert expected_csr[perm[q]] == (row_idx[q], c), f"perm[{q}] points at the wrong block"
    assert got_csc == expected_csc


# ------------------------------------------------------------------------------------ random
@pytest.mark.parametrize("rows,cols,b", [(1000, 784, 16), (784, 1000, 32), (33, 47, 16), (17, 16, 16),
                                         (300, 200, 64), (257, 129, 128), (128, 128, 128)])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_random_exact_count_and_indices(rows, cols, b, density):
    layout = BSL.random(rows, cols, b, density, generator=gen(1))
    n_blocks = ceil_div(rows, b) * ceil_div(cols, b)
    assert layout.shape == (rows, cols)
    assert layout.block_size == b
    assert layout.grid == (ceil_div(rows, b), ceil_div(cols, b))
    assert layout.n_blocks == n_blocks
    assert layout.nnz_blocks == round(density * n_blocks)
    assert layout.density == pytest.approx(round(density * n_blocks) / n_blocks, abs=1e-15)
    check_csr_invariants(layout)


def test_random_is_seeded_and_varies():
    a = BSL.random(320, 640, 32, 0.3, generator=gen(5))
    b = BSL.random(320, 640, 32, 0.3, generator=gen(5))
    c = BSL.random(320, 640, 32, 0.3, generator=gen(6))
    assert a == b
    assert not torch.equal(a.block_mask(), c.block_mask())


def test_random_is_roughly_uniform():
    # Every block position is chosen sometimes over many draws (a biased picker would miss some).
    counts = torch.zeros(4, 5)
    for seed in range(200):
        counts += BSL.random(64, 80, 16, 0.3, generator=gen(seed)).block_mask().float()
    assert counts.sum() == 200 * round(0.3 * 20)
    assert counts.min() > 20 and counts.max() < 100


# ------------------------------------------------------------------------------ block masks
@pytest.mark.parametrize("shape,b", [(None, 16), ((1000, 784), 16), ((784, 1000), 32), ((33, 47), 16),
                                     ((17, 16), 16), ((65, 1), 64)])
def test_from_block_mask_round_trip(shape, b):
    if shape is None:
        n_rows, n_cols = 5, 7
    else:
        n_rows, n_cols = ceil_div(shape[0], b), ceil_div(shape[1], b)
    mask = torch.rand(n_rows, n_cols, generator=gen(3)) < 0.4
    mask[0, 0] = True
    layout = BSL.from_block_mask(mask, b, shape=shape)
    assert torch.equal(layout.block_mask(), mask)
    assert layout.nnz_blocks == int(mask.sum())
    assert layout.shape == (shape if shape is not None else (n_rows * b, n_cols * b))
    check_csr_invariants(layout)
    # Round trip through a layout's own mask gives an equal layout.
    assert BSL.from_block_mask(layout.block_mask(), b, shape=layout.shape) == layout


def test_from_block_mask_empty_and_full():
    empty = BSL.from_block_mask(torch.zeros(3, 4, dtype=torch.bool), 32, shape=(70, 100))
    assert empty.nnz_blocks == 0 and empty.density == 0.0
    check_csr_invariants(empty)
    full = BSL.from_block_mask(torch.ones(3, 4, dtype=torch.bool), 32, shape=(70, 100))
    assert full.nnz_blocks == 12 and full.density == 1.0
    check_csr_invariants(full)


def test_from_block_mask_shape_must_match_grid():
    mask = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        BSL.from_block_mask(mask, 32, shape=(100, 100))  # needs a 4 x 4 grid


@pytest.mark.parametrize("rows,cols,b", [(784, 1000, 16), (1000, 784, 32), (784, 1000, 32)])
def test_partial_edge_blocks_element_mask(rows, cols, b):
    layout = BSL.random(rows, cols, b, 0.3, generator=gen(2))
    n_rows, n_cols = layout.grid
    assert n_rows * b >= rows > (n_rows - 1) * b
    assert n_cols * b >= cols > (n_cols - 1) * b
    em = layout.element_mask()
    assert em.shape == (rows, cols) and em.dtype == torch.bool
    expected = torch.zeros(n_rows * b, n_cols * b, dtype=torch.bool)
    for r, c in csr_blocks(layout):
        expected[r * b:(r + 1) * b, c * b:(c + 1) * b] = True
    assert torch.equal(em, expected[:rows, :cols])


# ------------------------------------------------------------------------------------ from_csr
def test_from_csr_matches_block_mask():
    # grid 3 x 4 (rows 70, cols 100, b 32): rows {0: [1, 3], 1: [], 2: [0, 1, 2]}
    row_ptr = torch.tensor([0, 2, 2, 5])
    col_idx = torch.tensor([1, 3, 0, 1, 2])
    for dtype in (torch.int32, torch.int64):
        layout = BSL.from_csr(row_ptr.to(dtype), col_idx.to(dtype), 32, (70, 100))
        expected = torch.zeros(3, 4, dtype=torch.bool)
        expected[0, 1] = expected[0, 3] = expected[2, 0] = expected[2, 1] = expected[2, 2] = True
        assert torch.equal(layout.block_mask(), expected)
        assert layout.row_ptr.tolist() == [0, 2, 2, 5]
        assert layout.col_idx.tolist() == [1, 3, 0, 1, 2]
        check_csr_invariants(layout)
        assert layout == BSL.from_block_mask(expected, 32, shape=(70, 100))


@pytest.mark.parametrize("row_ptr,col_idx,match", [
    ([0, 2, 2, 5], [1, 4, 0, 1, 2], "col_idx"),    # column 4 out of range (4 block columns)
    ([0, 2, 2, 5], [1, -1, 0, 1, 2], "col_idx"),   # negative column
    ([0, 2, 2, 5], [3, 1, 0, 1, 2], "col_idx"),    # unsorted within block row 0
    ([0, 2, 2, 5], [1, 1, 0, 1, 2], "col_idx"),    # duplicate block
    ([0, 2, 5], [1, 3, 0, 1, 2], "row_ptr"),       # wrong length (grid has 3 block rows)
    ([0, 2, 2, 5, 5], [1, 3, 0, 1, 2], "row_ptr"),  # wrong length, too long
    ([1, 2, 2, 5], [1, 3, 0, 1, 2], "row_ptr"),    # does not start at 0
    ([0, 2, 2, 4], [1, 3, 0, 1, 2], "row_ptr"),    # does not end at nnz
    ([0, 3, 2, 5], [1, 3, 0, 1, 2], "row_ptr"),    # decreasing
])
def test_from_csr_rejects_bad_indices(row_ptr, col_idx, match):
    with pytest.raises(ValueError, match=match):
        BSL.from_csr(torch.tensor(row_ptr), torch.tensor(col_idx), 32, (70, 100))


def test_from_csr_rejects_float_indices():
    with pytest.raises(TypeError, match="row_ptr"):
        BSL.from_csr(torch.tensor([0.0, 1.0]), torch.tensor([0]), 32, (32, 32))


# ------------------------------------------------------------------------------------ equality
def test_equality():
    mask = torch.tensor([[True, False], [False, True]])
    a = BSL.from_block_mask(mask, 32)
    assert a == BSL.from_block_mask(mask.clone(), 32)
    assert a != BSL.from_block_mask(~mask, 32)                      # other blocks
    assert a != BSL.from_block_mask(mask, 16)                       # other block size
    assert a != BSL.from_block_mask(mask, 32, shape=(60, 64))       # other shape, same grid
    assert a != "not a layout"


# --------------------------------------------------------------------------------------- to()
def test_to_same_device_and_meta():
    layout = BSL.random(100, 70, 32, 0.5, generator=gen(0))
    assert layout.to("cpu") is layout
    assert layout.to(torch.device("cpu")) == layout
    meta = layout.to("meta")
    assert meta.device.type == "meta"
    assert meta.index.device.type == "meta"
    assert meta.shape == layout.shape and meta.block_size == layout.block_size
    assert meta.nnz_blocks == layout.nnz_blocks and meta.grid == layout.grid
    assert layout.device.type == "cpu"  # the original is untouched


def test_random_device_argument():
    layout = BSL.random(64, 64, 32, 0.5, device="cpu", generator=gen(0))
    assert layout.device == torch.device("cpu") and layout.index.device == torch.device("cpu")


# ----------------------------------------------------------------------- to_dense / from_dense
@pytest.mark.parametrize("rows,cols,b,density", [(1000, 784, 32, 0.3), (33, 47, 16, 1.0), (17, 16, 16, 0.5),
                                                 (200, 130, 64, 0.3), (130, 300, 128, 1.0), (64, 64, 32, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_to_dense_matches_loop_construction(rows, cols, b, density, dtype):
    layout = BSL.random(rows, cols, b, density, generator=gen(4))
    values = randn(layout.nnz_blocks, b, b, dtype=dtype, seed=5)
    dense = sk.ops.to_dense(values, layout)
    assert dense.dtype == dtype and dense.shape == (rows, cols)
    # Exact: placing blocks does no arithmetic.
    assert torch.equal(dense.double(), dense_ref(values, layout))


@pytest.mark.parametrize("rows,cols,b,density", [(1000, 784, 32, 0.3), (33, 47, 16, 1.0), (200, 130, 64, 0.5),
                                                 (64, 64, 32, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_dense_matches_loop_extraction(rows, cols, b, density, dtype):
    layout = BSL.random(rows, cols, b, density, generator=gen(6))
    weight = randn(rows, cols, dtype=dtype, seed=7)
    values = sk.ops.from_dense(weight, layout)
    assert values.dtype == dtype and values.shape == (layout.nnz_blocks, b, b)
    # Exact, including exact zeros beyond the matrix edges.
    assert torch.equal(values.double(), blocks_ref(weight, layout))


def test_to_dense_from_dense_gradients():
    layout = BSL.random(47, 33, 16, 0.5, generator=gen(8))
    values = randn(layout.nnz_blocks, 16, 16, dtype=torch.float64, seed=1).requires_grad_()
    upstream = randn(47, 33, dtype=torch.float64, seed=2)
    sk.ops.to_dense(values, layout).backward(upstream)
    assert torch.equal(values.grad, blocks_ref(upstream, layout))
    weight = randn(47, 33, dtype=torch.float64, seed=3).requires_grad_()
    up_blocks = randn(layout.nnz_blocks, 16, 16, dtype=torch.float64, seed=4)
    sk.ops.from_dense(weight, layout).backward(up_blocks)
    assert torch.equal(weight.grad, dense_ref(up_blocks, layout))


def _layouts_both_ways(monkeypatch, build):
    """``build()`` with the numba index builders and with torch ops only."""
    import set_kernels.layout as layout_mod

    monkeypatch.setattr(layout_mod, "USE_NUMBA_INDEX", True)
    fast = build()
    monkeypatch.setattr(layout_mod, "USE_NUMBA_INDEX", False)
    slow = build()
    return fast, slow


@pytest.mark.parametrize("b", [1, 16])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.2, 1.0])
def test_numba_index_builder_matches_torch(monkeypatch, b, density):
    """On the CPU the packed index is built by numba counting passes; it must equal, element for
    element, the index the torch ops build (random layouts, empty rows and columns, partial edge
    blocks, density 0 and 1)."""
    from set_kernels.backends import numba as nb

    if nb.index_kernels() is None:
        pytest.skip(nb.availability()[1])
    for seed, (rows, cols) in enumerate([(1, 1), (37, 5), (5, 301), (130, 97), (257, 64)]):
        fast, slow = _layouts_both_ways(
            monkeypatch, lambda: BSL.random(rows, cols, b, density, generator=gen(seed)))
        assert fast.index.dtype == torch.int32 and fast.index.is_contiguous()
        assert torch.equal(fast.index, slow.index), (rows, cols, b, density)
        assert fast == slow


def test_numba_index_builder_matches_torch_on_masks(monkeypatch):
    """Hand-picked masks: empty first/last rows and columns, one full row, one full column."""
    from set_kernels.backends import numba as nb

    if nb.index_kernels() is None:
        pytest.skip(nb.availability()[1])
    mask = torch.zeros(9, 11, dtype=torch.bool)
    mask[3] = True
    mask[:, 4] = True
    mask[5, 7] = mask[7, 1] = True
    for m in (mask, mask.t().contiguous(), torch.zeros(4, 6, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool)):
        fast, slow = _layouts_both_ways(monkeypatch, lambda: BSL.from_block_mask(m, 1))
        assert torch.equal(fast.index, slow.index)
        torch.testing.assert_close(fast.block_mask(), m, rtol=0, atol=0)
        # the transposed index: rows ascend within each column, perm maps CSC slots to values
        assert torch.equal(fast.row_idx.long(), fast.block_row.long()[fast.perm.long()])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_numba_index_builder_parallel_parts_give_the_serial_index(monkeypatch, threads):
    """With many entries per column the CSC counting sort runs in row parts, one per thread: the
    index must not depend on the number of parts (1, 2, 3 threads; parts with empty rows)."""
    numba = pytest.importorskip("numba")
    from set_kernels.backends import numba as nb

    kernels = nb.index_kernels()
    if kernels is None:
        pytest.skip(nb.availability()[1])
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"numba has {numba.config.NUMBA_NUM_THREADS} threads")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)  # the numba backend follows torch's thread count
        for seed, (rows, cols, density) in enumerate([(200, 7, 0.9), (64, 3, 1.0), (301, 11, 0.5)]):
            fast, slow = _layouts_both_ways(
                monkeypatch, lambda: BSL.random(rows, cols, 1, density, generator=gen(seed)))
            assert fast.nnz_blocks >= kernels.PACK_ENTRIES_PER_COLUMN * (cols + 1) * threads  # parts in use
            assert torch.equal(fast.index, slow.index), (rows, cols, density, threads)
    finally:
        torch.set_num_threads(before)
