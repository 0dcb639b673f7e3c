"""Element sparsity (``block_size=1``): layouts drawn in O(nnz), layers, sparsify, MaskedAdam, dispatch."""
from __future__ import annotations

import collections

import pytest
import torch

import set_kernels as sk
from conftest import dense_ref, gen, randn
from set_kernels import backends
from set_kernels.layout import sample_positions

BSL = sk.BlockSparseLayout


# ------------------------------------------------------------------------------- sampling
def test_sample_positions_distinct_sorted_and_outside_exclude():
    exclude = torch.tensor([3, 10, 11, 12, 99_999_999_998])
    for seed in range(5):
        got = sample_positions(10**11, 5000, generator=gen(seed), exclude=exclude)
        assert got.dtype == torch.int64 and got.shape == (5000,)
        assert bool((got[1:] > got[:-1]).all()), "sorted and distinct"
        assert bool(((got >= 0) & (got < 10**11)).all())
        assert not bool(torch.isin(got, exclude).any())


@pytest.mark.parametrize("n,k,exclude", [(6, 2, [1]), (10**9, 2, []), (7, 6, [0])])
def test_sample_positions_is_uniform(n, k, exclude):
    """Each allowed position is drawn with probability k / allowed (chi-square-like bound)."""
    exclude_t = torch.tensor(exclude, dtype=torch.int64)
    trials = 3000
    g = gen(1)
    counts = collections.Counter()
    for _ in range(trials):
        counts.update(sample_positions(n, k, generator=g, exclude=exclude_t).tolist())
    assert not set(counts) & set(exclude)
    if n > 100:  # a huge range: every draw lands on a fresh position
        assert sum(counts.values()) == trials * k
        return
    allowed = n - len(exclude)
    expected = trials * k / allowed
    for pos in range(n):
        if pos in exclude:
            continue
        # binomial sd = sqrt(expected * (1 - k / allowed)); 5 sd
        sd = (expected * (1 - k / allowed)) ** 0.5
        assert abs(counts[pos] - expected) <= 5 * sd + 1, (pos, counts[pos], expected)


