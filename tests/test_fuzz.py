"""Property-based fuzzing (hypothesis) of every op on every backend CI can run, against float64.

Shapes include 1, block +- 1 and odd sizes; block sizes 16..128; densities 0, 1 and in between;
0 to 2 leading batch dims; fp32, fp64 and (where a backend takes them) fp16 / bf16. Outputs
are NaN-poisoned when allocated, so every element must be written.

Budget: the "ci" profile (registered in conftest.py, the default) runs a bounded, derandomized
number of examples; run ``pytest tests/test_fuzz.py --hypothesis-profile=long`` locally for a
long search. A triton backend running in its CPU interpreter gets tiny shapes (<= 64) and few
examples. Any mismatch found here becomes a regular test at the bottom of this file.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

# hypothesis is a test dependency (.ci/setup installs it): without it this module fails to import.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import set_kernels as sk  # noqa: E402
from set_kernels import backends  # noqa: E402
from conftest import REQUIRED_CPU_BACKENDS, TOL, assert_close_scaled, blocks_ref, dense_ref, linear_ref  # noqa: E402

OPS = torch.ops.set_kernels
CPU = torch.device("cpu")
LOW = (torch.float16, torch.bfloat16)


def cpu_backends(op: str) -> list[str]:
    """Required CPU backends plus every other backend that runs ``op`` on CPU tensors here."""
    names = list(REQUIRED_CPU_BACKENDS)
    for name in backends.BACKENDS:
        if name not in names and not backends.unsupported_reasons(name, op, CPU, torch.float32):
            names.append(name)
    return names


def interpreted(backend: str) -> bool:
    """A backend that runs CPU tensors through a slow interpreter (triton without a GPU)."""
    return backend == "triton"


def dtypes_of(backend: str, op: str) -> list[torch.dtype]:
    order = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    return [d for d in order if not backends.unsupported_reasons(backend, op, CPU, d)]


def budget(backend: str):
    """Few examples for an interpreted backend; the profile's budget otherwise."""
    n = settings().max_examples
    return settings(max_examples=max(2, n // 4) if interpreted(backend) else n, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def problems(draw, backend: str, op: str):
    """(rows, cols, block_size, density, lead shape, dtype, seed)."""
    tiny = interpreted(backend)
    b = draw(st.sampled_from((1, 16, 32) if tiny else (1, 16, 32, 64, 128)))
    limit = 64 if tiny else max(3 * b + 7, 70)

    def size():
        special = [1, b - 1, b, b + 1]
        return draw(st.one_of(st.sampled_from([s for s in special if 1 <= s <= limit]),
                              st.integers(1, limit).map(lambda n: n | 1)))  # odd

    rows, cols = size(), size()
    density = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.05, 0.95)))
    lead = tuple(draw(st.lists(st.integers(1, 3 if tiny else 5), min_size=0, max_size=2)))
    dtype = draw(st.sampled_from(dtypes_of(backend, op)))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, cols, b, density, lead, dtype, seed


def make(rows, cols, b, density, seed):
    g = torch.Generator().manual_seed(seed)
    layout = sk.BlockSparseLayout.random(rows, cols, b, density, generator=g)
    return layout, g


def rnd(g, *shape, dtype):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def torch_error(a_lp, b_lp, ref, fn):
    """Error of torch's own low-precision computation ``fn(a_lp, b_lp)`` against ``ref``."""
    return (fn(a_lp, b_lp).double() - ref).abs().max().item() if ref.numel() else 0.0


