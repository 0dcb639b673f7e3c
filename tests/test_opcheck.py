"""torch.library.opcheck on every set_kernels custom op, for every backend this machine runs.

opcheck runs the op against its schema (declared mutations), its fake (meta) implementation,
its autograd registration and AOT dispatch with dynamic shapes. Backends: the required CPU ones
(their absence fails), any other backend that takes CPU tensors here (triton in its
interpreter), and, with a GPU, every backend that runs on CUDA tensors. Shapes stay <= 64 so
that an interpreted backend stays quick.
"""
from __future__ import annotations

import pytest
import torch

import set_kernels as sk
from set_kernels import backends
from conftest import REQUIRED_BACKENDS, gen, randn, require_backend

BSL = sk.BlockSparseLayout
OPS = torch.ops.set_kernels

# (rows, cols, block_size, density): partial-edge cases and an empty layout.
LAYOUTS = [(40, 61, 32, 0.5), (33, 47, 16, 1.0), (64, 48, 16, 0.0), (37, 29, 1, 0.3), (20, 21, 1, 0.0)]


def _targets(op: str):
    """(backend, device) pairs to check ``op`` on."""
    out = [(name, "cpu") for name in REQUIRED_BACKENDS]
    for name in backends.BACKENDS:
        if name not in REQUIRED_BACKENDS and not backends.unsupported_reasons(name, op, torch.device("cpu"),
                                                                              torch.float32):
            out.append((name, "cpu"))
    if torch.cuda.is_available():
        out += [(name, "cuda") for name in backends.BACKENDS
                if not backends.unsupported_reasons(name, op, torch.device("cuda"), torch.float32)]
    return out


def _ids(target):
    return f"{target[0]}-{target[1]}"


@pytest.fixture
def target(request):
    name, device = request.param
    if device == "cpu":
        require_backend(name)
    return name, torch.device(device)


def layout_of(rows, cols, b, density, device="cpu"):
    return BSL.random(rows, cols, b, density, generator=gen(rows * cols)).to(device)


@pytest.mark.parametrize("target", _targets("linear_forward"), ids=_ids, indirect=True)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_linear_forward(target, shape, has_bias):
    backend, dev = target
    rows, cols, b, _ = shape
    layout = layout_of(*shape, device=dev)
    x = randn(5, cols, seed=1).to(dev).requires_grad_()
    values = randn(layout.nnz_blocks, b, b, seed=2).to(dev).requires_grad_()
    bias = randn(rows, seed=3).to(dev).requires_grad_() if has_bias else None
    with backends.use(backend):  # the op records no backend; its kernel picks this one
        torch.library.opcheck(OPS.linear_forward.default, (x, values, layout.index, bias, rows, cols, b))


@pytest.mark.parametrize("target", _targets("linear_grad_input"), ids=_ids, indirect=True)
@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_linear_grad_input(target, shape):
    backend, dev = target
    rows, cols, b, _ = shape
    layout = layout_of(*shape, device=dev)
    dy = randn(5, rows, seed=1).to(dev).requires_grad_()
    values = randn(layout.nnz_blocks, b, b, seed=2).to(dev).requires_grad_()
    with backends.use(backend):  # the op records no backend; its kernel picks this one
        torch.library.opcheck(OPS.linear_grad_input.default, (dy, values, layout.index, rows, cols, b))


@pytest.mark.parametrize("target", _targets("linear_grad_weight"), ids=_ids, indirect=True)
@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_linear_grad_weight(target, shape):
    backend, dev = target
    rows, cols, b, _ = shape
    layout = layout_of(*shape, device=dev)
    dy = randn(5, rows, seed=1).to(dev).requires_grad_()
    x = randn(5, cols, seed=2).to(dev).requires_grad_()
    with backends.use(backend):  # the op records no backend; its kernel picks this one
        torch.library.opcheck(OPS.linear_grad_weight.default, (dy, x, layout.index, rows, cols, b))


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


@pytest.mark.parametrize("target", _targets("masked_adam_"), ids=_ids, indirect=True)
@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_opcheck_masked_adam(target, decoupled, amp):
    backend, dev = target
    shapes = [(7, 13), (5,), (3, 4, 6)]
    params = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    grads = [randn(*s, seed=10 + i) for i, s in enumerate(shapes)]
    exp_avgs = [randn(*s, seed=20 + i, scale=0.1) for i, s in enumerate(shapes)]
    exp_avg_sqs = [randn(*s, seed=30 + i, scale=0.1).abs() for i, s in enumerate(shapes)]
    masks = [torch.rand(shapes[0], generator=gen(1)) < 0.5, None,
             torch.rand(shapes[2], generator=gen(2)) < 0.3]
    grad_scale = torch.tensor([4.0]) if amp else None
    found_inf = torch.tensor([0.0]) if amp else None
    params, grads, exp_avgs, exp_avg_sqs, masks = (
        [None if t is None else t.to(dev) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, masks))
    grad_scale, found_inf = (None if t is None else t.to(dev) for t in (grad_scale, found_inf))
    with backends.use(backend):
        torch.library.opcheck(
            OPS.masked_adam_.default,
            (params, grads, exp_avgs, exp_avg_sqs, masks, grad_scale, found_inf, 3, 1e-2, 0.9, 0.999, 1e-8, 0.01,
             decoupled),
        )


def test_compiled_linear_matches_eager(cpu_backend):
    """The custom ops trace into a graph (aot_eager keeps it cheap: no C++ compiler)."""
    layout = layout_of(40, 61, 32, 0.5)
    values = randn(layout.nnz_blocks, 32, 32, seed=2).requires_grad_()
    bias = randn(40, seed=3).requires_grad_()
    x = randn(2, 5, 61, seed=1)

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
