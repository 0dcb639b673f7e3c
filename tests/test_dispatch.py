"""Backend dispatch: auto choice per dtype, backend= and $SET_KERNELS_BACKEND, errors, info()."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import set_kernels as sk
from conftest import GPU_BACKENDS, REQUIRED_CPU_BACKENDS, gen, randn, require_backend
from set_kernels import backends

CPU = torch.device("cpu")
ENV = backends.ENV_VAR


def test_env_var_name():
    assert ENV == "SET_KERNELS_BACKEND"


@pytest.mark.parametrize("name", REQUIRED_CPU_BACKENDS)
def test_required_cpu_backends_are_available(name):
    ok, why = backends.availability(name)
    assert ok, f"{name} must be available on CPU: {why}"
    assert why == ""


@pytest.fixture
def spy(monkeypatch):
    """spy(name, op) wraps backend ``name``'s ``op`` and returns the list of its calls."""

    def install(name, op):
        require_backend(name)
        mod = backends.get(name)
        original = getattr(mod, op)
        calls = []

        def wrapper(*args, **kwargs):
            calls.append(op)
            return original(*args, **kwargs)

        monkeypatch.setattr(mod, op, wrapper)
        return calls

    return install


def small_problem(dtype):
    layout = sk.BlockSparseLayout.random(40, 70, 16, 0.5, generator=gen(0))
    values = randn(layout.nnz_blocks, 16, 16, dtype=dtype, seed=1).requires_grad_()
    x = randn(3, 70, dtype=dtype, seed=2).requires_grad_()
    return layout, values, x


# ------------------------------------------------------------------------------------ auto
@pytest.mark.parametrize("dtype,expected", [(torch.float32, "numba"), (torch.float64, "numba"),
                                            (torch.bfloat16, "torch"), (torch.float16, "torch")])
@pytest.mark.parametrize("op", backends.OPS)
def test_auto_on_cpu(op, dtype, expected):
    require_backend(expected)
    assert backends.resolve(None, op, CPU, dtype) == expected
    assert backends.resolve("auto", op, CPU, dtype) == expected


@pytest.mark.parametrize("dtype,expected", [(torch.float32, "numba"), (torch.bfloat16, "torch")])
def test_auto_calls_the_chosen_backend(spy, dtype, expected):
    other = "torch" if expected == "numba" else "numba"
    calls = {name: {op: spy(name, op) for op in ("linear_forward", "linear_grad_input", "linear_grad_weight")} for name in (expected, other)}
    layout, values, x = small_problem(dtype)
    sk.ops.block_sparse_linear(x, values, layout).sum().backward()
    assert all(len(c) == 1 for c in calls[expected].values()), calls
    assert all(len(c) == 0 for c in calls[other].values()), calls


def test_auto_masked_adam_calls_numba_for_fp32(spy):
    numba_calls, torch_calls = spy("numba", "masked_adam_"), spy("torch", "masked_adam_")
    p = torch.nn.Parameter(randn(10, seed=0))
    p.grad = randn(10, seed=1)
    sk.optim.MaskedAdam([p]).step()
    assert len(numba_calls) == 1 and len(torch_calls) == 0


# -------------------------------------------------------------------------- forcing one
@pytest.mark.parametrize("name", REQUIRED_CPU_BACKENDS)
def test_backend_argument_forces(spy, name):
    other = "torch" if name == "numba" else "numba"
    chosen, not_chosen = spy(name, "linear_forward"), spy(other, "linear_forward")
    layout, values, x = small_problem(torch.float32)
    sk.ops.block_sparse_linear(x, values, layout, backend=name)
    assert len(chosen) == 1 and len(not_chosen) == 0


@pytest.mark.parametrize("name", REQUIRED_CPU_BACKENDS)
def test_env_var_overrides_auto(spy, monkeypatch, name):
    other = "torch" if name == "numba" else "numba"
    monkeypatch.setenv(ENV, name)
    chosen, not_chosen = spy(name, "linear_forward"), spy(other, "linear_forward")
    layout, values, x = small_problem(torch.float32)
    sk.ops.block_sparse_linear(x, values, layout)
    sk.ops.block_sparse_linear(x, values, layout, backend="auto")
    assert len(chosen) == 2 and len(not_chosen) == 0
    assert backends.resolve(None, "masked_adam_", CPU, torch.float64) == name


def test_env_var_auto_means_auto(monkeypatch):
    require_backend("numba")
    monkeypatch.setenv(ENV, "auto")
    assert backends.resolve(None, "linear_forward", CPU, torch.float32) == "numba"


