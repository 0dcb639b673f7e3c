"""block_sparse_linear on every CPU backend against the float64 reference of conftest.

Forward, dX, dW (values.grad) and the bias gradient through autograd with a random upstream
gradient; odd sizes, partial edge blocks, every block size, densities 0 / 0.3 / 1, leading batch
dims; fp32 / fp64 on every CPU backend, fp16 / bf16 on the torch backend; gradcheck and
gradgradcheck.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import set_kernels as sk
from conftest import (CUDA_BACKENDS, TOL, assert_close_scaled, dense_ref, edge_mask_ref, gen, linear_ref, randn,
                      require_backend, require_cuda_backend)

BSL = sk.BlockSparseLayout

# (rows, cols, block_size, density, leading dims of x, bias)
CASES = [
    (1000, 784, 32, 0.3, (3,), True),
    (784, 1000, 16, 0.3, (77,), True),
    (33, 47, 16, 1.0, (1,), True),
    (17, 16, 16, 0.3, (3,), False),
    (200, 130, 64, 0.3, (2, 3), True),
    (130, 300, 128, 1.0, (5,), True),
    (257, 129, 128, 0.3, (3,), False),
    (96, 160, 32, 1.0, (2, 3), True),
    (100, 70, 32, 0.3, (1,), False),
    # Larger than the numba kernels' tiles: several token tiles with a remainder (forward / dX),
    # reductions longer than one K chunk (1024) in both directions, several M chunks for dW.
    (130, 300, 128, 0.3, (70,), True),
    (1030, 1100, 32, 1.0, (5,), True),
    (40, 70, 16, 0.5, (1100,), False),
    # Element sparsity (block size 1, CSR): odd sizes, a 1 x 1 matrix, sparse enough for empty rows,
    # dense, and many more tokens than the numba element kernels' token tile (64 fp32 / 32 fp64),
    # with a remainder.
    (37, 53, 1, 0.3, (3,), True),
    (1, 1, 1, 1.0, (2,), True),
    (130, 70, 1, 0.05, (2, 3), False),
    (200, 150, 1, 1.0, (5,), True),
    (40, 70, 1, 0.5, (1100,), True),
]
B1 = [c for c in CASES if c[2] == 1]


def case_id(case):
    rows, cols, b, density, lead, bias = case
    return f"{rows}x{cols}-b{b}-d{density}-x{'x'.join(map(str, lead))}{'-bias' if bias else ''}"


def make_inputs(case, dtype, seed=0):
    rows, cols, b, density, lead, has_bias = case
    layout = BSL.random(rows, cols, b, density, generator=gen(seed))
    # values are random everywhere, also beyond the matrix edges: that part must be ignored.
    values = randn(layout.nnz_blocks, b, b, dtype=dtype, seed=seed + 1).requires_grad_()
    x = randn(*lead, cols, dtype=dtype, seed=seed + 2).requires_grad_()
    bias = randn(rows, dtype=dtype, seed=seed + 3).requires_grad_() if has_bias else None
    dy = randn(*lead, rows, dtype=dtype, seed=seed + 4)
    return layout, values, x, bias, dy


def run_linear(layout, values, x, bias, dy, backend):
    y = sk.ops.block_sparse_linear(x, values, layout, bias, backend=backend)
    y.backward(dy)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_linear_matches_fp64_reference(cpu_backend, dtype, case, poison_alloc):
    layout, values, x, bias, dy = make_inputs(case, dtype)
    y = run_linear(layout, values, x, bias, dy, cpu_backend)
    y_ref, dx_ref, dv_ref, db_ref = linear_ref(x, values, layout, bias, dy)
    rows = layout.shape[0]
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], rows)
    assert x.grad.dtype == dtype and values.grad.dtype == dtype
    tol = TOL[dtype]
    assert_close_scaled(y, y_ref, tol, "forward")
    assert_close_scaled(x.grad, dx_ref, tol, "dX")
    assert_close_scaled(values.grad, dv_ref, tol, "dW")
    # The parts of edge blocks beyond the matrix must get exactly zero gradient.
    outside = ~edge_mask_ref(layout)
    assert torch.equal(values.grad[outside], torch.zeros_like(values.grad[outside])), "dW beyond edges"
    if bias is not None:
        assert_close_scaled(bias.grad, db_ref, tol, "dbias")


def lowp_torch_error(x, values, layout, bias, dy, ref):
    """Errors (vs the fp64 reference) of the same computation done densely by torch in x's dtype."""
    dtype = x.dtype
    w = dense_ref(values, layout).to(dtype)  # exact: the values already are in dtype
    x2, dy2 = x.detach().reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    y = F.linear(x2, w, None if bias is None else bias.detach())
    dx = dy2 @ w
    dw_blocks = _blocks(dy2.T @ x2, layout)
    y_ref, dx_ref, dv_ref, _ = ref
    return ((y.double() - y_ref.reshape(y.shape)).abs().max().item(),
            (dx.double() - dx_ref.reshape(dx.shape)).abs().max().item(),
            (dw_blocks.double() - dv_ref).abs().max().item())