def test_sample_positions_is_deterministic_and_checks_k():
    a = sample_positions(10**10, 100, generator=gen(3))
    b = sample_positions(10**10, 100, generator=gen(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="^k: "):
        sample_positions(10, 9, exclude=torch.tensor([1, 2]))
    assert sample_positions(10, 0).shape == (0,)
    full = sample_positions(10, 8, exclude=torch.tensor([2, 5]))
    assert full.tolist() == [0, 1, 3, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("rows,cols,density", [(37, 53, 0.3), (1, 1, 1.0), (5000, 7000, 0.001),
                                               (10**6, 10**6, 1e-7), (20, 30, 0.0)])
def test_element_layout_random_exact_count(rows, cols, density):
    layout = BSL.random(rows, cols, 1, density, generator=gen(0))
    assert layout.nnz_blocks == round(density * rows * cols)
    assert layout.grid == (rows, cols) and layout.block_size == 1
    # a valid CSR (from_csr checks every index)
    BSL.from_csr(layout.row_ptr, layout.col_idx, 1, (rows, cols))
    assert torch.equal(BSL.random(rows, cols, 1, density, generator=gen(0)).index, layout.index)


def test_entry_mask_is_all_true_at_b1_and_marks_edges_for_blocks():
    layout = BSL.random(37, 53, 1, 0.3, generator=gen(0))
    assert layout.entry_mask().shape == (layout.nnz_blocks, 1, 1) and bool(layout.entry_mask().all())
    blocks = BSL.random(37, 53, 16, 1.0, generator=gen(0))
    ones = dense_ref(torch.ones(blocks.nnz_blocks, 16, 16), blocks)
    assert int(blocks.entry_mask().sum()) == int(ones.sum()) == 37 * 53


# --------------------------------------------------------------------------------- layers
def test_sparse_linear_b1_from_dense_keeps_largest_and_matches():
    lin = torch.nn.Linear(53, 37)
    torch.nn.init.normal_(lin.weight, generator=gen(1))
    sl = sk.nn.SparseLinear.from_dense(lin, density=0.2, block_size=1)
    k = round(0.2 * 37 * 53)
    assert sl.values.shape == (k, 1, 1)
    w = lin.weight.detach()
    kept = dense_ref(sl.values, sl.layout) != 0
    threshold = w.abs().flatten().topk(k).values.min()
    assert int(kept.sum()) == k and bool((w.abs()[kept] >= threshold).all())
    x = randn(4, 53, seed=2)
    torch.testing.assert_close(sl(x), x @ (w * kept).T + lin.bias.detach(), rtol=1e-5, atol=1e-5)


def test_sparsify_with_block_size_1_gives_element_sparse_layers():
    model = torch.nn.Sequential(torch.nn.Linear(60, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
    sk.sparsify(model, density=0.2, block_size=1, distribution="uniform")
    for m in (model[0], model[2]):
        assert isinstance(m, sk.nn.SparseLinear) and m.block_size == 1
        assert m.layout.nnz_blocks == round(0.2 * m.in_features * m.out_features)
    model(randn(3, 60)).sum().backward()


def test_masked_adam_on_element_values_matches_torch_adam():
    layer = sk.nn.SparseLinear(40, 30, density=0.3, block_size=1, generator=gen(0))
    ref = torch.nn.Parameter(layer.values.detach().clone())
    opt = sk.optim.MaskedAdam(layer.parameters(), lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=1e-2)
    for step in range(3):
        g = randn(*layer.values.shape, seed=step)
        layer.values.grad = g.clone()
        ref.grad = g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(layer.values.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    state = opt.state[layer.values]
    assert state["exp_avg"].shape == (layer.layout.nnz_blocks, 1, 1)  # O(nnz) state


# ------------------------------------------------------------------------------- dispatch
def test_cuda_backend_refuses_block_size_1_with_reason_and_auto_picks_triton(monkeypatch):
    mod = backends.load("cuda")
    assert mod is not None, "the cuda backend module imports without _C and without a GPU"
    cuda = torch.device("cuda")
    for name in ("cuda", "triton"):
        monkeypatch.setattr(backends.load(name), "availability", lambda: (True, ""))
    if backends.load("triton") is not None:
        monkeypatch.setattr(backends.load("triton"), "DEVICES", ("cuda",))
    reasons = backends.unsupported_reasons("cuda", "linear_forward", cuda, torch.float32, 1)
    assert any("block sizes 16, 32, 64, 128, not 1" in r for r in reasons), reasons
    assert backends.unsupported_reasons("cuda", "linear_forward", cuda, torch.float32, 16) == []
    with pytest.raises(RuntimeError, match="block sizes 16, 32, 64, 128, not 1"):
        backends.resolve("cuda", "linear_forward", cuda, torch.float32, 1)
    assert backends.resolve(None, "linear_forward", cuda, torch.float32, 1) == "triton"
    assert backends.resolve(None, "linear_forward", cuda, torch.float32, 16) == "triton"
    # with triton out of the way, auto takes the next backend that serves b=1: torch, never cuda
    monkeypatch.setattr(backends.load("triton"), "availability", lambda: (False, "off"))
    backends.clear_cache()  # availability is cached per process
    assert backends.resolve(None, "linear_forward", cuda, torch.float32, 1) == "torch"
    assert backends.resolve(None, "linear_forward", cuda, torch.float32, 16) == "cuda"


# ------------------------------------------------------------------ checkpoints and SET misuse
@pytest.mark.parametrize("other", [dict(density=0.25, block_size=16), dict(density=0.1, block_size=1)])
def test_loading_another_topology_size_names_the_layer_and_cause(other):
    src = torch.nn.Sequential(torch.nn.ReLU(), sk.nn.SparseLinear(64, 48, density=0.5, block_size=16))
    dst = torch.nn.Sequential(torch.nn.ReLU(), sk.nn.SparseLinear(64, 48, generator=gen(1), **other))
    before = dst[1].layout
    with pytest.raises(RuntimeError, match=r"1: the checkpoint's values have shape \(6, 16, 16\).*same number of live"):
        dst.load_state_dict(src.state_dict())
    assert dst[1].layout == before  # nothing was half-loaded
    x = randn(3, 64)
    assert dst(x).shape == (3, 48)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("corrupt", ["col_out_of_range", "col_negative", "row_ptr_past_nnz", "row_ptr_decreasing",
                                     "cols_unsorted"])
def test_a_corrupt_checkpoint_index_is_an_error_not_a_memory_fault(block_size, corrupt):
    """The layout is rebuilt from the row_ptr / col_idx buffers after load_state_dict: corrupt ones
    (the same number of live blocks, so the loader copies them) raise a ValueError naming the
    layer's buffers before the index builder reads them (it would write out of bounds)."""
    layer = sk.nn.SparseLinear(64, 48, density=0.5, block_size=block_size, generator=gen(2))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    ci, rp = state["col_idx"], state["row_ptr"]
    n_cols = 64 // block_size
    if corrupt == "col_out_of_range":
        ci[len(ci) // 2] = n_cols + 1000
    elif corrupt == "col_negative":
        ci[0] = -5
    elif corrupt == "row_ptr_past_nnz":
        rp[-1] = len(ci) + 7
    elif corrupt == "row_ptr_decreasing":
        rp[1], rp[2] = rp[2] + 1, rp[1]
    else:
        row = int(torch.nonzero(rp[1:] - rp[:-1] >= 2)[0])
        a = int(rp[row])
        ci[a], ci[a + 1] = ci[a + 1].clone(), ci[a].clone()
    with pytest.raises(ValueError, match="SparseLinear: the row_ptr / col_idx buffers are not a valid layout"):
        layer.load_state_dict(state)
    good = sk.nn.SparseLinear(64, 48, density=0.5, block_size=block_size, generator=gen(3))
    layer.load_state_dict(good.state_dict())  # a valid checkpoint still loads afterwards
    x = randn(3, 64)
    torch.testing.assert_close(layer(x), good(x))


@pytest.mark.parametrize("block_size", [1, 16])
def test_layout_follows_buffer_copies_and_keeps_an_unchanged_topology(block_size):
    """A copy into the layout buffers (DDP's buffer broadcast, a user's copy_): the same topology
    keeps the cached layout (no rebuild, no check); another valid one is followed; a corrupt one
    is an error."""
    layer = sk.nn.SparseLinear(64, 48, density=0.5, block_size=block_size, generator=gen(6))
    other = sk.nn.SparseLinear(64, 48, density=0.5, block_size=block_size, generator=gen(7))
    before = layer.layout
    with torch.no_grad():
        layer.row_ptr.copy_(layer.row_ptr.clone())
        layer.col_idx.copy_(layer.col_idx.clone())
    assert layer.layout is before
    with torch.no_grad():
        layer.row_ptr.copy_(other.row_ptr)
        layer.col_idx.copy_(other.col_idx)
    assert layer.layout is not before and layer.layout == other.layout
    x = randn(3, 64)
    with torch.no_grad():
        layer.values.copy_(other.values)
        layer.bias.copy_(other.bias)
    torch.testing.assert_close(layer(x), other(x))
    with torch.no_grad():
        layer.col_idx[0] = 10_000
    with pytest.raises(ValueError, match="SparseLinear: the row_ptr / col_idx buffers are not a valid layout"):
        layer(x)


def test_set_rejects_an_optimizer_without_the_sparse_parameters():
    model = torch.nn.Sequential(sk.nn.SparseLinear(20, 10, density=0.5, block_size=1), torch.nn.Linear(10, 2))
    other = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="^optimizer: it holds none of the sparse layers' parameters"):
        sk.SET(model, other)
    two = torch.nn.Sequential(sk.nn.SparseLinear(20, 10, density=0.5, block_size=1),
                              sk.nn.SparseLinear(10, 4, density=0.5, block_size=1))
    with pytest.warns(UserWarning, match=r"\['1'\]"):
        sk.SET(two, torch.optim.SGD(two[0].parameters(), lr=0.1))


def _numba_spmm():
    """``(numpy, the numba element kernels module)``; skips where numba is unavailable."""
    np = pytest.importorskip("numpy")
    from set_kernels.backends import numba as nb

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    return np, nb._load()[3]


# --------------------------------------------------------------------------- the eager path
@pytest.mark.parametrize("b,density", [(1, 0.2), (16, 0.5)])
def test_eager_path_matches_the_custom_op_bit_for_bit(b, density, monkeypatch):
    from set_kernels.ops import _library

    layout = BSL.random(50, 70, b, density, generator=gen(0))
    outs = []
    for eager in (True, False):
        monkeypatch.setattr(_library, "plain_eager", lambda *t, eager=eager: eager)
        calls = []
        monkeypatch.setattr(_library.EagerLinear, "forward",
                            staticmethod(lambda ctx, *a, f=_library.EagerLinear.forward: calls.append(1) or f(ctx, *a)))
        values = randn(layout.nnz_blocks, b, b, seed=1).requires_grad_()
        x = randn(6, 70, seed=2).requires_grad_()
        bias = randn(50, seed=3).requires_grad_()
        y = sk.ops.block_sparse_linear(x, values, layout, bias, backend="numba")
        y.backward(randn(6, 50, seed=4))
        assert bool(calls) == eager
        outs.append((y.detach(), x.grad, values.grad, bias.grad))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_transpose_both_paths(dtype):
    """The element kernels' transpose (vector tiles transposed in registers, one value at a time
    past the last whole vector of features) on edge sizes: token counts around a vector and a
    token block, feature counts around a vector and a work item, rows of ``out`` padded to whole
    vectors, longer, or not whole vectors (all scalar). Every output element is written with its
    transposed input and the padding columns with zeros, outputs poisoned first."""
    np, spmm = _numba_spmm()
    rng = np.random.default_rng(3)
    itemsize = np.dtype(dtype).itemsize
    vl = 64 // itemsize
    group = spmm._TILE_GROUP * vl
    for M in (0, 1, 3, vl - 1, vl, vl + 1, 40, spmm._TOKEN_BLOCK - 1, spmm._TOKEN_BLOCK + 5):
        Mp = spmm.padded_tokens(M, itemsize)
        assert Mp >= M and Mp * itemsize % 64 == 0 and Mp - M < 64 // itemsize
        for n in (1, vl - 1, vl, vl + 1, group - 1, group, group + 3, 1000):
            a = rng.standard_normal((M, n)).astype(dtype)
            for width in {Mp, Mp + vl, M + 1}:  # whole vectors, more padding, rows of no whole vectors
                out = np.full((n, width), np.nan, dtype=dtype)
                spmm.transpose(a, out)
                np.testing.assert_array_equal(out[:, :M], a.T, err_msg=f"M={M} n={n} width={width}")
                np.testing.assert_array_equal(out[:, M:], 0, err_msg=f"padding M={M} n={n} width={width}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_fused_backward_matches_the_two_kernels_and_fp64(dtype):
    """The fused element backward (one gather of each dy row for dX and dW) against the float64
    reference and, bit for bit, against the separate dX SpMM and SDDMM: token counts below, at
    and above one vector and one token tile (several tiles sum dW), empty rows and columns,
    density 0 and 1, outputs poisoned first."""
    from set_kernels.ops import _library

    np, spmm = _numba_spmm()
    rng = np.random.default_rng(5)
    itemsize = np.dtype(dtype).itemsize
    tile = 4 * 64 // itemsize
    cases = [(50, 70, 0.2), (33, 1, 0.5), (1, 40, 1.0), (64, 80, 0.03), (20, 30, 0.0), (17, 19, 1.0)]
    for k, (R, C, density) in enumerate(cases):
        layout = sk.BlockSparseLayout.random(R, C, 1, density, generator=gen(k))
        row_ptr, col_idx, block_row, col_ptr, row_idx, perm = (
            t.numpy() for t in _library.check_index(layout.index, R, C, 1))
        nnz = layout.nnz_blocks
        for M in (1, 5, 16, tile - 1, tile, tile + 9, 3 * tile + 1):
            v = rng.standard_normal(nnz).astype(dtype)
            dy = rng.standard_normal((M, R)).astype(dtype)
            x = rng.standard_normal((M, C)).astype(dtype)
            Mp = spmm.padded_tokens(M, itemsize)
            dyT, xT = np.full((R, Mp), np.nan, dtype), np.full((C, Mp), np.nan, dtype)
            spmm.transpose(dy, dyT)
            spmm.transpose(x, xT)
            dx = np.full((M, C), np.nan, dtype)
            dv = np.full(nnz, np.nan, dtype)
            spmm._backward_t(dyT, xT, M, v, col_ptr, row_idx, perm, dx, dv, spmm.ROW_CHUNK, False)
            dx2 = np.full((M, C), np.nan, dtype)
            dv2 = np.full(nnz, np.nan, dtype)
            spmm._spmm_t(dyT, M, v, col_ptr, row_idx, perm, True, v[:0], False, dx2, spmm.ROW_CHUNK, spmm.NO_ACT, 1.0,
                         False)
            spmm._sddmm_t(dyT, xT, M, block_row, col_idx, dv2, spmm.ENTRY_CHUNK)
            where = f"{R}x{C} d={density} M={M}"
            np.testing.assert_array_equal(dx, dx2, err_msg=where)
            np.testing.assert_array_equal(dv, dv2, err_msg=where)
            # token-major dx (the fused run's layers above the first): the same values, transposed,
            # padding tokens zero; from the fused pass, the dX kernel and the dispatcher
            for fn in ("backward", "spmm", "grads_t"):
                dx_t = np.full((C, Mp), np.nan, dtype)
                dv3 = np.full(nnz, np.nan, dtype)
                if fn == "backward":
                    spmm._backward_t(dyT, xT, M, v, col_ptr, row_idx, perm, dx_t, dv3, spmm.ROW_CHUNK, True)
                    np.testing.assert_array_equal(dv3, dv, err_msg=where)
                elif fn == "spmm":
                    spmm._spmm_t(dyT, M, v, col_ptr, row_idx, perm, True, v[:0], False, dx_t, spmm.ROW_CHUNK,
                                 spmm.NO_ACT, 1.0, True)
                else:
                    spmm.grads_t(dyT, xT, M, v, col_ptr, row_idx, perm, block_row, col_idx, True, True, dx_t, dv3,
                                 spmm.ROW_CHUNK, spmm.ENTRY_CHUNK, True)
                    np.testing.assert_array_equal(dv3, dv, err_msg=where)
                np.testing.assert_array_equal(dx_t[:, :M], dx.T, err_msg=f"{fn} {where}")
                np.testing.assert_array_equal(dx_t[:, M:], 0, err_msg=f"{fn} padding {where}")
            w = np.zeros((R, C))
            w[block_row, col_idx] = v
            tol = 1e-5 if dtype == "float32" else 1e-12
            scale = 1 + np.sqrt(max(R, C, M))
            np.testing.assert_allclose(dx, dy.astype(np.float64) @ w, atol=tol * scale, rtol=tol, err_msg=where)
            dv_ref = (dy.astype(np.float64).T @ x.astype(np.float64))[block_row, col_idx]
            np.testing.assert_allclose(dv, dv_ref, atol=tol * scale, rtol=tol, err_msg=where)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_kernels_with_prefetch_on_large_operands(dtype):
    """The element kernels' prefetching loops (operands of at least ``PREFETCH_MIN_BYTES``; each
    kernel has a loop of its own for them) against float64: the forward, dX through the
    transposed index, the fused backward and the SDDMM, on a 70,000 x 70,000 layer with about
    10,000 live entries, one token, one token tile and several; outputs poisoned first."""
    from set_kernels.ops import _library

    np, spmm = _numba_spmm()
    rng = np.random.default_rng(17)
    N = 70_000  # one token: 64-byte rows, 4.5 MB
    layout = sk.BlockSparseLayout.random(N, N, 1, 2e-6, generator=gen(17))
    row_ptr, col_idx, block_row, col_ptr, row_idx, perm = (t.numpy() for t in _library.check_index(layout.index, N, N, 1))
    nnz = layout.nnz_blocks
    tol = 1e-5 if dtype == "float32" else 1e-12
    for M in (1, 40, 100):
        Mp = spmm.padded_tokens(M, np.dtype(dtype).itemsize)
        assert N * Mp * np.dtype(dtype).itemsize >= spmm.PREFETCH_MIN_BYTES  # the prefetching loops run
        v = rng.standard_normal(nnz).astype(dtype)
        x = rng.standard_normal((M, N)).astype(dtype)
        dy = rng.standard_normal((M, N)).astype(dtype)
        xT, dyT = np.full((N, Mp), np.nan, dtype), np.full((N, Mp), np.nan, dtype)
        spmm.transpose(x, xT)
        spmm.transpose(dy, dyT)
        v64, x64, dy64 = v.astype(np.float64), x.astype(np.float64), dy.astype(np.float64)
        y_ref = np.zeros((N, M))  # (x @ W.T).T: row r gets v * x[:, c] for every entry (r, c)
        np.add.at(y_ref, block_row, v64[:, None] * x64.T[col_idx])
        dx_ref = np.zeros((N, M))  # (dy @ W).T
        np.add.at(dx_ref, col_idx, v64[:, None] * dy64.T[block_row])
        dv_ref = np.einsum("et,et->e", dy64.T[block_row], x64.T[col_idx])
        where = f"M={M}"
        y = np.full((M, N), np.nan, dtype)
        spmm._spmm_t(xT, M, v, row_ptr, col_idx, col_idx, False, v[:0], False, y, spmm.ROW_CHUNK, spmm.NO_ACT, 1.0,
                     False)
        np.testing.assert_allclose(y, y_ref.T, atol=tol * 10, rtol=tol, err_msg=f"forward {where}")
        dx = np.full((M, N), np.nan, dtype)
        spmm._spmm_t(dyT, M, v, col_ptr, row_idx, perm, True, v[:0], False, dx, spmm.ROW_CHUNK, spmm.NO_ACT, 1.0,
                     False)
        np.testing.assert_allclose(dx, dx_ref.T, atol=tol * 10, rtol=tol, err_msg=f"dX {where}")
        dx2, dv = np.full((M, N), np.nan, dtype), np.full(nnz, np.nan, dtype)
        spmm._backward_t(dyT, xT, M, v, col_ptr, row_idx, perm, dx2, dv, spmm.ROW_CHUNK, False)
        np.testing.assert_array_equal(dx2, dx, err_msg=f"fused backward dx {where}")
        np.testing.assert_allclose(dv, dv_ref, atol=tol * 20, rtol=tol, err_msg=f"fused backward dv {where}")
        dv2 = np.full(nnz, np.nan, dtype)
        spmm._sddmm_t(dyT, xT, M, block_row, col_idx, dv2, spmm.ENTRY_CHUNK)
        np.testing.assert_array_equal(dv2, dv, err_msg=f"SDDMM {where}")


def test_sample_positions_numba_merges_give_the_torch_result(monkeypatch):
    """On the CPU, numba merges replace sample_positions' unique / searchsorted / sort: for the
    same generator the drawn positions must be identical (several rounds, excludes, crowded)."""
    import set_kernels.layout as layout_mod
    from set_kernels.backends import numba as nb

    if nb.index_kernels() is None:
        pytest.skip(nb.availability()[1])
    cases = [(10**11, 5000, [3, 10, 11, 12, 99_999_999_998]), (10**6, 7800, None), (40_000, 7_000, "half"),
             (10**9, 1, [5]), (3_000_000, 100_000, "half")]
    for seed, (n, k, exclude) in enumerate(cases):
        if exclude == "half":  # a crowded range: several rounds of draws
            exclude = torch.arange(0, n, 2)
        ex = None if exclude is None else torch.as_tensor(exclude, dtype=torch.int64)
        got = {}
        for use in (True, False):
            monkeypatch.setattr(layout_mod, "USE_NUMBA_INDEX", use)
            got[use] = sample_positions(n, k, generator=gen(seed), exclude=ex)
        assert torch.equal(got[True], got[False]), (n, k)
        assert got[True].numel() == k


def test_numba_merge_draws_and_select_sorted():
    """The two merges against their torch definitions, including a second round (``have`` not
    empty), repeats in the draws, and draws equal to excluded or already-held positions."""
    from set_kernels.backends import numba as nb

    kernels = nb.index_kernels()
    if kernels is None:
        pytest.skip(nb.availability()[1])
    g = gen(7)
    for n_have, n_cand, n_ex in [(0, 50, 0), (30, 200, 40), (500, 500, 0), (100, 1, 500), (0, 0, 3)]:
        have = torch.unique(torch.randint(0, 1000, (n_have,), generator=g))
        cand = torch.randint(0, 1000, (n_cand,), generator=g)
        ex = torch.unique(torch.randint(0, 1000, (n_ex,), generator=g))
        ex = ex[~torch.isin(ex, have)]  # held positions are never excluded ones
        ref = torch.unique(torch.cat([have, cand]))
        ref = ref[~torch.isin(ref, ex)]
        got = torch.from_numpy(kernels.merge_draws(have.numpy(), cand.numpy(), ex.numpy()))
        assert torch.equal(got, ref), (n_have, n_cand, n_ex)
        if ref.numel():
            keep = torch.randperm(ref.numel(), generator=g)[:max(1, ref.numel() // 3)]
            sel = torch.from_numpy(kernels.select_sorted(ref.numpy(), keep.numpy()))
            assert torch.equal(sel, torch.sort(ref[keep]).values)


def test_numba_merge_update_against_a_sort():
    """SET's merge of kept and regrown positions against its torch definition (the pruned slots
    overwritten by the regrown positions, then a sort): the new positions, which entries are
    fresh, and the old slot of every kept entry, bit for bit; regrown positions given sorted
    (the skipped sort) and shuffled, before, between and after the kept ones, none or all of the
    entries pruned; outputs poisoned first."""
    from set_kernels.backends import numba as nb

    kernels = nb.index_kernels()
    if kernels is None:
        pytest.skip(nb.availability()[1])
    g = gen(13)
    for nnz, k, n in [(1, 1, 10), (7, 3, 50), (300, 90, 10**6), (300, 300, 2000), (5000, 1500, 10**12), (64, 1, 65)]:
        flat = torch.sort(torch.randperm(n, generator=g)[:nnz] if n < 10**7 else
                          torch.unique(torch.randint(0, n, (2 * nnz,), generator=g))[:nnz]).values
        nnz = flat.numel()
        prune_idx = torch.randperm(nnz, generator=g)[:k]
        free = torch.ones(n, dtype=torch.bool) if n < 10**7 else None
        if free is not None:
            free[flat] = False
            grow = torch.nonzero(free).view(-1)
            grow = grow[torch.randperm(grow.numel(), generator=g)[:k]]
        else:  # a huge range: fresh positions beyond the live ones' span and between them
            grow = torch.cat([flat[-1] + 1 + torch.arange(k // 2), flat[0] - 1 - torch.arange(k - k // 2)])
            grow = grow[grow >= 0][:k]
            k = grow.numel()
            prune_idx = prune_idx[:k]
        new = flat.clone()
        new[prune_idx] = grow
        ref_flat, ref_order = torch.sort(new)
        ref_fresh = torch.zeros(nnz, dtype=torch.bool)
        ref_fresh[prune_idx] = True
        ref_fresh = ref_fresh[ref_order]
        for given in (torch.sort(grow).values, grow):
            out_flat = torch.full((nnz,), -7, dtype=torch.int64)
            order = torch.full((nnz,), -7, dtype=torch.int64)
            fresh = torch.zeros(nnz, dtype=torch.bool)
            fresh_poison = ~ref_fresh  # every entry starts wrong
            fresh.copy_(fresh_poison)
            kernels.merge_update(flat.numpy(), prune_idx.numpy(), given.contiguous().numpy(), out_flat.numpy(),
                                 order.numpy(), fresh.numpy())
            assert torch.equal(out_flat, ref_flat), (nnz, k)
            assert torch.equal(fresh, ref_fresh), (nnz, k)
            assert torch.equal(order[~fresh], ref_order[~ref_fresh]), (nnz, k)
            # a regrown entry's slot: the pruned slots, the j-th smallest regrown one getting prune_idx[j]
            assert torch.equal(order[fresh], prune_idx), (nnz, k)


def test_numba_smallest_k_is_topks_set_or_declines():
    """SET's radix select against ``torch.topk(largest=False)``: where it answers, the same set of
    indices (ascending); where it declines, the k-th score is tied past the boundary or a score
    is NaN. Random, squared, negative, infinite and many-times-tied scores (zeros: regrown
    weights), -0.0 and +0.0 as one value, k of 1, a third and all; the output poisoned first."""
    from set_kernels.backends import numba as nb

    kernels = nb.index_kernels()
    if kernels is None:
        pytest.skip(nb.availability()[1])
    g = gen(21)
    answered = declined = 0
    cases = [torch.tensor([-0.0, 0.0, 1.0]), torch.tensor([float("nan"), 0.0, 1.0]),
             torch.tensor([float("inf"), 0.0, -float("inf"), 2.0]), torch.tensor([3.0])]
    for n in (2, 5, 100, 3000, 70_000):
        x = torch.randn(n, generator=g)
        zeros = x.square()
        zeros[:n // 2] = 0.0
        cases += [x, x.square(), -x.abs(), zeros, torch.randint(0, 5, (n,), generator=g).float(),
                  x.square() * 1e-30]  # subnormal and tiny scores
    for score in cases:
        n = score.numel()
        for k in sorted({1, max(1, n // 3), n}):
            out = torch.full((k,), -7, dtype=torch.int64)
            if kernels.smallest_k(score.view(torch.int32).numpy(), k, out.numpy()):
                answered += 1
                ref = torch.topk(score, k, largest=False).indices
                assert torch.equal(out, torch.sort(ref).values), (n, k)
            else:
                declined += 1
                s = torch.sort(score).values
                assert bool(torch.isnan(score).any()) or (k < n and s[k - 1] == s[k]), (n, k)
    assert answered > 20 and declined > 5


def test_numba_sort_positions_is_a_sort():
    """The radix sort of SET's draws against np.sort: below and above its np.sort cut-off, keys
    of 1 to 62 bits (one to six radix passes), repeats, all equal, sorted and reversed input;
    the input is left as it was."""
    np = pytest.importorskip("numpy")
    from set_kernels.backends import numba as nb

    kernels = nb.index_kernels()
    if kernels is None:
        pytest.skip(nb.availability()[1])
    rng = np.random.default_rng(11)
    m = kernels.RADIX_MIN
    cases = [np.zeros(0, np.int64), np.array([5], np.int64), rng.integers(0, 100, m - 1),
             rng.integers(0, 2, 3 * m), np.full(2 * m, 7, np.int64), np.zeros(m, np.int64)]
    for bits in (1, 11, 12, 22, 23, 40, 62):
        cases.append(rng.integers(0, 1 << bits, 5000, dtype=np.int64))
    cases += [np.arange(3000, dtype=np.int64), np.arange(3000, dtype=np.int64)[::-1].copy()]
    for a in cases:
        before = a.copy()
        got = kernels.sort_positions(a)
        np.testing.assert_array_equal(got, np.sort(a))
        np.testing.assert_array_equal(a, before)


def test_numba_gather_or_zero_and_flat_positions():
    """SET's permutation kernel against its torch definition (``index_select`` then zero the fresh
    rows), on raw bits of several dtypes and row widths (one-wide rows take a path of their
    own), empty, outputs poisoned first; and the live
    positions ``block_row * C + col_idx`` in int64 (past 2**31)."""
    from set_kernels.backends import numba as nb

    kernels = nb.index_kernels()
    if kernels is None:
        pytest.skip(nb.availability()[1])
    g = gen(5)
    for n, m, dtype in [(1, 1, torch.float32), (37, 1, torch.float64), (20_000, 1, torch.float32),
                        (300, 256, torch.bfloat16), (0, 4, torch.float32), (0, 1, torch.float32),
                        (7, 2, torch.float64)]:
        src = torch.randn(n, m, generator=g).to(dtype)
        order = torch.randperm(n, generator=g)
        fresh = torch.rand(n, generator=g) < 0.3
        ref = src.index_select(0, order).masked_fill_(fresh.view(-1, 1), 0)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[src.element_size()]
        out = torch.full_like(src, float("nan"))
        kernels.gather_or_zero(src.view(bits).numpy(), order.numpy(), fresh.numpy(), out.view(bits).numpy())
        assert torch.equal(out, ref), (n, m, dtype)
    row = torch.tensor([0, 3, 70_000], dtype=torch.int32)
    col = torch.tensor([5, 0, 69_999], dtype=torch.int32)
    flat = torch.full((3,), -1, dtype=torch.int64)
    kernels.flat_positions(row.numpy(), col.numpy(), 70_000, flat.numpy())
    assert flat.tolist() == [5, 3 * 70_000, 70_000 * 70_000 + 69_999]


def test_numba_scratch_from_huge_page_mappings(monkeypatch):
    """Scratch buffers from HUGE_PAGE_MIN_BYTES up come from an anonymous mapping (huge pages
    advised): writable, 64-byte aligned, and the element ops through them still match float64."""
    from set_kernels.backends import numba as nb

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    big = nb._new_buffer(nb.HUGE_PAGE_MIN_BYTES)
    assert big.nbytes == nb.HUGE_PAGE_MIN_BYTES and big.flags.writeable and big.ctypes.data % 64 == 0
    big[::4096] = 7
    assert int(big[4096]) == 7
    monkeypatch.setattr(nb, "HUGE_PAGE_MIN_BYTES", 0)  # every buffer from a mapping
    nb.release_workspace()
    try:
        layout = sk.BlockSparseLayout.random(90, 70, 1, 0.2, generator=gen(1))
        values = randn(layout.nnz_blocks, 1, 1, seed=2, dtype=torch.float64).requires_grad_()
        x = randn(33, 70, seed=3, dtype=torch.float64).requires_grad_()
        y = sk.ops.block_sparse_linear(x, values, layout, backend="numba")
        dy = randn(33, 90, seed=4, dtype=torch.float64)
        y.backward(dy)
        w = dense_ref(values.detach(), layout)
        torch.testing.assert_close(y, x.detach() @ w.T)
        torch.testing.assert_close(x.grad, dy @ w)
        torch.testing.assert_close(values.grad.reshape(-1), (dy.T @ x.detach())[layout.block_mask()].reshape(-1))
    finally:
        nb.release_workspace()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_forward_token_major_output(dtype):
    """The forward kernel writing its output token-major (the fused run's layers below the last):
    the row-major forward's values, transposed, bit for bit, with and without the ReLU + dropout
    epilogue, padding tokens zero; empty rows, density 0 and 1, outputs poisoned first."""
    from set_kernels.ops import _library

    np, spmm = _numba_spmm()
    rng = np.random.default_rng(6)
    itemsize = np.dtype(dtype).itemsize
    tile = 4 * 64 // itemsize
    act = np.array([1, 0x12345678, 0x9ABCDEF, int(0.3 * 2**32)], dtype=np.int64)
    for k, (R, C, density) in enumerate([(50, 70, 0.2), (1, 33, 0.5), (40, 1, 1.0), (20, 30, 0.0), (90, 64, 0.03)]):
        layout = sk.BlockSparseLayout.random(R, C, 1, density, generator=gen(10 + k))
        row_ptr, col_idx = (t.numpy() for t in _library.check_index(layout.index, R, C, 1)[:2])
        v = rng.standard_normal(layout.nnz_blocks).astype(dtype)
        bias = rng.standard_normal(R).astype(dtype)
        for M in (1, 5, tile - 1, tile + 9, 3 * tile + 1):
            x = rng.standard_normal((M, C)).astype(dtype)
            Mp = spmm.padded_tokens(M, itemsize)
            x_t = np.full((C, Mp), np.nan, dtype)
            spmm.transpose(x, x_t)
            for a, scale in ((spmm.NO_ACT, 1.0), (act, 1 / 0.7)):
                y = np.full((M, R), np.nan, dtype)
                y_t = np.full((R, Mp), np.nan, dtype)
                spmm._spmm_t(x_t, M, v, row_ptr, col_idx, col_idx, False, bias, True, y, spmm.ROW_CHUNK, a, scale,
                             False)
                spmm._spmm_t(x_t, M, v, row_ptr, col_idx, col_idx, False, bias, True, y_t, spmm.ROW_CHUNK, a, scale,
                             True)
                where = f"{R}x{C} d={density} M={M} act={bool(a[0])}"
                assert not np.isnan(y).any(), where
                np.testing.assert_array_equal(y_t[:, :M], y.T, err_msg=where)
                np.testing.assert_array_equal(y_t[:, M:], 0, err_msg=f"padding {where}")
            with pytest.raises(ValueError, match="token-major"):
                spmm._spmm_t(x_t, M, v, row_ptr, col_idx, col_idx, False, bias, True, np.empty((R, Mp + 16), dtype),
                             spmm.ROW_CHUNK, spmm.NO_ACT, 1.0, True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_transpose_act_grad(dtype):
    """The fused backward's first step against its definition: ``(dy * scale * (y > 0)).T`` with
    zero padding to whole vectors and the bias gradient (the sum over tokens), on edge sizes,
    outputs poisoned first."""
    np, spmm = _numba_spmm()
    rng = np.random.default_rng(4)
    itemsize = np.dtype(dtype).itemsize
    vl = 64 // itemsize
    group = spmm._TILE_GROUP * vl
    for M in (1, 7, vl, vl + 1, 40, 300):
        for n in (1, vl - 1, vl + 1, group - 1, group + 3, 200):
            dy = rng.standard_normal((M, n)).astype(dtype)
            y = rng.standard_normal((M, n)).astype(dtype)
            y[rng.random((M, n)) < 0.2] = 0  # dropped or not positive: no gradient
            y[rng.random((M, n)) < 0.02] = np.nan  # not positive either
            Mp = spmm.padded_tokens(M, itemsize)
            out = np.full((n, Mp), np.nan, dtype=dtype)
            dbias = np.full(n, np.nan, dtype=dtype)
            spmm.transpose_act_grad(dy, y, 1.25, out, dbias)
            g = np.where(y > 0, dy * np.dtype(dtype).type(1.25), 0).astype(dtype)  # the kernel's rounding of scale
            np.testing.assert_array_equal(out[:, :M], g.T, err_msg=f"M={M} n={n}")
            np.testing.assert_array_equal(out[:, M:], 0, err_msg=f"padding M={M} n={n}")
            tol = 1e-5 if dtype == "float32" else 1e-12
            np.testing.assert_allclose(dbias, g.astype(np.float64).sum(0), rtol=tol, atol=tol * M)
            in_order = np.zeros(n, dtype=dtype)
            for row in g:  # the documented order: token after token, from +0
                in_order = in_order + row
            np.testing.assert_array_equal(dbias, in_order, err_msg=f"bias gradient order M={M} n={n}")
            # the same on token-major operands, in place (the fused run's layers below the last)
            g_t = np.full((n, Mp), np.nan, dtype=dtype)
            g_t[:, :M] = dy.T
            y_t = np.full((n, Mp), np.nan, dtype=dtype)
            y_t[:, :M] = y.T
            dbias2 = np.full(n, np.nan, dtype=dtype)
            spmm.act_grad_tm(g_t, y_t, M, 1.25, dbias2)
            np.testing.assert_array_equal(g_t[:, :M], g.T, err_msg=f"tm M={M} n={n}")
            assert np.isnan(g_t[:, M:]).all(), "act_grad_tm wrote past the tokens"
            np.testing.assert_allclose(dbias2, g.astype(np.float64).sum(0), rtol=tol, atol=tol * M)



@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_dense_readout_kernels_against_fp64(dtype):
    """The fused run's dense readout (``readout_forward_t``, ``readout_backward_t``) against float64
    on edge sizes (one output and ``READOUT_MAX``, groups of outputs that do not divide them,
    features not a whole number of vectors or chunks, 1 to 255 tokens), outputs poisoned first:
    ``y = a @ w.T + b``; ``dh = (dy @ w) * scale`` where ``a > 0`` (token-major, padding zero) and
    its sum over tokens; ``dw = dy.T @ a``, or ``dw`` left alone when not needed. The sums do not
    depend on the number of threads (same bits with one thread)."""
    np, spmm = _numba_spmm()
    rng = np.random.default_rng(12)
    itemsize = np.dtype(dtype).itemsize
    vl = 64 // itemsize
    eps = np.finfo(dtype).eps
    for n_out, n_in, M in [(1, 1, 1), (10, 4000, 40), (spmm.READOUT_MAX, 100, 200), (7, spmm.READOUT_CHUNK + 1, 65),
                           (13, vl - 1, 5), (3, vl * 4 * 2 + 5, 255), (6, 33, vl)]:
        where = f"n_out={n_out} n_in={n_in} M={M}"
        Mp = spmm.padded_tokens(M, itemsize)
        a = np.maximum(rng.standard_normal((M, n_in)), 0).astype(dtype)  # a ReLU's output: zeros too
        a_t = np.zeros((n_in, Mp), dtype)
        a_t[:, :M] = a.T
        w = rng.standard_normal((n_out, n_in)).astype(dtype)
        bias = rng.standard_normal(n_out).astype(dtype)
        y = np.full((M, n_out), np.nan, dtype)
        part = np.full((spmm.readout_chunks(n_in), n_out, Mp), np.nan, dtype)
        spmm.readout_forward_t(a_t, M, w, bias, True, y, part)
        a64, w64 = a.astype(np.float64), w.astype(np.float64)
        ref = a64 @ w64.T + bias
        bound = np.abs(a64) @ np.abs(w64).T + np.abs(bias)  # sum of |terms|
        assert np.all(np.abs(y - ref) <= 32 * eps * bound + 1e-300), where
        y_nb = np.full_like(y, np.nan)
        spmm.readout_forward_t(a_t, M, w, bias, False, y_nb, part)
        np.testing.assert_allclose(y_nb, ref - bias, rtol=0, atol=float((32 * eps * bound).max()), err_msg=where)

        dy = rng.standard_normal((M, n_out)).astype(dtype)
        dy_t = np.zeros((n_out, Mp), dtype)
        dy_t[:, :M] = dy.T
        scale = 1.25
        dh_t = np.full((n_in, Mp), np.nan, dtype)
        dw = np.full((n_out, n_in), np.nan, dtype)
        dbias = np.full(n_in, np.nan, dtype)
        spmm.readout_backward_t(dy_t, a_t, M, w, scale, dh_t, dw, True, dbias)
        dy64 = dy.astype(np.float64)
        dh = np.where(a > 0, (dy64 @ w64) * scale, 0)
        dh_bound = (np.abs(dy64) @ np.abs(w64)) * scale
        assert np.all(np.abs(dh_t[:, :M].T - dh) <= 32 * eps * dh_bound + 1e-300), where
        np.testing.assert_array_equal(dh_t[:, M:], 0, err_msg=f"padding {where}")
        assert np.all(np.abs(dbias - dh.sum(0)) <= 32 * eps * (M + 8) * dh_bound.sum(0) + 1e-300), where
        dw_bound = np.abs(dy64).T @ np.abs(a64)
        assert np.all(np.abs(dw - dy64.T @ a64) <= 32 * eps * dw_bound + 1e-300), where
        untouched = np.full_like(dw, np.nan)
        dh_t2 = np.full_like(dh_t, np.nan)
        spmm.readout_backward_t(dy_t, a_t, M, w, scale, dh_t2, untouched, False, dbias)
        assert np.isnan(untouched).all(), "dw written though not needed"
        np.testing.assert_array_equal(dh_t2, dh_t, err_msg=where)
        import numba

        threads = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            y1, dw1, dh1 = np.full_like(y, np.nan), np.full_like(dw, np.nan), np.full_like(dh_t, np.nan)
            spmm.readout_forward_t(a_t, M, w, bias, True, y1, part)
            spmm.readout_backward_t(dy_t, a_t, M, w, scale, dh1, dw1, True, np.full_like(dbias, np.nan))
        finally:
            numba.set_num_threads(threads)
        for got, ref_ in ((y1, y), (dw1, dw), (dh1, dh_t)):
            np.testing.assert_array_equal(got, ref_, err_msg=f"one thread: {where}")
    with pytest.raises(ValueError, match="n_out <= READOUT_MAX"):
        big = spmm.READOUT_MAX + 1
        spmm.readout_forward_t(a_t, M, np.zeros((big, n_in), dtype), np.zeros(big, dtype), True,
                               np.empty((M, big), dtype), np.empty((spmm.readout_chunks(n_in), big, Mp), dtype))
    with pytest.raises(ValueError, match="shapes"):
        spmm.readout_backward_t(dy_t, a_t, M, w, scale, dh_t[:-1], dw, True, dbias)


def test_exact_kernels_keep_their_flags_when_a_fast_math_function_compiles_them_first():
    """numba compiles a kernel that leaves ``fastmath`` unset with the flags of the jitted function
    whose compilation first reaches it, and keeps that variant for the signature. The element
    kernels that must be exact (IEEE comparisons, sums in their written order) are called from the
    fast-math wrappers (``linear_backward``, ``grads_t``), so their flags must hold whoever
    compiles them first: a fresh copy of ``transpose_act_grad`` with the kernels' flags, compiled
    by a fast-math caller, still reads ``NaN > 0`` as false (its scalar tail too) and its IR
    carries no fast-math flag."""
    np, spmm = _numba_spmm()
    from numba import njit

    flags = {k: v for k, v in spmm._EXACT.items() if k != "cache"}
    kernel = njit(**flags)(spmm.transpose_act_grad.py_func)

    @njit(fastmath=True)
    def fast_caller(dy, y, out, dbias):
        kernel(dy, y, 1.25, out, dbias)

    M, n = 3, 16 * spmm._TILE_GROUP + 7  # one whole group of tiles, then a scalar tail
    dy = np.ones((M, n), dtype=np.float32)
    y = np.ones((M, n), dtype=np.float32)
    y[:, 3] = np.nan
    y[:, n - 4:] = np.nan
    out = np.full((n, spmm.padded_tokens(M, 4)), np.nan, dtype=np.float32)
    dbias = np.full(n, np.nan, dtype=np.float32)
    fast_caller(dy, y, out, dbias)
    assert len(kernel.signatures) == 1
    expect = np.where(y > 0, np.float32(1.25), np.float32(0)).T
    np.testing.assert_array_equal(out[:, :M], expect)
    ir = kernel.inspect_llvm(kernel.signatures[0])
    for flag in (" fast ", " nnan ", " reassoc "):
        assert flag not in ir, f"the kernel was compiled with the caller's fast-math flag {flag.strip()!r}"


@pytest.mark.parametrize("block_size", [1, 16])
def test_ops_take_non_contiguous_dense_operands(block_size):
    """The ops called directly (``torch.ops.set_kernels``) with transposed views for ``x`` and
    ``dy`` give what they give on contiguous copies, bit for bit: the numba kernels read whole
    rows as vectors, so the backend makes its dense operands contiguous first."""
    lin = sk.nn.SparseLinear(50, 37, density=0.4, block_size=block_size, generator=gen(5))
    index = lin.layout.index
    x = randn(50, 9, seed=6).t()  # (9, 50), not contiguous
    dy = randn(37, 9, seed=7).t()
    assert not x.is_contiguous() and not dy.is_contiguous()
    ops = torch.ops.set_kernels
    with sk.backends.use("numba"):
        pairs = [
            (ops.linear_forward(x, lin.values, index, lin.bias, 37, 50, block_size),
             ops.linear_forward(x.contiguous(), lin.values, index, lin.bias, 37, 50, block_size)),
            (ops.linear_grad_input(dy, lin.values, index, 37, 50, block_size),
             ops.linear_grad_input(dy.contiguous(), lin.values, index, 37, 50, block_size)),
            (ops.linear_grad_weight(dy, x, index, 37, 50, block_size),
             ops.linear_grad_weight(dy.contiguous(), x.contiguous(), index, 37, 50, block_size)),
        ]
    for got, want in pairs:
        assert torch.equal(got, want)
    w = sk.ops.to_dense(lin.values.detach(), lin.layout).double()
    ref = torch.nn.functional.linear(x.double(), w, lin.bias.detach().double())
    torch.testing.assert_close(pairs[0][1].double(), ref, rtol=1e-5, atol=1e-5)