def test_backend_argument_beats_env_var(spy, monkeypatch):
    monkeypatch.setenv(ENV, "numba")
    torch_calls, numba_calls = spy("torch", "linear_forward"), spy("numba", "linear_forward")
    layout, values, x = small_problem(torch.float32)
    sk.ops.block_sparse_linear(x, values, layout, backend="torch")
    assert len(torch_calls) == 1 and len(numba_calls) == 0


def test_layer_and_optimizer_backend_attribute(spy):
    torch_calls = spy("torch", "linear_forward")
    adam_calls = spy("torch", "masked_adam_")
    layer = sk.nn.SparseLinear(70, 40, density=0.5, block_size=16, backend="torch")
    opt = sk.optim.MaskedAdam(layer.parameters(), backend="torch")
    layer(randn(2, 70, seed=0)).sum().backward()
    opt.step()
    assert len(torch_calls) == 1 and len(adam_calls) == 1


# ----------------------------------------------------------------------------------- errors
def test_env_var_unknown_name(monkeypatch):
    monkeypatch.setenv(ENV, "fortran")
    layout, values, x = small_problem(torch.float32)
    with pytest.raises(ValueError, match=r"SET_KERNELS_BACKEND.*'fortran'"):
        sk.ops.block_sparse_linear(x, values, layout)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_backend_on_cpu_tensors_raises_with_reason(name):
    layout, values, x = small_problem(torch.float32)
    with pytest.raises(RuntimeError, match=rf"backend='{name}' cannot run linear_forward on cpu") as info:
        sk.ops.block_sparse_linear(x, values, layout, backend=name)
    reason = str(info.value).split(": ", 1)[1]
    assert reason.strip(), "the message must say why"
    ok, why = backends.availability(name)
    if not ok:
        assert why and why in str(info.value)
    else:  # built, but these are CPU tensors
        assert "cpu" in reason


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_backend_from_env_raises_with_reason(monkeypatch, name):
    monkeypatch.setenv(ENV, name)
    p = torch.nn.Parameter(randn(4, seed=0))
    p.grad = randn(4, seed=1)
    with pytest.raises(RuntimeError, match=rf"SET_KERNELS_BACKEND='{name}' cannot run masked_adam_"):
        sk.optim.MaskedAdam([p]).step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_numba_rejects_half_precision_with_reason(dtype):
    require_backend("numba")
    layout, values, x = small_problem(dtype)
    with pytest.raises(RuntimeError, match=r"numba.*dtypes .*float32.*not " + str(dtype).replace("torch.", "")):
        sk.ops.block_sparse_linear(x, values, layout, backend="numba")


def test_numba_rejects_other_devices_with_reason():
    require_backend("numba")
    reasons = backends.unsupported_reasons("numba", "linear_forward", torch.device("meta"), torch.float32)
    assert any("cpu" in r and "meta" in r for r in reasons), reasons
    with pytest.raises(RuntimeError, match="numba"):
        backends.resolve("numba", "linear_forward", torch.device("meta"), torch.float32)


@pytest.mark.parametrize("name", ["", "Torch", "gpu", "cpu"])
def test_unknown_backend_name(name):
    with pytest.raises(ValueError, match=r"^backend: "):
        backends.resolve(name, "linear_forward", CPU, torch.float32)


# ----------------------------------------------------------------------------------- info
def test_info_lists_every_backend_with_reasons():
    info = sk.info()
    assert set(info) == set(backends.BACKENDS)
    for name, entry in info.items():
        ok, why = backends.availability(name)
        assert entry["available"] is ok
        assert entry["reason"] == why
        assert bool(entry["reason"]) != entry["available"], name
    for name in REQUIRED_CPU_BACKENDS:
        assert info[name]["available"], info[name]["reason"]
        assert set(info[name]["ops"]) == set(backends.OPS), name


def test_python_m_set_kernels_info():
    out = subprocess.run([sys.executable, "-m", "set_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in backends.BACKENDS:
        assert name in out.stdout


def test_mixed_dtype_params_use_one_backend_per_dtype(spy):
    numba_calls, torch_calls = spy("numba", "masked_adam_"), spy("torch", "masked_adam_")
    params = [torch.nn.Parameter(randn(10, seed=0)), torch.nn.Parameter(randn(6, dtype=torch.bfloat16, seed=1)),
              torch.nn.Parameter(randn(4, dtype=torch.float64, seed=2))]
    before = [p.detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = randn(*p.shape, dtype=p.dtype, seed=10 + i)
    sk.optim.MaskedAdam(params, lr=0.1).step()
    assert len(numba_calls) == 1 and len(torch_calls) == 1  # fp32 + fp64 together on numba, bf16 on torch
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
