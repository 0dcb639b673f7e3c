"""torch.library.opcheck on every set_kernels custom op, for every CPU backend.

opcheck runs the op against its schema (declared mutations), its fake (meta) implementation,
its autograd registration and AOT dispatch with dynamic shapes.
"""
from __future__ import annotations

import pytest
import torch

import set_kernels as sk
from conftest import gen, randn

BSL = sk.BlockSparseLayout
OPS = torch.ops.set_kernels

# (rows, cols, block_size, density): a partial-edge case and an empty layout.
LAYOUTS = [(40, 70, 32, 0.5), (33, 47, 16, 1.0), (64, 96, 32, 0.0)]


def layout_of(rows, cols, b, density):
    return BSL.random(rows, cols, b, density, generator=gen(rows * cols))


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_bsmm_dsd(cpu_backend, shape, has_bias):
    rows, cols, b, _ = shape
    layout = layout_of(*shape)
    x = randn(5, cols, seed=1).requires_grad_()
    values = randn(layout.nnz_blocks, b, b, seed=2).requires_grad_()
    bias = randn(rows, seed=3).requires_grad_() if has_bias else None
    torch.library.opcheck(OPS.bsmm_dsd.default, (x, values, layout.index, bias, rows, cols, b, cpu_backend))


@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_bsmm_dds(cpu_backend, shape):
    rows, cols, b, _ = shape
    layout = layout_of(*shape)
    dy = randn(5, rows, seed=1).requires_grad_()
    values = randn(layout.nnz_blocks, b, b, seed=2).requires_grad_()
    torch.library.opcheck(OPS.bsmm_dds.default, (dy, values, layout.index, rows, cols, b, cpu_backend))


@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_bsmm_sdd(cpu_backend, shape):
    rows, cols, b, _ = shape
    layout = layout_of(*shape)
    dy = randn(5, rows, seed=1).requires_grad_()
    x = randn(5, cols, seed=2).requires_grad_()
    torch.library.opcheck(OPS.bsmm_sdd.default, (dy, x, layout.index, rows, cols, b, cpu_backend))


@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_to_dense(shape):
    rows, cols, b, _ = shape
    layout = layout_of(*shape)
    values = randn(layout.nnz_blocks, b, b, seed=2).requires_grad_()
    torch.library.opcheck(OPS.to_dense.default, (values, layout.index, rows, cols, b))


@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_from_dense(shape):
    rows, cols, b, _ = shape
    layout = layout_of(*shape)
    weight = randn(rows, cols, seed=2).requires_grad_()
    torch.library.opcheck(OPS.from_dense.default, (weight, layout.index, rows, cols, b))


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_opcheck_masked_adam(cpu_backend, decoupled, amp):
    shapes = [(7, 13), (5,), (3, 4, 6)]
    params = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    grads = [randn(*s, seed=10 + i) for i, s in enumerate(shapes)]
    exp_avgs = [randn(*s, seed=20 + i, scale=0.1) for i, s in enumerate(shapes)]
    exp_avg_sqs = [randn(*s, seed=30 + i, scale=0.1).abs() for i, s in enumerate(shapes)]
    masks = [torch.rand(shapes[0], generator=gen(1)) < 0.5, None,
             torch.rand(shapes[2], generator=gen(2)) < 0.3]
    grad_scale = torch.tensor([4.0]) if amp else None
    found_inf = torch.tensor([0.0]) if amp else None
    torch.library.opcheck(
        OPS.masked_adam_.default,
        (params, grads, exp_avgs, exp_avg_sqs, masks, grad_scale, found_inf, 3, 1e-2, 0.9, 0.999, 1e-8, 0.01,
         decoupled, cpu_backend),
    )


def test_compiled_linear_matches_eager(cpu_backend):
    """The custom ops trace into a graph (aot_eager keeps it cheap: no C++ compiler)."""
    layout = layout_of(40, 70, 32, 0.5)
    values = randn(layout.nnz_blocks, 32, 32, seed=2).requires_grad_()
    bias = randn(40, seed=3).requires_grad_()
    x = randn(2, 5, 70, seed=1)

    def fn(x, values, bias):
        return sk.ops.block_sparse_linear(x, values, layout, bias, backend=cpu_backend)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y = compiled(x, values, bias)
    y.sum().backward()
    grads = (values.grad.clone(), bias.grad.clone())
    values.grad = bias.grad = None
    y_eager = fn(x, values, bias)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grads[0], values.grad)
    torch.testing.assert_close(grads[1], bias.grad)