def _blocks(dense, layout):
    from conftest import blocks_ref
    return blocks_ref(dense, layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[5], CASES[7], B1[0]], ids=case_id)
def test_linear_low_precision_torch_backend(dtype, case, poison_alloc):
    """Kernel error vs fp64 <= 2x torch's own error in that dtype + a one-ulp-of-scale slack."""
    require_backend("torch")
    layout, values, x, bias, dy = make_inputs(case, dtype, seed=10)
    # Keep magnitudes moderate so that fp16 does not overflow at 1000-long sums.
    with torch.no_grad():
        values.mul_(0.25)
        x.mul_(0.25)
    y = run_linear(layout, values, x, bias, dy, "torch")
    ref = linear_ref(x, values, layout, bias, dy)
    torch_err = lowp_torch_error(x, values, layout, bias, dy, ref)
    eps = torch.finfo(dtype).eps
    for name, got, expected, own in (("forward", y, ref[0], torch_err[0]), ("dX", x.grad, ref[1], torch_err[1]),
                                     ("dW", values.grad, ref[2], torch_err[2])):
        assert got.dtype == dtype, name
        assert torch.isfinite(got).all(), name
        err = (got.double() - expected).abs().max().item()
        slack = eps * expected.abs().max().item()
        assert err <= 2 * own + slack, f"{name}: error {err:.3e} > 2 x torch's {own:.3e} + {slack:.1e}"
    if bias is not None:
        db_err = (bias.grad.double() - ref[3]).abs().max().item()
        db_own = (dy.reshape(-1, dy.shape[-1]).sum(0).double() - ref[3]).abs().max().item()
        assert db_err <= 2 * db_own + eps * ref[3].abs().max().item()