def check_low(actual, ref, torch_err, what):
    assert actual.shape == ref.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    if ref.numel() == 0:
        return
    err = (actual.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 2 * torch_err + 1e-3 * scale + 1e-6, f"{what}: error {err:.3e} > 2 x torch's {torch_err:.3e}"


# ------------------------------------------------------------------------- block_sparse_linear
@pytest.mark.parametrize("backend", cpu_backends("linear_forward"))
def test_fuzz_block_sparse_linear_fwd_bwd(backend, poison_alloc):
    """Forward (linear_forward), dx (linear_grad_input), dvalues (linear_grad_weight) and dbias against the
    float64 reference."""

    @budget(backend)
    @given(problems(backend, "linear_forward"), st.booleans())
    def run(problem, has_bias):
        rows, cols, b, density, lead, dtype, seed = problem
        layout, g = make(rows, cols, b, density, seed)
        x = rnd(g, *lead, cols, dtype=dtype).requires_grad_()
        values = rnd(g, layout.nnz_blocks, b, b, dtype=dtype).requires_grad_()
        bias = rnd(g, rows, dtype=dtype).requires_grad_() if has_bias else None
        dy = rnd(g, *lead, rows, dtype=dtype)
        y = sk.ops.block_sparse_linear(x, values, layout, bias, backend=backend)
        y.backward(dy)
        y_ref, dx_ref, dv_ref, db_ref = linear_ref(x, values, layout, bias, dy)
        assert y.dtype == dtype and y.shape == (*lead, rows)
        assert values.grad.shape == values.shape
        if dtype in LOW:
            w = dense_ref(values, layout)
            w_lp = w.to(dtype)
            x2 = x.detach().reshape(-1, cols)
            dy2 = dy.reshape(-1, rows)
            b_lp = None if bias is None else bias.detach()
            e_y = torch_error(x2, w_lp, y_ref.reshape(-1, rows), lambda a, w: F.linear(a, w, b_lp))
            check_low(y.detach().reshape(-1, rows), y_ref.reshape(-1, rows), e_y, "y")
            check_low(x.grad.reshape(-1, cols), dx_ref.reshape(-1, cols),
                      torch_error(dy2, w_lp, dx_ref.reshape(-1, cols), lambda a, w: a @ w), "dx")
            dw_ref = dy2.double().T @ x2.double()
            e_w = (dy2.T @ x2).double().sub(dw_ref).abs().max().item() if dw_ref.numel() else 0.0
            check_low(values.grad, dv_ref, e_w, "dvalues")
        else:
            tol = TOL[dtype]
            assert_close_scaled(y, y_ref, tol, "y")
            assert_close_scaled(x.grad, dx_ref, tol, "dx")
            assert_close_scaled(values.grad, dv_ref, tol, "dvalues")
            if bias is not None:
                assert_close_scaled(bias.grad, db_ref, tol, "dbias")

    run()


# ------------------------------------------- raw linear_grad_input / linear_grad_weight custom ops
@pytest.mark.parametrize("backend", cpu_backends("linear_grad_input"))
def test_fuzz_raw_grad_input_and_grad_weight(backend, poison_alloc):
    """The transposed-index kernel and the weight-gradient kernel called directly, 2-D operands."""

    @budget(backend)
    @given(problems(backend, "linear_grad_input"))
    def run(problem):
        rows, cols, b, density, lead, dtype, seed = problem
        if dtype in LOW:
            dtype = torch.float32  # low precision is covered through block_sparse_linear
        layout, g = make(rows, cols, b, density, seed)
        m = math.prod(lead)
        dy = rnd(g, m, rows, dtype=dtype)
        x = rnd(g, m, cols, dtype=dtype)
        values = rnd(g, layout.nnz_blocks, b, b, dtype=dtype)
        with backends.use(backend):
            dx = OPS.linear_grad_input(dy, values, layout.index, rows, cols, b)
            dv = OPS.linear_grad_weight(dy, x, layout.index, rows, cols, b)
        assert_close_scaled(dx, dy.double() @ dense_ref(values, layout), TOL[dtype], "linear_grad_input")
        assert_close_scaled(dv, blocks_ref(dy.double().T @ x.double(), layout), TOL[dtype], "linear_grad_weight")

    run()


# ----------------------------------------------------------------------- to_dense / from_dense
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems("torch", "linear_forward"))
def test_fuzz_to_dense_from_dense(problem):
    rows, cols, b, density, lead, dtype, seed = problem
    layout, g = make(rows, cols, b, density, seed)
    values = rnd(g, layout.nnz_blocks, b, b, dtype=dtype)
    dense = sk.ops.to_dense(values, layout)
    assert dense.dtype == dtype
    assert torch.equal(dense.double(), dense_ref(values, layout))
    weight = rnd(g, rows, cols, dtype=dtype)
    blocks = sk.ops.from_dense(weight, layout)
    assert torch.equal(blocks.double(), blocks_ref(weight, layout))
    # to_dense(from_dense(W)) keeps exactly the live part of W.
    assert torch.equal(sk.ops.to_dense(blocks, layout), weight * layout.element_mask())


