"""torch.compile(fullgraph=True) on models built from SparseLinear and MaskedLinear.

Every test proves the absence of graph breaks (fullgraph=True raises on one, a compile counter
shows one graph per model and no recompiles) and compares the forward output and every
gradient with eager mode. The cheap ``aot_eager`` compiler backend traces through dynamo and
AOT autograd exactly as inductor does; one test also runs inductor itself.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import set_kernels as sk
from set_kernels import backends
from conftest import GPU_BACKENDS, REQUIRED_CPU_BACKENDS, gen, randn, require_backend


def _cpu_backends() -> list[str]:
    """Required CPU backends, plus any other backend that can run on CPU tensors here."""
    names = list(REQUIRED_CPU_BACKENDS)
    for name in backends.BACKENDS:
        if name not in names and not backends.unsupported_reasons(name, "linear_forward", torch.device("cpu"),
                                                                  torch.float32):
            names.append(name)
    return names


CPU_BACKENDS = _cpu_backends()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(backend, device="cpu", dtype=torch.float32, seed=0, last_block_size=None):
    """SparseLinear (partial edge blocks) -> ReLU -> MaskedLinear -> SparseLinear (no bias).

    The last layer has block size 16, or 1 (element sparsity) on CPU backends that run it.
    """
    g = gen(seed)
    if last_block_size is None:
        last_block_size = 1 if device == "cpu" and backend in ("numba", "torch") else 16
    return torch.nn.Sequential(
        sk.nn.SparseLinear(61, 45, density=0.5, block_size=16, generator=g, backend=backend, device=device,
                           dtype=dtype),
        torch.nn.ReLU(),
        sk.nn.MaskedLinear(45, 33, density=0.4, generator=g, device=device, dtype=dtype),
        torch.nn.Tanh(),
        sk.nn.SparseLinear(33, 19, bias=False, density=0.7 if last_block_size > 1 else 0.3,
                           block_size=last_block_size, generator=g, backend=backend, device=device, dtype=dtype),
    )


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def run_both(model, xs, compiler="aot_eager", dynamic=None):
    """Compile a deep copy with fullgraph=True; run eager and compiled on each x (fwd + bwd)."""
    counter = CompileCounterWithBackend(compiler)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True, dynamic=dynamic)
    for x in xs:
        for m in (model, compiled_model):
            m.zero_grad(set_to_none=True)
        y_eager = model(x)
        dy = randn(*y_eager.shape, seed=7, dtype=x.dtype)
        (y_eager * dy).sum().backward()
        y_comp = compiled(x)
        (y_comp * dy).sum().backward()
        torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
        for ge, gc in zip(grads_of(model), grads_of(compiled_model)):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
    return counter


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fullgraph_forward_and_grads_match_eager(backend):
    require_backend(backend)
    model = make_model(backend)
    xs = [randn(6, 61, seed=1), randn(6, 61, seed=2)]
    counter = run_both(model, xs)
    # One graph for the whole model, no recompilation for a new input of the same shape.
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled (graph breaks or recompiles)"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explain_reports_no_graph_break_cold(backend, monkeypatch):
    """Even with no backend module loaded yet (backend resolution imports it), one graph, no break."""
    require_backend(backend)
    monkeypatch.setattr(backends, "_loaded", {})
    model = make_model(backend)
    explanation = torch._dynamo.explain(model)(randn(4, 61, seed=1))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    op_names = [str(op) for ops in explanation.ops_per_graph for op in ops]
    assert sum("set_kernels.linear_forward" in n for n in op_names) == 2, op_names


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leading_batch_dims_and_dynamic_shapes(backend):
    require_backend(backend)
    model = make_model(backend)
    xs = [randn(2, 3, 61, seed=1), randn(2, 9, 61, seed=4), randn(5, 61, seed=2), randn(7, 61, seed=3)]
    counter = run_both(model, xs, dynamic=True)
    assert counter.frame_count == 2  # one graph per input rank, none per batch size


def test_after_load_state_dict_and_to(monkeypatch):
    """A new topology loaded into the model (load_state_dict) and a .to(): still one clean graph."""
    model = make_model("numba", seed=0)
    other = make_model("numba", seed=5)  # different layouts, same nnz (same densities and shapes)
    model.load_state_dict(other.state_dict())
    model.to(torch.float64)
    x = randn(6, 61, seed=1, dtype=torch.float64)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(model(x), other.to(torch.float64)(x))
    counter = run_both(model, [x])
    assert counter.frame_count == 1


def test_training_steps_compiled_match_eager():
    """A few SGD steps through the compiled model track the eager ones."""
    model = make_model("numba")
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, compiled_model)]
    for step in range(3):
        x, target = randn(8, 61, seed=10 + step), randn(8, 19, seed=20 + step)
        for m, opt in zip((model, compiled), opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), target).backward()
            opt.step()
    for pe, pc in zip(model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)


def test_inductor_fullgraph():
    """The default compiler (inductor, C++ codegen on CPU) around the opaque custom ops."""
    model = make_model("numba")
    counter = run_both(model, [randn(6, 61, seed=1)], compiler="inductor")
    assert counter.frame_count == 1


def test_compiled_functional_op_backend_error_keeps_its_type():
    """A backend that cannot run raises the same RuntimeError compiled as in eager."""
    layout = sk.BlockSparseLayout.random(40, 61, 16, 0.5, generator=gen(0))
    values = randn(layout.nnz_blocks, 16, 16, seed=2)

    def fn(x):
        return sk.ops.block_sparse_linear(x, values, layout, backend="cuda")

    with pytest.raises(RuntimeError, match="cuda"):
        fn(randn(3, 61, seed=1))
    with pytest.raises(RuntimeError, match="cuda"):
        torch.compile(fn, backend="aot_eager")(randn(3, 61, seed=1))


@pytest.mark.parametrize("backend", GPU_BACKENDS + ("torch",))
def test_fullgraph_cuda(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reasons = backends.unsupported_reasons(backend, "linear_forward", torch.device("cuda"), torch.float32)
    if reasons:
        pytest.skip(f"backend {backend!r} cannot run on cuda: {'; '.join(reasons)}")
    model = make_model(backend, device="cuda")
    xs = [randn(6, 61, seed=1).cuda(), randn(6, 61, seed=2).cuda()]
    counter = run_both(model, xs, compiler="inductor")
    assert counter.frame_count == 1
