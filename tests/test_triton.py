"""The triton backend against the float64 reference: block-sparse linear (forward, dX, dW through
autograd), element sparsity (block_size=1, the CSR kernels of spmm.py), deterministic split-K,
fused masked Adam/AdamW, dispatch and flags.

Without a GPU (CI) conftest sets TRITON_INTERPRET=1, so the kernels run in triton's interpreter on
CPU tensors; the interpreter is slow, so the sizes here stay small (at most 256). With a CUDA
device the same tests run compiled, on CUDA tensors, with larger sizes (and block size 128 in
the full grid).
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import set_kernels as sk
from conftest import TRITON_INTERPRETED, TOL, assert_close_scaled, gen, linear_ref, randn, require_backend
from set_kernels import backends

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda") if ON_GPU else torch.device("cpu")
BSL = sk.BlockSparseLayout
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
# Block sizes of the full dtype x block grid (128 is checked once more below, also interpreted).
BLOCKS = [16, 32, 64, 128] if ON_GPU else [16, 32, 64]


@pytest.fixture(autouse=True)
def _triton():
    """Every test here needs the triton backend (a failure, not a skip, when it is interpreting)."""
    require_backend("triton")


def shape_for(b: int):
    """(rows, cols, tokens): partial edge blocks in both directions, several blocks per row."""
    if ON_GPU:
        return 8 * b + b // 2 + 3, 6 * b + 5, 1000
    return 3 * b + b // 2 + 3, 2 * b + 5, 37


def make_problem(rows, cols, b, density, tokens, dtype, *, bias=True, seed=0, lead=()):
    """Layout, values, x, bias, dy on DEVICE (values random also beyond the matrix edges)."""
    layout = BSL.random(rows, cols, b, density, generator=gen(seed))
    values = randn(layout.nnz_blocks, b, b, dtype=dtype, seed=seed + 1)
    x = randn(*lead, tokens, cols, dtype=dtype, seed=seed + 2)
    bvec = randn(rows, dtype=dtype, seed=seed + 3) if bias else None
    dy = randn(*lead, tokens, rows, dtype=dtype, seed=seed + 4)
    return layout, values, x, bvec, dy


def run_linear(layout, values, x, bias, dy, backend):
    """Forward + backward through the public op on DEVICE; returns (y, dx, dvalues, dbias) on CPU."""
    layout = layout.to(DEVICE)
    values, x = values.detach().to(DEVICE).requires_grad_(), x.detach().to(DEVICE).requires_grad_()
    bias = None if bias is None else bias.detach().to(DEVICE).requires_grad_()
    y = sk.ops.block_sparse_linear(x, values, layout, bias, backend=backend)
    y.backward(dy.to(DEVICE))
    out = (y, x.grad, values.grad, None if bias is None else bias.grad)
    return tuple(None if t is None else t.detach().cpu() for t in out)


def check_against_reference(ours, theirs, ref, dtype, what):
    """fp32: within TOL of the float64 reference; fp16/bf16: error at most 2x torch's own error
    for the same computation in the same dtype (plus half an ulp of the result scale)."""
    assert ours.dtype == dtype, f"{what}: dtype {ours.dtype}"
    if dtype == torch.float32:
        assert_close_scaled(ours, ref, TOL[torch.float32], what)
        return
    assert ours.shape == ref.shape, what
    a = ours.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite entries (an element was not written?)"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item()
    err = (a - ref).abs().max().item()
    err_torch = (theirs.double() - ref).abs().max().item()
    half_ulp = 0.5 * torch.finfo(dtype).eps * scale
    assert err <= max(2 * err_torch, half_ulp), f"{what}: error {err:.3e} > 2 x torch's {err_torch:.3e}"


def check_linear(layout, values, x, bias, dy, dtype):
    ours = run_linear(layout, values, x, bias, dy, "triton")
    theirs = run_linear(layout, values, x, bias, dy, "torch") if dtype != torch.float32 else ours
    refs = linear_ref(x, values, layout, bias, dy)
    for name, a, t, r in zip(("y", "dx", "dvalues", "dbias"), ours, theirs, refs):
        if r is None:
            assert a is None, name
            continue
        check_against_reference(a, t, r, dtype, name)


# ------------------------------------------------------------------ block-sparse linear
@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_linear_dtype_block_grid(dtype, b, poison_alloc):
    rows, cols, tokens = shape_for(b)
    check_linear(*make_problem(rows, cols, b, 0.5, tokens, dtype, seed=b), dtype)


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_linear_densities(dtype, density, poison_alloc):
    b = 32
    rows, cols, tokens = shape_for(b)
    has_bias = density != 0.3  # density 0 with a bias: y is the bias
    check_linear(*make_problem(rows, cols, b, density, tokens, dtype, bias=has_bias, seed=7), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_block_128(dtype, poison_alloc):
    """Block size 128 with edges, also when interpreting (one small case)."""
    rows, cols, tokens = (300, 200, 65) if not ON_GPU else (1100, 900, 700)
    check_linear(*make_problem(rows, cols, 128, 0.5, tokens, dtype, seed=3), dtype)


def test_linear_leading_dims_and_many_token_tiles(poison_alloc):
    """x (2, T, cols) with T spanning several token tiles and a remainder (tile 64 interpreted)."""
    tokens = 70 if not ON_GPU else 1500
    check_linear(*make_problem(100, 90, 16, 0.5, tokens, torch.float32, seed=5, lead=(2,)), torch.float32)


def test_linear_no_tokens():
    layout, values, x, bias, dy = make_problem(40, 50, 16, 0.5, 0, torch.float32)
    y, dx, dv, db = run_linear(layout, values, x, bias, dy, "triton")
    assert y.shape == (0, 40) and dx.shape == (0, 50)
    assert torch.equal(dv, torch.zeros_like(dv)) and torch.equal(db, torch.zeros_like(db))


def test_edge_of_values_is_ignored(poison_alloc):
    """NaN beyond the matrix edges of the values changes nothing, and dW is exactly 0 there."""
    layout, values, x, bias, dy = make_problem(40, 50, 16, 1.0, 9, torch.float32, seed=11)
    clean = run_linear(layout, values, x, bias, dy, "triton")
    dirty_values = values.clone()
    edge = sk.ops.from_dense(torch.ones(40, 50, dtype=torch.float32), layout) == 0
    dirty_values[edge] = float("nan")
    dirty = run_linear(layout, dirty_values, x, bias, dy, "triton")
    for a, c in zip(dirty[:2], clean[:2]):
        assert torch.equal(a, c)
    assert torch.equal(dirty[2][edge], torch.zeros_like(dirty[2][edge]))


# ------------------------------------------------------------------------------ split-K
def _grad_weight_problem(dtype, tokens, b=32, density=0.2, seed=21):
    rows, cols = 3 * b + 7, 2 * b + 9
    layout = BSL.random(rows, cols, b, density, generator=gen(seed)).to(DEVICE)
    dy = randn(tokens, rows, dtype=dtype, seed=seed + 1).to(DEVICE)
    x = randn(tokens, cols, dtype=dtype, seed=seed + 2).to(DEVICE)
    return layout, dy, x


def _grad_weight_module():
    # (the package attribute linear_grad_weight is the op function, which shadows the submodule)
    return importlib.import_module("set_kernels.backends.triton.linear_grad_weight")


def _grad_weight(layout, dy, x, splits):
    return _grad_weight_module().linear_grad_weight(dy, x, layout.block_row, layout.col_idx, *layout.shape, layout.block_size, splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_split_k_matches_reference_and_is_deterministic(dtype, poison_alloc):
    tokens = 250 if not ON_GPU else 20000
    layout, dy, x = _grad_weight_problem(dtype, tokens)
    assert layout.nnz_blocks > 0
    ref = linear_ref(x.cpu(), torch.zeros(layout.nnz_blocks, 32, 32), layout.to("cpu"), None, dy.cpu())[2]
    theirs = torch.einsum("mi,mj->ij", dy.cpu(), x.cpu())  # torch's own dtype error, dense
    from conftest import blocks_ref

    theirs = blocks_ref(theirs.double(), layout.to("cpu")).to(dtype)
    plain = _grad_weight(layout, dy, x, 1).cpu()
    for splits in (3, 4):
        first = _grad_weight(layout, dy, x, splits).cpu()
        second = _grad_weight(layout, dy, x, splits).cpu()
        assert torch.equal(first, second), f"split-K with {splits} splits is not bit-reproducible"
        check_against_reference(first, theirs, ref, dtype, f"dv, {splits} splits")
    check_against_reference(plain, theirs, ref, dtype, "dv, no split")


def test_split_k_rule_and_second_pass(monkeypatch):
    """The automatic rule splits when there are few blocks and many tokens, using the second pass."""
    from set_kernels.backends.triton import _common

    mod = _grad_weight_module()

    sms = _common.num_sms(DEVICE)
    assert mod.choose_splits(10 * sms, 1 << 20, sms) == 1  # enough blocks
    assert mod.choose_splits(1, 2 * mod.SPLIT_MIN_TOKENS - 1, sms) == 1  # too few tokens
    assert mod.choose_splits(1, 1 << 20, sms) == min(2 * sms, (1 << 20) // mod.SPLIT_MIN_TOKENS, mod.MAX_SPLITS)

    monkeypatch.setattr(mod, "SPLIT_MIN_TOKENS", 32)
    layout, dy, x = _grad_weight_problem(torch.float32, 200, density=0.1)
    assert 0 < layout.nnz_blocks < sms or not ON_GPU
    calls = []
    original = mod._sum_splits_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return original[grid]

    monkeypatch.setattr(mod, "_sum_splits_kernel", Spy())
    # Through the public op (autograd -> linear_grad_weight with the automatic rule).
    values = torch.zeros(layout.nnz_blocks, 32, 32, device=DEVICE, requires_grad=True)
    sk.ops.block_sparse_linear(x, values, layout, backend="triton").backward(dy)
    expected = mod.choose_splits(layout.nnz_blocks, 200, sms)
    assert expected > 1 and len(calls) == 1
    ref = linear_ref(x.cpu(), values.detach().cpu(), layout.to("cpu"), None, dy.cpu())[2]
    assert_close_scaled(values.grad.cpu(), ref, TOL[torch.float32], "dv through the split-K rule")


def test_grad_weight_bad_splits():
    layout, dy, x = _grad_weight_problem(torch.float32, 20)
    with pytest.raises(ValueError, match="splits"):
        _grad_weight(layout, dy, x, 0)


# ------------------------------------------------------------------ element sparsity (b = 1)
# Through the public op with block_size=1, which the triton package routes to the CSR kernels of
# set_kernels/backends/triton/spmm.py (SpMM forward / dX, SDDMM dW). Interpreted token tile: 16.
B1_TOKENS = 1000 if ON_GPU else 37  # 3 token tiles of 16 when interpreting, with a remainder


def _spmm_module():
    return importlib.import_module("set_kernels.backends.triton.spmm")


@pytest.mark.parametrize("rows,cols,density", [(130, 70, 0.3), (37, 53, 0.05), (1, 1, 1.0)],
                         ids=["130x70", "37x53-d0.05", "1x1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_b1_linear_dtypes_and_odd_sizes(dtype, rows, cols, density, poison_alloc):
    """fp32 within TOL of float64; fp16/bf16 within 2x of torch's own F.linear error (check_linear)."""
    problem = make_problem(rows, cols, 1, density, B1_TOKENS, dtype, seed=rows + cols)
    layout = problem[0]
    if density == 0.05:  # random at 5 %: some rows and some columns have no entry at all
        mask = layout.element_mask()
        assert (~mask.any(1)).any() and (~mask.any(0)).any()
    check_linear(*problem, dtype)


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_b1_linear_density_0_and_1(dtype, density, poison_alloc):
    """Density 1: rows of 53 entries (several 16-entry chunks); density 0: y is the bias, dx is 0."""
    problem = make_problem(37, 53, 1, density, B1_TOKENS, dtype, seed=3)
    assert problem[0].nnz_blocks == round(density * 37 * 53)
    check_linear(*problem, dtype)
    if density == 0.0:
        layout, values, x, bias, dy = problem
        y, dx, dv, db = run_linear(layout, values, x, bias, dy, "triton")
        assert torch.equal(y, bias.expand_as(y)) and torch.equal(dx, torch.zeros_like(dx)) and dv.shape == (0, 1, 1)


