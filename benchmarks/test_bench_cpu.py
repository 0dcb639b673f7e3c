"""CPU benchmarks: the numba backend against dense torch and torch's own BSR sparse matmul.

    pytest benchmarks/test_bench_cpu.py --benchmark-only
    pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-columns=median,min,max,rounds

One 4096 x 4096 fp32 weight with 10% of its 32 x 32 blocks live, 512 tokens. Each group compares
one operation: the forward ``y = x @ W.T``, the input gradient ``dx = dy @ W``, the weight gradient
(numba: live blocks only; dense: the whole matrix), and one masked Adam step (numba's fused
kernel against ``torch.optim.Adam(fused=True)`` plus the two mask multiplies a masked-training
loop needs: ``grad *= mask`` before the step and ``param *= mask`` after it).

The numba backend functions are called directly and the layout index is built here, so this
file depends only on ``set_kernels.backends.numba``. ``SET_KERNELS_BENCH_ROUNDS`` sets the rounds
per benchmark (default 20). Run on an otherwise idle machine: two-core boxes are very sensitive
to a second busy process.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from set_kernels.backends import numba as nb

ROWS = COLS = 4096
BLOCK = 32
DENSITY = 0.1
TOKENS = 512
DTYPE = torch.float32
ROUNDS = int(os.environ.get("SET_KERNELS_BENCH_ROUNDS", "20"))
WARMUP = 2

SHAPE = f"{ROWS}x{COLS}, {DENSITY:.0%} of {BLOCK}x{BLOCK} blocks, {TOKENS} tokens, fp32"
G_FORWARD = f"forward y = x @ W.T ({SHAPE})"
G_DX = f"input grad dx = dy @ W ({SHAPE})"
G_DW = f"weight grad ({SHAPE})"
G_ADAM_BLOCK = f"masked Adam step ({ROWS}x{COLS} fp32, {DENSITY:.0%} block mask)"
G_ADAM_ELEM = f"masked Adam step ({ROWS}x{COLS} fp32, {DENSITY:.0%} random element mask)"

pytestmark = pytest.mark.skipif(not nb.availability()[0], reason=f"numba backend: {nb.availability()[1]}")


def make_layout(rows: int, cols: int, b: int, density: float, seed: int = 0) -> dict:
    """Block CSR + CSC index (int32) for exactly ``round(density * R * C)`` random live blocks."""
    n_rows, n_cols = -(-rows // b), -(-cols // b)
    gen = torch.Generator().manual_seed(seed)
    nnz = round(density * n_rows * n_cols)
    flat = torch.sort(torch.randperm(n_rows * n_cols, generator=gen)[:nnz]).values  # row-major = CSR order
    block_row, col_idx = flat // n_cols, flat % n_cols
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(block_row, minlength=n_rows), 0)
    perm = torch.sort(col_idx, stable=True).indices  # CSC order: by column, rows ascending
    col_ptr = torch.zeros(n_cols + 1, dtype=torch.int64)
    col_ptr[1:] = torch.cumsum(torch.bincount(col_idx, minlength=n_cols), 0)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    block_mask = torch.zeros(n_rows * n_cols, dtype=torch.bool)
    block_mask[flat] = True
    return dict(row_ptr=i32(row_ptr), col_idx=i32(col_idx), block_row=i32(block_row), col_ptr=i32(col_ptr),
                row_idx=i32(block_row[perm]), perm=i32(perm), block_mask=block_mask.reshape(n_rows, n_cols))


def element_mask(layout: dict, rows: int, cols: int, b: int) -> torch.Tensor:
    m = layout["block_mask"].repeat_interleave(b, 0).repeat_interleave(b, 1)
    return m[:rows, :cols].contiguous()


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    lay = make_layout(ROWS, COLS, BLOCK, DENSITY)
    nnz = lay["col_idx"].numel()
    values = torch.randn(nnz, BLOCK, BLOCK, dtype=DTYPE) / 32
    # Dense W with the blocks placed (CSR order == row-major order of the live blocks).
    grid = torch.zeros(ROWS // BLOCK, COLS // BLOCK, BLOCK, BLOCK, dtype=DTYPE)
    grid[lay["block_row"].long(), lay["col_idx"].long()] = values
    weight = grid.permute(0, 2, 1, 3).reshape(ROWS, COLS).contiguous()
    x = torch.randn(TOKENS, COLS, dtype=DTYPE)
    dy = torch.randn(TOKENS, ROWS, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse BSR support is in beta"
        w_bsr = weight.to_sparse_bsr((BLOCK, BLOCK))
        wt_bsr = weight.t().contiguous().to_sparse_bsr((BLOCK, BLOCK))
    return dict(lay=lay, values=values, weight=weight, x=x, dy=dy, w_bsr=w_bsr, wt_bsr=wt_bsr)


def _run(benchmark, group, fn):
    benchmark.group = group
    fn()  # numba: compile (or load from the on-disk cache) outside the timing
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


# ----------------------------------------------------------------------------- forward
def test_forward_numba(benchmark, problem):
    p, lay = problem, problem["lay"]
    y = nb.bsmm_dsd(p["x"], p["values"], lay["row_ptr"], lay["col_idx"], None, ROWS, COLS, BLOCK)
    torch.testing.assert_close(y, F.linear(p["x"], p["weight"]), rtol=1e-4, atol=1e-4)
    _run(benchmark, G_FORWARD,
         lambda: nb.bsmm_dsd(p["x"], p["values"], lay["row_ptr"], lay["col_idx"], None, ROWS, COLS, BLOCK))


def test_forward_dense_torch(benchmark, problem):
    _run(benchmark, G_FORWARD, lambda: F.linear(problem["x"], problem["weight"]))


def test_forward_torch_bsr(benchmark, problem):
    # torch's BSR matmul wants the sparse operand first: y = (W_bsr @ x.T).T
    _run(benchmark, G_FORWARD, lambda: torch.sparse.mm(problem["w_bsr"], problem["x"].t()).t())


# ----------------------------------------------------------------------------- input grad
def test_dx_numba(benchmark, problem):
    p, lay = problem, problem["lay"]
    args = (p["dy"], p["values"], lay["col_ptr"], lay["row_idx"], lay["perm"], ROWS, COLS, BLOCK)
    torch.testing.assert_close(nb.bsmm_dds(*args), p["dy"] @ p["weight"], rtol=1e-4, atol=1e-4)
    _run(benchmark, G_DX, lambda: nb.bsmm_dds(*args))


def test_dx_dense_torch(benchmark, problem):
    _run(benchmark, G_DX, lambda: problem["dy"] @ problem["weight"])


def test_dx_torch_bsr(benchmark, problem):
    # dx = (W.T_bsr @ dy.T).T
    _run(benchmark, G_DX, lambda: torch.sparse.mm(problem["wt_bsr"], problem["dy"].t()).t())


# ----------------------------------------------------------------------------- weight grad
def test_dw_numba_live_blocks(benchmark, problem):
    p, lay = problem, problem["lay"]
    args = (p["dy"], p["x"], lay["block_row"], lay["col_idx"], ROWS, COLS, BLOCK)
    dv = nb.bsmm_sdd(*args)
    full = p["dy"].t() @ p["x"]
    ref = full.reshape(ROWS // BLOCK, BLOCK, COLS // BLOCK, BLOCK).permute(0, 2, 1, 3)[
        lay["block_row"].long(), lay["col_idx"].long()]
    torch.testing.assert_close(dv, ref, rtol=1e-4, atol=1e-3)
    _run(benchmark, G_DW, lambda: nb.bsmm_sdd(*args))


def test_dw_dense_torch(benchmark, problem):
    _run(benchmark, G_DW, lambda: problem["dy"].t() @ problem["x"])


# ----------------------------------------------------------------------------- masked Adam
ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _adam_mask(kind: str) -> torch.Tensor:
    if kind == "block":
        return element_mask(make_layout(ROWS, COLS, BLOCK, DENSITY, seed=1), ROWS, COLS, BLOCK)
    gen = torch.Generator().manual_seed(1)
    return torch.rand(ROWS, COLS, generator=gen) < DENSITY


def _adam_group(kind: str) -> str:
    return G_ADAM_BLOCK if kind == "block" else G_ADAM_ELEM


@pytest.mark.parametrize("kind", ["block", "element"])
def test_adam_numba_masked(benchmark, kind):
    torch.manual_seed(0)
    mask = _adam_mask(kind)
    p = torch.randn(ROWS, COLS) * mask
    g = torch.randn(ROWS, COLS)
    m = torch.zeros(ROWS, COLS)
    v = torch.zeros(ROWS, COLS)
    step = [0]
    lr, (beta1, beta2), eps = ADAM["lr"], ADAM["betas"], ADAM["eps"]

    def one_step():
        step[0] += 1
        nb.masked_adam_([p], [g], [m], [v], [mask], step=step[0], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=ADAM["weight_decay"], decoupled_weight_decay=False)

    _run(benchmark, _adam_group(kind), one_step)
    assert bool((p[~mask] == 0).all())


@pytest.mark.parametrize("kind", ["block", "element"])
def test_adam_torch_fused_plus_mask_muls(benchmark, kind):
    torch.manual_seed(0)
    mask = _adam_mask(kind)
    p = torch.nn.Parameter(torch.randn(ROWS, COLS) * mask)
    p.grad = torch.randn(ROWS, COLS)
    opt = torch.optim.Adam([p], fused=True, **ADAM)
    # A float copy of the mask: multiplying by a bool tensor takes a ~6x slower type-promoting path.
    maskf = mask.to(p.dtype)

    def one_step():
        with torch.no_grad():
            p.grad.mul_(maskf)
            opt.step()
            p.mul_(maskf)

    _run(benchmark, _adam_group(kind), one_step)