@pytest.mark.parametrize("b", [32, 1])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_empty_layout(cpu_backend, dtype, has_bias, b, poison_alloc):
    rows, cols = 70, 100
    layout = BSL.random(rows, cols, b, 0.0, generator=gen(0))
    assert layout.nnz_blocks == 0
    values = torch.zeros(0, b, b, dtype=dtype, requires_grad=True)
    x = randn(2, 3, cols, dtype=dtype, seed=1).requires_grad_()
    bias = randn(rows, dtype=dtype, seed=2).requires_grad_() if has_bias else None
    dy = randn(2, 3, rows, dtype=dtype, seed=3)
    y = run_linear(layout, values, x, bias, dy, cpu_backend)
    expected = bias.detach().expand(2, 3, rows) if has_bias else torch.zeros(2, 3, rows, dtype=dtype)
    assert y.shape == (2, 3, rows)
    assert torch.equal(y, expected)
    assert values.grad is not None and values.grad.shape == (0, b, b)
    assert torch.equal(x.grad, torch.zeros_like(x))
    if has_bias:
        assert torch.allclose(bias.grad, dy.sum((0, 1)), rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_element_layout_with_empty_rows_and_columns(cpu_backend, dtype, poison_alloc):
    """CSR with empty rows (first, middle, last) and empty columns (first, middle, last)."""
    rows, cols = 9, 11
    live = {(1, 1), (1, 2), (1, 9), (2, 4), (4, 1), (4, 4), (4, 6), (4, 7), (4, 9), (5, 2), (7, 9)}
    counts = [sum(1 for r, _ in live if r == i) for i in range(rows)]
    row_ptr = torch.tensor([0] + counts).cumsum(0)
    col_idx = torch.tensor([c for r, c in sorted(live)])
    layout = BSL.from_csr(row_ptr, col_idx, 1, (rows, cols))
    assert {c for _, c in live}.isdisjoint({0, 5, 10}) and {r for r, _ in live}.isdisjoint({0, 3, 6, 8})
    values = randn(len(live), 1, 1, dtype=dtype, seed=1).requires_grad_()
    x = randn(6, cols, dtype=dtype, seed=2).requires_grad_()
    bias = randn(rows, dtype=dtype, seed=3).requires_grad_()
    dy = randn(6, rows, dtype=dtype, seed=4)
    y = run_linear(layout, values, x, bias, dy, cpu_backend)
    y_ref, dx_ref, dv_ref, db_ref = linear_ref(x, values, layout, bias, dy)
    tol = TOL[dtype]
    assert_close_scaled(y, y_ref, tol, "forward")
    assert_close_scaled(x.grad, dx_ref, tol, "dX")
    assert_close_scaled(values.grad, dv_ref, tol, "dW")
    assert torch.equal(x.grad[:, [0, 5, 10]], torch.zeros(6, 3, dtype=dtype)), "dX of empty columns"
    assert torch.equal(y[:, [0, 3, 6, 8]], bias.detach()[[0, 3, 6, 8]].expand(6, 4)), "empty rows give the bias"


def test_zero_rows_of_x(cpu_backend):
    layout = BSL.random(70, 100, 32, 0.5, generator=gen(0))
    values = randn(layout.nnz_blocks, 32, 32, seed=1).requires_grad_()
    bias = randn(70, seed=2).requires_grad_()
    x = torch.zeros(0, 100, requires_grad=True)
    y = sk.ops.block_sparse_linear(x, values, layout, bias, backend=cpu_backend)
    assert y.shape == (0, 70)
    y.sum().backward()
    assert torch.equal(values.grad, torch.zeros_like(values))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_non_contiguous_inputs(cpu_backend):
    layout = BSL.random(48, 80, 16, 0.5, generator=gen(3))
    values_t = randn(layout.nnz_blocks, 16, 16, dtype=torch.float64, seed=1).transpose(1, 2)
    x_t = randn(80, 6, dtype=torch.float64, seed=2).T  # (6, 80), not contiguous
    assert not x_t.is_contiguous() and not values_t.is_contiguous()
    values_t.requires_grad_()
    x_t.requires_grad_()
    dy = randn(6, 48, dtype=torch.float64, seed=3)
    y = run_linear(layout, values_t, x_t, None, dy, cpu_backend)
    y_ref, dx_ref, dv_ref, _ = linear_ref(x_t, values_t, layout, None, dy)
    assert_close_scaled(y, y_ref, 1e-12, "forward")
    assert_close_scaled(x_t.grad, dx_ref, 1e-12, "dX")
    assert_close_scaled(values_t.grad, dv_ref, 1e-12, "dW")


def test_only_some_inputs_require_grad(cpu_backend):
    layout = BSL.random(40, 50, 16, 0.5, generator=gen(4))
    values = randn(layout.nnz_blocks, 16, 16, dtype=torch.float64, seed=1).requires_grad_()
    x = randn(4, 50, dtype=torch.float64, seed=2)
    dy = randn(4, 40, dtype=torch.float64, seed=3)
    y = run_linear(layout, values, x, None, dy, cpu_backend)
    _, _, dv_ref, _ = linear_ref(x, values, layout, None, dy)
    assert x.grad is None
    assert_close_scaled(values.grad, dv_ref, 1e-12, "dW")
    # and the other way round
    values2 = values.detach()
    x2 = x.clone().requires_grad_()
    run_linear(layout, values2, x2, None, dy, cpu_backend)
    assert_close_scaled(x2.grad, linear_ref(x2, values2, layout, None, dy)[1], 1e-12, "dX")


# -------------------------------------------------------------------------------- gradcheck
GRADCHECK_CASES = [(20, 35, 16, 0.5, True), (17, 16, 16, 1.0, False), (40, 33, 32, 0.5, True), (20, 35, 1, 0.3, True)]


@pytest.mark.parametrize("rows,cols,b,density,has_bias", GRADCHECK_CASES)
def test_gradcheck(cpu_backend, rows, cols, b, density, has_bias):
    layout = BSL.random(rows, cols, b, density, generator=gen(7))
    values = randn(layout.nnz_blocks, b, b, dtype=torch.float64, seed=1).requires_grad_()
    x = randn(3, cols, dtype=torch.float64, seed=2).requires_grad_()
    inputs = [x, values]
    if has_bias:
        inputs.append(randn(rows, dtype=torch.float64, seed=3).requires_grad_())

    def fn(x, values, *bias):
        return sk.ops.block_sparse_linear(x, values, layout, *bias, backend=cpu_backend)

    # fast_mode (random projections of the Jacobian) for the 32-blocks: a full numerical Jacobian
    # over 2000+ entries costs thousands of op calls.
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=b > 16)