def _handmade_b1_layout():
    """6 x 7 CSR: rows 0 and 3 empty, columns 2 and 5 empty."""
    row_ptr = torch.tensor([0, 0, 3, 4, 4, 9, 10])
    col_idx = torch.tensor([0, 3, 6, 1, 0, 1, 3, 4, 6, 6])
    return BSL.from_csr(row_ptr, col_idx, 1, (6, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_b1_handmade_layout_empty_rows_and_cols(dtype, poison_alloc):
    layout = _handmade_b1_layout()
    values = randn(layout.nnz_blocks, 1, 1, dtype=dtype, seed=1)
    x = randn(B1_TOKENS, 7, dtype=dtype, seed=2)
    bias = randn(6, dtype=dtype, seed=3)
    dy = randn(B1_TOKENS, 6, dtype=dtype, seed=4)
    check_linear(layout, values, x, bias, dy, dtype)
    y, dx, dv, db = run_linear(layout, values, x, bias, dy, "triton")
    for r in (0, 3):  # no entries: exactly the bias
        assert torch.equal(y[:, r], bias[r].expand(B1_TOKENS)), r
    for c in (2, 5):  # no entries: exactly 0
        assert torch.equal(dx[:, c], torch.zeros(B1_TOKENS, dtype=dtype)), c
    # every other output depends on its entries (not a bias / zero copy)
    assert not torch.equal(y[:, 1], bias[1].expand(B1_TOKENS))


def test_b1_leading_dims_and_many_token_tiles(poison_alloc):
    """x (2, 3, T, cols): 150 tokens interpreted = 10 forward token tiles and 3 dW token chunks of 64."""
    tokens = 25 if not ON_GPU else 700
    problem = make_problem(37, 53, 1, 0.5, tokens, torch.float32, seed=9, lead=(2, 3))
    check_linear(*problem, torch.float32)
    y = run_linear(*problem, "triton")[0]
    assert y.shape == (2, 3, tokens, 37)


@pytest.mark.parametrize("bias", [True, False])
def test_b1_no_tokens(bias, poison_alloc):
    layout, values, x, bvec, dy = make_problem(37, 53, 1, 0.3, 0, torch.float32, bias=bias)
    y, dx, dv, db = run_linear(layout, values, x, bvec, dy, "triton")
    assert y.shape == (0, 37) and dx.shape == (0, 53) and dv.shape == (layout.nnz_blocks, 1, 1)
    assert torch.equal(dv, torch.zeros_like(dv))
    if bias:
        assert torch.equal(db, torch.zeros_like(db))


def test_b1_routes_to_the_csr_kernels(monkeypatch):
    """block_size 1 reaches spmm.py (and not the block kernels); other block sizes do not."""
    from set_kernels.backends import triton as tb

    spmm = _spmm_module()
    calls = []
    for module, names in ((spmm, ("spmm_forward", "spmm_grad_input", "spmm_grad_weight")),
                          (tb, ("_block_forward", "_block_grad_input", "_block_grad_weight"))):
        for name in names:
            original = getattr(module, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, spy)
    run_linear(*make_problem(20, 30, 1, 0.3, 5, torch.float32), "triton")
    assert sorted(calls) == ["spmm_forward", "spmm_grad_input", "spmm_grad_weight"]
    calls.clear()
    run_linear(*make_problem(20, 30, 16, 1.0, 5, torch.float32), "triton")
    assert sorted(calls) == ["_block_forward", "_block_grad_input", "_block_grad_weight"]
    assert 1 in tb.BLOCK_SIZES and backends.resolve("triton", "linear_forward", DEVICE, torch.float32, 1) == "triton"


def _spmm_raw(inp, values, ptr, idx, perm, bias, n_out, n_in, block_m, block_r, num_warps=4):
    """One launch of the SpMM kernel with a given (BLOCK_M, BLOCK_R), bypassing the autotuner."""
    import triton

    from set_kernels.backends.triton import _common

    spmm = _spmm_module()
    M = inp.shape[0]
    out = torch.empty(M, n_out, dtype=inp.dtype, device=inp.device)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(n_out, block_r),)
    spmm._spmm_kernel.fn[grid](
        inp.t().contiguous(), values.reshape(-1), ptr, idx, idx if perm is None else perm,
        out if bias is None else bias, out, M, n_out, n_in, 0, 0, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
        INTERPRETED=_common.INTERPRET, LOG_K=spmm.LOG_KC, BLOCK_M=block_m, BLOCK_R=block_r, num_warps=num_warps)
    return out


def _sddmm_raw(dy, x, row, col, rows, cols, block_e, num_warps=4):
    import triton

    from set_kernels.backends.triton import _common

    spmm = _spmm_module()
    M, nnz = dy.shape[0], row.numel()
    out = torch.empty(nnz, 1, 1, dtype=dy.dtype, device=dy.device)
    spmm._sddmm_kernel.fn[(triton.cdiv(nnz, block_e),)](
        dy.t().contiguous(), x.t().contiguous(), row, col, out, M, nnz, rows, cols, 0, 0,
        INTERPRETED=_common.INTERPRET, LOG_T=spmm.LOG_TOK, BLOCK_E=block_e, num_warps=num_warps)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_b1_bit_identical_across_launch_configs_and_runs(dtype, poison_alloc):
    """The reduction order is fixed by the data (KC / TOK chunks, pairwise tree), not by the
    autotuned tile: y, dx and dv are bit-identical across configs and across runs."""
    from set_kernels.backends import triton as tb

    layout, values, x, bias, dy = make_problem(37, 53, 1, 0.4, 40, dtype, seed=13)
    layout, values, x, bias, dy = layout.to(DEVICE), values.to(DEVICE), x.to(DEVICE), bias.to(DEVICE), dy.to(DEVICE)
    rows, cols = layout.shape
    y = tb.linear_forward(x, values, layout.row_ptr, layout.col_idx, bias, rows, cols, 1)
    dx = tb.linear_grad_input(dy, values, layout.col_ptr, layout.row_idx, layout.perm, rows, cols, 1)
    dv = tb.linear_grad_weight(dy, x, layout.block_row, layout.col_idx, rows, cols, 1)
    assert torch.equal(y, tb.linear_forward(x, values, layout.row_ptr, layout.col_idx, bias, rows, cols, 1))
    assert torch.equal(dx, tb.linear_grad_input(dy, values, layout.col_ptr, layout.row_idx, layout.perm, rows, cols, 1))
    assert torch.equal(dv, tb.linear_grad_weight(dy, x, layout.block_row, layout.col_idx, rows, cols, 1))
    for bm, br, w in [(16, 2, 4), (64, 8, 8)]:
        got = _spmm_raw(x, values, layout.row_ptr, layout.col_idx, None, bias, rows, cols, bm, br, w)
        assert torch.equal(got, y), ("y", bm, br, w)
        got = _spmm_raw(dy, values, layout.col_ptr, layout.row_idx, layout.perm, None, cols, rows, bm, br, w)
        assert torch.equal(got, dx), ("dx", bm, br, w)
    for be, w in [(16, 4), (128, 8)]:
        assert torch.equal(_sddmm_raw(dy, x, layout.block_row, layout.col_idx, rows, cols, be, w), dv), ("dv", be, w)
    ref = linear_ref(x.cpu(), values.cpu(), layout.to("cpu"), bias.cpu(), dy.cpu())
    assert_close_scaled(y.cpu(), ref[0], 1e-4 if dtype == torch.float32 else 2 ** -8, "y")


def test_b1_rejects_block_shaped_values_and_options():
    """Block-shaped values on an element layout are refused by the public op (naming values);
    the backend function refuses split-K options at b = 1."""
    from set_kernels.backends import triton as tb

    layout, values, x, bias, dy = make_problem(20, 30, 1, 0.3, 5, torch.float32)
    layout, x, dy = layout.to(DEVICE), x.to(DEVICE), dy.to(DEVICE)
    with pytest.raises(ValueError, match=r"values: expected shape \(\d+, 1, 1\)"):
        sk.ops.block_sparse_linear(x, torch.zeros(layout.nnz_blocks, 2, 2, device=DEVICE), layout, backend="triton")
    with pytest.raises(TypeError, match="no options"):
        tb.linear_grad_weight(dy, x, layout.block_row, layout.col_idx, 20, 30, 1, splits=2)


def test_b1_autotune_config_pruning():
    spmm = _spmm_module()
    assert len(spmm.SPMM_CONFIGS) > 1 and len(spmm.SDDMM_CONFIGS) > 1
    for m_bucket in (16, 32, 64, 1 << 20):
        kept = spmm._prune_spmm(spmm.SPMM_CONFIGS, {}, M_BUCKET=m_bucket)
        assert kept and all(c in spmm.SPMM_CONFIGS for c in kept)
        assert all(c.kwargs["BLOCK_M"] <= m_bucket for c in kept)
    assert len(spmm._prune_spmm(spmm.SPMM_CONFIGS, {}, M_BUCKET=1 << 20)) == len(spmm.SPMM_CONFIGS)
    # the tile of every config fits a modest register budget (fp32, elements per thread)
    for c in spmm.SPMM_CONFIGS:
        assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_R"] * (1 << spmm.LOG_KC) // (32 * c.num_warps) <= 64
    for c in spmm.SDDMM_CONFIGS:
        assert c.kwargs["BLOCK_E"] * (1 << spmm.LOG_TOK) // (32 * c.num_warps) <= 64


# ---------------------------------------------------------------------------- masked Adam
ADAM_SHAPES = [(5000,), (3, 7), (130, 70), (1,), (0, 4)] if not ON_GPU else [(1 << 20,), (3, 7), (1000, 777), (1,)]


def adam_ref(p, g, m, v, mask, *, step, lr, beta1, beta2, eps, weight_decay, decoupled, grad_scale):
    """float64 masked Adam/AdamW step; returns (p, m, v) in float64."""
    p, g, m, v = (t.detach().double().cpu() for t in (p, g, m, v))
    if grad_scale is not None:
        g = g / float(grad_scale)
    if weight_decay:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1 ** step) * m / (v.sqrt() / math.sqrt(1 - beta2 ** step) + eps)
    if mask is not None:
        keep = mask.cpu()
        p, m, v = (torch.where(keep, t, torch.zeros_like(t)) for t in (p, m, v))
    return p, m, v


