"""torch.export of models with SparseLinear layers: the graph records no backend.

The custom ops have one kernel per device (CPU, CUDA) that picks the backend when it runs, so an
exported program saved on one machine runs with whatever backend is selected where it is loaded:
``set_kernels.backends.use``, ``$SET_KERNELS_BACKEND``, or the device's auto order.
"""
from __future__ import annotations

import pytest
import torch

import set_kernels as sk
from set_kernels import backends
from conftest import REQUIRED_CPU_BACKENDS, gen, randn

OPS = ("linear_forward", "linear_grad_input", "linear_grad_weight", "linear_backward")


def make_model():
    g = gen(0)
    return torch.nn.Sequential(
        sk.nn.SparseLinear(61, 45, density=0.5, block_size=16, generator=g),
        torch.nn.ReLU(),
        sk.nn.SparseLinear(45, 7, density=0.3, block_size=1, generator=g),  # element sparsity
    )


@pytest.fixture
def calls(monkeypatch):
    """``{backend: number of kernel calls}`` for the required CPU backends (spied, still run)."""
    seen = {name: 0 for name in REQUIRED_CPU_BACKENDS}
    for name in REQUIRED_CPU_BACKENDS:
        mod = backends.load(name)
        for op in OPS:
            fn = getattr(mod, op, None)
            if fn is None:
                continue

            def spy(*args, _fn=fn, _name=name, **kwargs):
                seen[_name] += 1
                return _fn(*args, **kwargs)

            monkeypatch.setattr(mod, op, spy)
    return seen


def export_roundtrip(model, x, tmp_path):
    path = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), str(path))
    return torch.export.load(str(path))


def test_exported_graph_names_no_backend():
    model = make_model()
    ep = torch.export.export(model, (randn(5, 61, seed=1),))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "set_kernels" in str(n.target)]
    assert len(nodes) == 2, ep.graph
    for node in nodes:
        assert str(node.target) == "set_kernels.linear_forward.default"
        assert not any(isinstance(a, str) for a in node.args), node.args  # no backend argument
    code = ep.graph_module.code
    for name in backends.BACKENDS:
        assert repr(name) not in code, name


def test_export_save_load_run_matches_eager(tmp_path, calls):
    model = make_model()
    x = randn(5, 61, seed=1)
    loaded = export_roundtrip(model, x, tmp_path)
    before = dict(calls)
    out = loaded.module()(x)
    assert calls["numba"] > before["numba"] and calls["torch"] == before["torch"]  # auto on CPU: numba
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # the same kernels as eager
    x2 = randn(9, 61, seed=2)  # a dynamic batch dimension: the fake kernels give the output shapes
    torch.testing.assert_close(loaded.module()(x2), model(x2), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["use", "env"])
def test_exported_program_runs_with_another_backend(tmp_path, calls, monkeypatch, how):
    model = make_model()
    x = randn(5, 61, seed=1)
    loaded = export_roundtrip(model, x, tmp_path).module()
    expected = model(x).double()
    counts = dict(calls)
    if how == "use":
        with backends.use("torch"):
            out = loaded(x)
    else:
        monkeypatch.setenv(backends.ENV_VAR, "torch")
        out = loaded(x)
    assert calls["torch"] >= counts["torch"] + 2 and calls["numba"] == counts["numba"], calls
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # and back to auto: numba again
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    counts = dict(calls)
    loaded(x)
    assert calls["numba"] >= counts["numba"] + 2 and calls["torch"] == counts["torch"], calls


def test_eager_backend_argument_wins_over_use_block(calls):
    """A layer's own backend= is a per-call choice in eager mode, also for its backward."""
    g = gen(0)
    layer = sk.nn.SparseLinear(45, 7, density=0.3, block_size=1, generator=g, backend="torch")
    x = randn(5, 45, seed=1).requires_grad_()
    with backends.use("numba"):
        layer(x).sum().backward()
    assert calls["torch"] >= 3 and calls["numba"] == 0, calls


def test_use_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        with backends.use("cuda-graphs"):
            pass


def test_compiled_layer_with_explicit_backend_warns_and_follows_use(calls, monkeypatch):
    """A traced call records no backend: an explicit backend= that differs from the run-time choice
    warns once, and a backends.use() block around the compiled call selects it."""
    import warnings

    from set_kernels.ops import _library

    monkeypatch.setattr(_library, "_NOTED", set())  # the warning comes once per process
    g = gen(0)
    layer = sk.nn.SparseLinear(45, 7, density=0.3, block_size=1, generator=g, backend="torch")
    x = randn(5, 45, seed=1)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with pytest.warns(UserWarning, match=r"backend='torch' is not recorded.*here 'numba'"):
        compiled(x)
    counts = dict(calls)
    with backends.use("torch"):
        out = compiled(x)
    assert calls["torch"] > counts["torch"] and calls["numba"] == counts["numba"], calls
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(sk.nn.SparseLinear(45, 7, density=0.3, block_size=1, generator=g, backend="numba"),
                      backend="aot_eager", fullgraph=True)(x)  # the run-time choice anyway: silent