@pytest.mark.parametrize("rows,cols,b,density,has_bias", GRADCHECK_CASES[:2])
def test_gradgradcheck(cpu_backend, rows, cols, b, density, has_bias):
    layout = BSL.random(rows, cols, b, density, generator=gen(8))
    values = randn(layout.nnz_blocks, b, b, dtype=torch.float64, seed=1).requires_grad_()
    x = randn(2, cols, dtype=torch.float64, seed=2).requires_grad_()
    inputs = [x, values]
    if has_bias:
        inputs.append(randn(rows, dtype=torch.float64, seed=3).requires_grad_())

    def fn(x, values, *bias):
        return sk.ops.block_sparse_linear(x, values, layout, *bias, backend=cpu_backend)

    assert torch.autograd.gradgradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("case", [(300, 260, 32, 0.5, (40,), True), (300, 260, 1, 0.1, (600,), True)], ids=case_id)
def test_deterministic(cpu_backend, case):
    """Same inputs, bit-identical forward and gradients (needed for bit-identical resume)."""
    results = []
    for _ in range(2):
        layout, values, x, bias, dy = make_inputs(case, torch.float32, seed=3)
        y = run_linear(layout, values, x, bias, dy, cpu_backend)
        results.append((y.detach(), x.grad, values.grad, bias.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- CUDA tensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[4], CASES[5], CASES[9]], ids=case_id)
@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_linear_cuda_matches_fp64_reference(name, dtype, case):
    """Same checks on CUDA tensors; fp16/bf16 within 2x torch's own (cuBLAS) error + one ulp of scale."""
    device = require_cuda_backend(name, "linear_forward", dtype)
    for op in ("linear_grad_input", "linear_grad_weight"):
        require_cuda_backend(name, op, dtype)
    layout, values, x, bias, dy = make_inputs(case, torch.float64, seed=20)
    scale = 0.25 if dtype != torch.float32 else 1.0
    values = (values.detach() * scale).to(device, dtype).requires_grad_()
    x = (x.detach() * scale).to(device, dtype).requires_grad_()
    bias = bias.detach().to(device, dtype).requires_grad_() if bias is not None else None
    dy = dy.to(device, dtype)
    y = run_linear(layout.to(device), values, x, bias, dy, name)
    cpu = [t.detach().cpu() if t is not None else None for t in (x, values, bias, dy)]
    ref = linear_ref(cpu[0], cpu[1], layout, cpu[2], cpu[3])
    outside = ~edge_mask_ref(layout)
    assert torch.equal(values.grad.cpu()[outside], torch.zeros_like(values.grad.cpu()[outside])), "dW beyond edges"
    got = (y, x.grad, values.grad)
    if dtype == torch.float32:
        for what, g, r in zip(("forward", "dX", "dW"), got, ref[:3]):
            assert_close_scaled(g.cpu(), r, TOL[dtype], what)
        return
    w = dense_ref(cpu[1], layout).to(device, dtype)
    x2, dy2 = x.detach().reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    own = (torch.nn.functional.linear(x2, w, None if bias is None else bias.detach()), dy2 @ w,
           _blocks((dy2.T @ x2).cpu(), layout))
    eps = torch.finfo(dtype).eps
    for what, g, r, o in zip(("forward", "dX", "dW"), got, ref[:3], own):
        r = r.reshape(g.shape)
        err = (g.detach().cpu().double() - r).abs().max().item() if r.numel() else 0.0
        own_err = (o.detach().cpu().double().reshape(r.shape) - r).abs().max().item() if r.numel() else 0.0
        slack = eps * (r.abs().max().item() if r.numel() else 0.0)
        assert err <= 2 * own_err + slack, f"{what}: error {err:.3e} > 2 x torch's {own_err:.3e} + {slack:.1e}"