def make_adam_state(p_dtype, s_dtype=torch.float32, seed=0, shapes=ADAM_SHAPES, masks_every=(True, False)):
    ps, gs, ms, vs, ks = [], [], [], [], []
    for i, s in enumerate(shapes):
        n = math.prod(s)
        ps.append(randn(*s, dtype=p_dtype, seed=seed + 10 * i).to(DEVICE))
        gs.append(randn(*s, dtype=p_dtype, seed=seed + 10 * i + 1, scale=3.0).to(DEVICE))
        ms.append(randn(*s, dtype=s_dtype, seed=seed + 10 * i + 2, scale=0.1).to(DEVICE))
        vs.append((randn(*s, dtype=torch.float64, seed=seed + 10 * i + 3) ** 2).to(s_dtype).to(DEVICE))
        if masks_every[i % len(masks_every)] and n:
            ks.append((torch.rand(*s, generator=gen(seed + 10 * i + 4)) > 0.3).to(DEVICE))
        else:
            ks.append(None)
    return ps, gs, ms, vs, ks


def _check_state(got, ref, dtype, what):
    """got (dtype) against a float64 reference: within an ulp of dtype (fp32: a few ulps)."""
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), what
    if dtype == torch.float32:
        tol = 4e-6 * ref.abs() + 1e-7 * max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)
    else:
        tol = torch.finfo(dtype).eps * ref.abs() + 1e-7
    bad = (got - ref).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} entries off, max error {(got - ref).abs().max():.3e}"