# --------------------------------------------------------------------------------- masked Adam
def adam_ref(p, g, m, v, mask, *, step, lr, beta1, beta2, eps, wd, decoupled):
    """float64 Adam/AdamW on one tensor (torch's formulas), masked entries set to 0."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    if wd:
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    p = p - lr / (1 - beta1**step) * m / denom
    if mask is not None:
        p, m, v = (t.masked_fill(~mask, 0) for t in (p, m, v))
    return p, m, v


@pytest.mark.parametrize("backend", cpu_backends("masked_adam_"))
def test_fuzz_masked_adam(backend):

    @budget(backend)
    @given(n=st.integers(1, 64 if interpreted(backend) else 5000), dtype=st.sampled_from(dtypes_of(backend, "masked_adam_")),
           mask_kind=st.sampled_from(["none", "all", "empty", "random"]), step=st.integers(1, 1000),
           wd=st.sampled_from([0.0, 0.01]), decoupled=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def run(n, dtype, mask_kind, step, wd, decoupled, seed):
        g = torch.Generator().manual_seed(seed)
        p = rnd(g, n, dtype=dtype)
        grad = rnd(g, n, dtype=dtype)
        state_dtype = torch.float32 if dtype in LOW else dtype
        m = rnd(g, n, dtype=state_dtype) * 0.1
        v = rnd(g, n, dtype=state_dtype).abs() * 0.1
        mask = {"none": None, "all": torch.ones(n, dtype=torch.bool), "empty": torch.zeros(n, dtype=torch.bool),
                "random": torch.rand(n, generator=g) < 0.4}[mask_kind]
        hyper = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
        ref = adam_ref(p, grad, m, v, mask, wd=wd, decoupled=decoupled, **hyper)
        sk.ops.masked_adam_([p], [grad], [m], [v], [mask], weight_decay=wd, decoupled_weight_decay=decoupled,
                            backend=backend, **hyper)
        for name, got, want in zip("pmv", (p, m, v), ref):
            if mask is not None:
                assert bool((got[~mask] == 0).all()), f"{name}: masked entries not exactly 0"
            tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(got.dtype, 2**-7)
            err = (got.double() - want).abs().max().item()
            assert err <= tol * max(1.0, want.abs().max().item()), f"{name}: error {err:.3e}"

    run()


# ------------------------------------------------------------------ regressions found by fuzzing
# (Each mismatch hypothesis finds is pinned here as an ordinary test.)
@pytest.mark.parametrize("backend", REQUIRED_CPU_BACKENDS)
@pytest.mark.parametrize("rows,cols,b", [(1, 1, 16), (15, 17, 16), (129, 1, 128), (1, 127, 64)])
def test_regression_degenerate_shapes(backend, rows, cols, b, poison_alloc):
    """Single-row / single-column matrices and block +- 1 sizes, dense layout, with batch dims."""
    layout, g = make(rows, cols, b, 1.0, 0)
    x = rnd(g, 2, 1, cols, dtype=torch.float64).requires_grad_()
    values = rnd(g, layout.nnz_blocks, b, b, dtype=torch.float64).requires_grad_()
    dy = rnd(g, 2, 1, rows, dtype=torch.float64)
    y = sk.ops.block_sparse_linear(x, values, layout, backend=backend)
    y.backward(dy)
    y_ref, dx_ref, dv_ref, _ = linear_ref(x, values, layout, None, dy)
    assert_close_scaled(y, y_ref, 1e-11, "y")
    assert_close_scaled(x.grad, dx_ref, 1e-11, "dx")
    assert_close_scaled(values.grad, dv_ref, 1e-11, "dvalues")


@pytest.mark.parametrize("backend", REQUIRED_CPU_BACKENDS)
def test_double_backward(backend):
    """Each backward is written with the three ops, so second derivatives exist (gradgradcheck)."""
    layout, g = make(20, 33, 16, 0.5, 0)
    x = rnd(g, 3, 33, dtype=torch.float64).requires_grad_()
    values = rnd(g, layout.nnz_blocks, 16, 16, dtype=torch.float64).requires_grad_()
    bias = rnd(g, 20, dtype=torch.float64).requires_grad_()

    def fn(x, values, bias):
        return sk.ops.block_sparse_linear(x, values, layout, bias, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, values, bias), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, values, bias), fast_mode=True)