@pytest.mark.parametrize("decoupled,weight_decay", [(True, 0.1), (False, 0.1), (False, 0.0)],
                         ids=["AdamW", "Adam-L2", "Adam"])
@pytest.mark.parametrize("p_dtype", DTYPES, ids=DT_IDS)
def test_masked_adam_matches_reference(p_dtype, decoupled, weight_decay):
    ps, gs, ms, vs, ks = make_adam_state(p_dtype, seed=int(decoupled) * 7 + int(weight_decay * 10))
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=weight_decay)
    grad_scale = torch.tensor([8.0], device=DEVICE)
    refs = [adam_ref(p, g, m, v, k, step=3, decoupled=decoupled, grad_scale=8.0, **hyper)
            for p, g, m, v, k in zip(ps, gs, ms, vs, ks)]
    sk.ops.masked_adam_(ps, gs, ms, vs, ks, step=3, decoupled_weight_decay=decoupled, grad_scale=grad_scale,
                        found_inf=torch.zeros(1, device=DEVICE), backend="triton", **hyper)
    for i, (p, m, v, k, (rp, rm, rv)) in enumerate(zip(ps, ms, vs, ks, refs)):
        # p is rounded from an fp32 result: compare against the float64 value within one rounding.
        _check_state(p, rp, p_dtype, f"params[{i}]")
        _check_state(m, rm, torch.float32, f"exp_avgs[{i}]")
        _check_state(v, rv, torch.float32, f"exp_avg_sqs[{i}]")
        if k is not None:
            dead = ~k
            for t in (p, m, v):
                assert torch.equal(t[dead], torch.zeros_like(t[dead])), f"masked entries of [{i}] not exactly 0"
            assert dead.any() and k.any()


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_adam_matches_torch_backend_over_steps(p_dtype):
    """Several steps against the torch backend, moments in the param dtype for bf16."""
    s_dtype = p_dtype
    a = make_adam_state(p_dtype, s_dtype, seed=3)
    b = [[t if t is None else t.clone() for t in lst] for lst in a]
    for step in range(1, 4):
        grads = [randn(*p.shape, dtype=p_dtype, seed=100 * step + i).to(DEVICE) for i, p in enumerate(a[0])]
        kw = dict(step=step, lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.01, decoupled_weight_decay=True)
        sk.ops.masked_adam_(a[0], grads, a[2], a[3], a[4], backend="triton", **kw)
        sk.ops.masked_adam_(b[0], grads, b[2], b[3], b[4], backend="torch", **kw)
    for lst_a, lst_b, what in zip((a[0], a[2], a[3]), (b[0], b[2], b[3]), ("p", "m", "v")):
        for x, y in zip(lst_a, lst_b):
            if p_dtype == torch.float32:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=what)
            else:  # one bf16 rounding apart at most, per step
                torch.testing.assert_close(x.float(), y.float(), rtol=3 * 2 ** -8, atol=1e-6, msg=what)


def test_masked_adam_found_inf_changes_nothing():
    ps, gs, ms, vs, ks = make_adam_state(torch.float32, seed=5)
    mixed = make_adam_state(torch.bfloat16, seed=6)  # a second dtype group in the same call
    before = [t.clone() for t in ps + ms + vs + mixed[0] + mixed[2] + mixed[3]]
    sk.ops.masked_adam_(ps + mixed[0], gs + mixed[1], ms + mixed[2], vs + mixed[3], ks + mixed[4], step=1, lr=0.1,
                        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                        grad_scale=torch.tensor([2.0], device=DEVICE), found_inf=torch.ones(1, device=DEVICE),
                        backend="triton")
    after = ps + ms + vs + mixed[0] + mixed[2] + mixed[3]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_masked_adam_mixed_dtypes_in_one_call():
    f32 = make_adam_state(torch.float32, seed=8, shapes=[(300,), (17, 3)])
    f16 = make_adam_state(torch.float16, seed=9, shapes=[(45,), (2, 2)])
    lists = [a + b for a, b in zip(f32, f16)]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    refs = [adam_ref(p, g, m, v, k, step=1, decoupled=False, grad_scale=None, **hyper) for p, g, m, v, k in zip(*lists)]
    sk.ops.masked_adam_(*lists, step=1, decoupled_weight_decay=False, backend="triton", **hyper)
    for i, (p, (rp, _, _)) in enumerate(zip(lists[0], refs)):
        _check_state(p, rp, p.dtype, f"params[{i}]")


def test_masked_adam_misaligned_views_and_exact_chunks():
    """Tensors that are views at an odd element offset (no 16-byte alignment: the unhinted path on
    a GPU), and a tensor of exactly two chunks (no bounded chunk)."""
    chunk = importlib.import_module("set_kernels.backends.triton.masked_adam").CHUNK
    n = 2 * chunk
    bufs = [randn(n + 1, seed=s).to(DEVICE) for s in range(4)]
    p, g, m = (b[1:] for b in bufs[:3])
    v = bufs[3][1:].abs()
    mask = torch.zeros(n + 1, dtype=torch.bool, device=DEVICE)[1:]
    mask[::3] = True
    exact = make_adam_state(torch.float32, seed=31, shapes=[(n,)])
    ps, gs, ms, vs, ks = ([a] + b for a, b in zip((p, g, m, v, mask), exact))
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    refs = [adam_ref(*t, step=2, decoupled=True, grad_scale=None, **hyper) for t in zip(ps, gs, ms, vs, ks)]
    sk.ops.masked_adam_(ps, gs, ms, vs, ks, step=2, decoupled_weight_decay=True, backend="triton", **hyper)
    for i, (q, (rp, _, _)) in enumerate(zip(ps, refs)):
        _check_state(q, rp, torch.float32, f"params[{i}]")


def test_masked_adam_optimizer_public_path():
    """sk.optim.MaskedAdam(backend="triton") steps like the torch backend."""
    ours = [torch.nn.Parameter(randn(40, 33, seed=1).to(DEVICE)), torch.nn.Parameter(randn(7, seed=2).to(DEVICE))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_a = sk.optim.MaskedAdam(ours, lr=1e-2, weight_decay=0.01, backend="triton")
    opt_b = sk.optim.MaskedAdam(theirs, lr=1e-2, weight_decay=0.01, backend="torch")
    for step in range(3):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            g = randn(*p.shape, seed=50 + 10 * step + i).to(DEVICE)
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_masked_adam_pointer_table_cache_is_correct_after_reuse():
    """Stepping the same tensors twice (cached table) and new tensors (a new table) both update."""
    mod = importlib.import_module("set_kernels.backends.triton.masked_adam")

    mod.clear_table_cache()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True)
    for seed in (1, 2):
        ps, gs, ms, vs, ks = make_adam_state(torch.float32, seed=seed, shapes=[(100,), (10,)])
        for step in (1, 2):
            refs = [adam_ref(p, g, m, v, k, step=step, decoupled=True, grad_scale=None,
                             **{k2: v2 for k2, v2 in hyper.items() if k2 != "decoupled_weight_decay"})
                    for p, g, m, v, k in zip(ps, gs, ms, vs, ks)]
            sk.ops.masked_adam_(ps, gs, ms, vs, ks, step=step, backend="triton", **hyper)
            for p, (rp, _, _) in zip(ps, refs):
                _check_state(p, rp, torch.float32, f"seed {seed} step {step}")
        # one table per group (masked / unmasked tensors), reused by the second step
        assert len(mod._tables) == 2 * seed


# ------------------------------------------------------------------------- autotune configs
@pytest.mark.parametrize("op", ["linear_forward", "linear_grad_input", "linear_grad_weight"])
def test_autotune_config_pruning(op):
    """The GPU config pruning (called by the autotuner with positional args and keyword args
    apart) keeps a non-empty subset for every block size and dtype, within the budgets."""
    from set_kernels.backends.triton import _common

    mod = importlib.import_module(f"set_kernels.backends.triton.{op}")
    ptr = "x_ptr" if op == "linear_forward" else "dy_ptr"
    for b in (16, 32, 64, 128):
        for dtype in DTYPES:
            kept = mod._prune(mod.CONFIGS, {ptr: torch.empty(0, dtype=dtype)}, B=b)
            assert kept and all(c in mod.CONFIGS for c in kept)
            item = torch.empty(0, dtype=dtype).element_size()
            for c in kept:
                tile = (c.kwargs["BLOCK_M"] * b + b * b) if "BLOCK_M" in c.kwargs else 2 * c.kwargs["BLOCK_K"] * b
                assert _common.smem_bytes(tile, item, c.num_stages) <= _common.SMEM_BUDGET or len(kept) == 1
    assert len(mod.CONFIGS) > 1


# ------------------------------------------------------------------------- dispatch, flags
def test_dispatch_triton_on_this_device_and_auto_on_cpu():
    for op in backends.OPS:
        assert backends.resolve("triton", op, DEVICE, torch.bfloat16) == "triton"
        # auto on CPU never picks the (slow) interpreter
        assert backends.resolve(None, op, torch.device("cpu"), torch.float32) != "triton"
        assert backends.resolve(None, op, torch.device("cpu"), torch.bfloat16) != "triton"
    if ON_GPU:
        assert backends.resolve(None, "linear_forward", DEVICE, torch.float16) == "triton"


def test_triton_rejects_float64_with_reason():
    layout, values, x, bias, dy = make_problem(40, 50, 16, 0.5, 3, torch.float64)
    with pytest.raises(RuntimeError, match=r"triton.*dtypes .*float32.*not float64"):
        sk.ops.block_sparse_linear(x.to(DEVICE), values.to(DEVICE), layout.to(DEVICE), backend="triton")


def test_bad_index_dtype_is_a_type_error():
    """An int64 layout index reaching the custom op with the triton backend selected: TypeError
    naming the index, from the op's index check (before any kernel)."""
    layout, values, x, bias, dy = make_problem(40, 50, 16, 0.5, 3, torch.float32)
    layout = layout.to(DEVICE)
    with backends.use("triton"), pytest.raises(TypeError, match="index: expected an int32 tensor"):
        torch.ops.set_kernels.linear_forward(x.to(DEVICE), values.to(DEVICE), layout.index.long(), None, 40, 50, 16)


def test_backend_functions_check_what_the_kernels_rely_on():
    """Called directly, the backend functions still refuse operands the kernels cannot index:
    non-contiguous ones, and tensors of the wrong device type."""
    from set_kernels.backends import triton as tb

    layout, values, x, bias, dy = make_problem(40, 50, 16, 0.5, 3, torch.float32)
    layout, values, x = layout.to(DEVICE), values.to(DEVICE), x.to(DEVICE)
    wide = torch.zeros(3, 60, device=DEVICE)[:, :50]
    with pytest.raises(ValueError, match="x: the triton kernels need a contiguous tensor"):
        tb.linear_forward(wide, values, layout.row_ptr, layout.col_idx, None, 40, 50, 16)
    other = torch.device("meta")
    with pytest.raises(ValueError, match="dy: expected a (cpu|cuda) tensor"):
        tb.linear_grad_input(torch.zeros(3, 40, device=other), values, layout.col_ptr, layout.row_idx, layout.perm,
                             40, 50, 16)


@pytest.mark.skipif(ON_GPU, reason="checks the no-GPU, not-interpreting case")
def test_without_interpreter_cpu_tensors_are_refused_with_reason():
    """A fresh process with no TRITON_INTERPRET and no GPU: triton is unavailable, saying how to fix it."""
    code = (
        "import torch, set_kernels as sk\n"
        "from set_kernels import backends\n"
        "ok, why = backends.availability('triton')\n"
        "assert not ok and 'TRITON_INTERPRET' in why, why\n"
        "lay = sk.BlockSparseLayout.random(20, 20, 16, 1.0)\n"
        "try:\n"
        "    sk.ops.block_sparse_linear(torch.randn(2, 20), torch.randn(lay.nnz_blocks, 16, 16), lay, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "assert backends.resolve(None, 'linear_forward', torch.device('cpu'), torch.float32) == 'numba'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_interpreting_only_without_gpu():
    from set_kernels.backends import triton as tb

    assert tb.INTERPRET == (not ON_GPU) == TRITON_INTERPRETED
    assert tb.DEVICES == (("cuda",) if ON_GPU else ("cpu",))


# fp32 precision: (torch setting, $SET_KERNELS_FP32_PRECISION, set_fp32_precision) -> PRECISION.
PRECISION_CASES = [
    ("highest", "", None, "ieee"),
    ("high", "", None, "tf32"),
    ("medium", "", None, "tf32"),
    ("allow_tf32", "", None, "tf32"),
    ("high", "3xtf32", None, "tf32x3"),
    ("highest", "tf32", None, "tf32"),
    ("high", "tf32", "ieee", "ieee"),
    ("highest", "", "3xtf32", "tf32x3"),
]


@pytest.fixture
def fp32_settings(monkeypatch):
    """Restores torch's fp32 matmul precision and the library override after the test."""
    from set_kernels.backends import _precision

    monkeypatch.delenv(_precision.ENV_VAR, raising=False)
    before = torch.get_float32_matmul_precision()
    yield _precision
    _precision.set_fp32_precision(None)
    torch.set_float32_matmul_precision(before)


def _apply_torch_setting(setting):
    if setting == "allow_tf32":
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True  # torch maps this to "high"
    else:
        torch.set_float32_matmul_precision(setting)


@pytest.mark.parametrize("setting, env, override, expected", PRECISION_CASES,
                         ids=[f"{t}-{e or 'noenv'}-{o}" for t, e, o, _ in PRECISION_CASES])
def test_fp32_precision_reaches_every_kernel_launch(monkeypatch, fp32_settings, setting, env, override, expected):
    """The PRECISION constexpr each block kernel is launched with follows torch's fp32 matmul
    precision, then $SET_KERNELS_FP32_PRECISION, then set_fp32_precision (read at every call);
    fp16 always gets "tf32" (ignored by tl.dot for fp16)."""
    seen = []
    for module, kernel in (("linear_forward", "_forward_kernel"), ("linear_grad_input", "_grad_input_kernel"),
                           ("linear_grad_weight", "_grad_weight_kernel")):
        tuner = getattr(importlib.import_module(f"set_kernels.backends.triton.{module}"), kernel)

        def spy(*args, _run=tuner.run, _name=kernel, **kwargs):
            seen.append((_name, kwargs["PRECISION"]))
            return _run(*args, **kwargs)

        monkeypatch.setattr(tuner, "run", spy)
    _apply_torch_setting(setting)
    if env:
        monkeypatch.setenv(fp32_settings.ENV_VAR, env)
    fp32_settings.set_fp32_precision(override)
    layout, values, x, bias, dy = make_problem(40, 30, 16, 0.6, 5, torch.float32, seed=4)
    y = run_linear(layout, values, x, bias, dy, "triton")[0]
    assert sorted(seen) == [("_forward_kernel", expected), ("_grad_input_kernel", expected),
                            ("_grad_weight_kernel", expected)]
    # TF32 products: still close to the reference (loosely; exact when interpreting)
    assert_close_scaled(y, linear_ref(x, values, layout, bias, dy)[0], 5e-3 if expected != "ieee" else TOL[torch.float32], "y")
    seen.clear()
    run_linear(*make_problem(40, 30, 16, 0.6, 5, torch.float16, seed=4), "triton")
    assert {p for _, p in seen} == {"tf32"}


def test_old_tf32_switches_are_gone():
    """One name for the setting: the triton-only switches are no longer there (allow_tf32 is a query)."""
    from set_kernels.backends import triton as tb

    assert not hasattr(tb, "set_allow_tf32") and not hasattr(tb, "TF32_ENV_VAR")
    assert isinstance(tb.allow_tf32(), bool)
