"""The numba-drawn Dropout used by set-kernels train: nn.Dropout's semantics, seeded by torch."""
from __future__ import annotations

import pytest
import torch

from set_kernels.nn.dropout import Dropout


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_rate_scale_and_gradient(p, dtype):
    x = (torch.rand(300, 1000, dtype=dtype) + 0.5).requires_grad_()  # never 0
    y = Dropout(p)(x)
    kept = y != 0
    rate = kept.double().mean().item()
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(rate - (1 - p)) < 6 * sd, rate
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * kept / (1 - p))


def test_seeded_by_torch_and_fresh_per_call():
    x = torch.ones(40, 1000)
    d = Dropout(0.2)
    torch.manual_seed(3)
    a, b = d(x), d(x)
    torch.manual_seed(3)
    assert torch.equal(d(x), a)
    assert not torch.equal(a, b), "two calls must draw two masks"
    # neighbouring elements and rows are not correlated (the hash is per element)
    m = (a != 0).double()
    assert abs(torch.corrcoef(torch.stack([m[:, :-1].reshape(-1), m[:, 1:].reshape(-1)]))[0, 1]) < 0.03


def test_eval_identity_and_fallbacks():
    d = Dropout(0.3).eval()
    x = torch.randn(5, 7)
    assert d(x) is x
    d.train()
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    xb = x.to(torch.bfloat16)
    y = d(xb)  # no numba kernel for bf16: F.dropout, same semantics
    kept = y != 0
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y[kept].float(), xb[kept].float() / 0.7, rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="^p: "):
        Dropout(1.5)


def _fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_kernel_matches_the_documented_hash():
    """keep[i] = fmix32(fmix32(lo(i) + k0) ^ (k1 + hi(i) * golden)) >= threshold, for both kernels."""
    import numpy as np

    from set_kernels.backends import numba as nb

    kernel = nb._load()[4]
    k0, k1, p = 0xDEADBEEF, 0x12345678, 0.3
    threshold = int(p * 2**32)
    x = np.arange(1, 3001, dtype=np.float64)
    expect = np.array([x[i] / (1 - p) if _fmix32(_fmix32((i + k0) & 0xFFFFFFFF) ^ k1) >= threshold else 0.0
                       for i in range(x.size)])
    for fn in (kernel.dropout_serial, kernel.dropout_parallel, kernel.dropout):
        out = np.empty_like(x)
        fn(x, k0, k1, threshold, 1 / (1 - p), out)
        np.testing.assert_allclose(out, expect, rtol=1e-15)


@pytest.mark.parametrize("numel", [40 * 1000, 600 * 1000])  # the serial and the parallel kernel
def test_mask_independent_of_thread_count(numel):
    x = torch.ones(numel)
    d = Dropout(0.4)
    before = torch.get_num_threads()
    masks = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(11)
            masks.append(d(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(masks[0], m) for m in masks[1:])


def test_seeds_do_not_give_shifted_streams():
    """Different seeds give masks that agree only as much as independent draws would."""
    x = torch.ones(100_000)
    d = Dropout(0.5)
    torch.manual_seed(0)
    a, b = (d(x) != 0), (d(x) != 0)
    for shift in (0, 1, 2, 17, 1000):
        agree = (a[shift:] == b[:b.numel() - shift]).double().mean().item()
        assert abs(agree - 0.5) < 6 * (0.25 / a.numel()) ** 0.5, (shift, agree)


def test_backward_non_contiguous_grad_and_double_backward():
    x = (torch.rand(40, 100) + 0.5).requires_grad_()
    torch.manual_seed(5)
    y = Dropout(0.2)(x.t())  # non-contiguous input
    kept = (y != 0).to(x.dtype)
    y.sum().backward()  # an expanded (stride 0) grad
    torch.testing.assert_close(x.grad, (kept / 0.8).t())
    x.grad = None
    torch.manual_seed(5)
    y = Dropout(0.2)(x.t())
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)  # d/dx = 2 y * mult
    torch.testing.assert_close(g, (2 * y * kept / 0.8).t())
    g.sum().backward()  # second order: 2 * mult**2
    torch.testing.assert_close(x.grad, (2 * kept / 0.8 ** 2).t())


def test_numba_threads_follow_torch():
    """The backend's cheap thread sync still follows torch.set_num_threads (and undoes a direct
    numba.set_num_threads) on every call."""
    import numba

    from set_kernels.backends import numba as nb

    before = torch.get_num_threads()
    pool = numba.config.NUMBA_NUM_THREADS
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            nb._load()
            assert numba.get_num_threads() == min(n, pool)
        if pool >= 2:
            numba.set_num_threads(2)
            nb._load()
            assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        nb._load()


@pytest.mark.parametrize("numel", [40 * 1000, 600 * 1000])  # the serial and the parallel kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_dropout_is_relu_then_dropout_bit_for_bit(numel, dtype):
    """The fused module draws the same mask as ReLU -> Dropout and gives the same values and
    gradients, exactly; zeros and negative inputs get no gradient (ReLU's convention at 0)."""
    from set_kernels.nn.dropout import ReLUDropout

    x = torch.randn(numel, dtype=dtype)
    x[::7] = 0.0
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(numel, dtype=dtype)
    torch.manual_seed(21)
    y1 = ReLUDropout(0.3)(x1)
    torch.manual_seed(21)
    y2 = Dropout(0.3)(torch.relu(x2))
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    kept = (y2 != 0)
    assert kept.any() and (~kept & (x > 0)).any()  # both kinds of zero occur
    assert torch.equal(x1.grad != 0, kept & (g != 0))


def test_relu_dropout_eval_fallback_and_double_backward():
    from set_kernels.nn.dropout import ReLUDropout

    x = torch.randn(40, 100, dtype=torch.float64)
    d = ReLUDropout(0.2)
    assert torch.equal(d.eval()(x), torch.relu(x))
    d.train()
    assert torch.equal(ReLUDropout(0.0)(x), torch.relu(x))
    assert torch.equal(ReLUDropout(1.0)(x), torch.zeros_like(x))
    xb = x.to(torch.bfloat16)
    yb = d(xb)  # no numba kernel for bf16: F.relu then F.dropout
    kept = yb != 0
    assert yb.dtype == torch.bfloat16 and (yb >= 0).all()
    torch.testing.assert_close(yb[kept].float(), torch.relu(xb)[kept].float() / 0.8, rtol=1e-2, atol=0)
    xg = x.clone().requires_grad_()
    torch.manual_seed(4)
    y = d(xg.t())  # non-contiguous input
    pos = (y > 0).to(x.dtype)
    (g,) = torch.autograd.grad((y * y).sum(), xg, create_graph=True)  # 2 y * mult where y > 0
    torch.testing.assert_close(g, (2 * y * pos / 0.8).t())
    g.sum().backward()  # second order: 2 * mult**2 where y > 0
    torch.testing.assert_close(xg.grad, (2 * pos / 0.8 ** 2).t())


@pytest.mark.parametrize("n", [1, 3])
def test_starting_numba_keeps_torch_thread_count(n):
    """Starting numba's OpenMP pool resets the process's OpenMP thread count, which torch reads as
    its own; the backend puts torch's back. Needs a fresh process (the pool starts once)."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(%d)\n"
            "import set_kernels as sk\n"
            "from set_kernels.backends import numba as nb\n"
            "assert nb.availability()[0], nb.availability()[1]\n"
            "sk.BlockSparseLayout.random(50, 40, 1, 0.2)  # the first numba use: the index builder\n"
            "print(torch.get_num_threads())\n" % n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == n


# ------------------------------------------------------------------- fused SparseLinear + ReLUDropout
class _Readout(torch.nn.Linear):
    """An ``nn.Linear`` that a fused run does not take in (not exactly ``nn.Linear``): the tests
    of the run's bits against the modules use it."""


def _mlp(dtype, density=None, sizes=(70, 53, 33, 5), bias=True, fuse_readout=False, readout_bias=True):
    """SparseLinear(b=1) + ReLUDropout pairs and a dense readout, as a FusedSequential and as a
    plain Sequential of the same modules. The readout is an ``nn.Linear`` (which the fused run
    takes in) when ``fuse_readout``, else a :class:`_Readout`."""
    import set_kernels as sk
    from set_kernels.nn.dropout import FusedSequential, ReLUDropout

    g = torch.Generator().manual_seed(3)
    mods = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-2], sizes[1:-1])):
        d = density if density is not None else (0.3, 0.6)[k % 2]
        lin = sk.SparseLinear(n_in, n_out, density=d, block_size=1, generator=g, dtype=dtype, bias=bias)
        with torch.no_grad():
            lin.values.uniform_(-1, 1, generator=g)
            if bias:
                lin.bias.uniform_(-0.3, 0.3, generator=g)
        mods += [lin, ReLUDropout(0.25)]
    head = (torch.nn.Linear if fuse_readout else _Readout)(sizes[-2], sizes[-1], dtype=dtype, bias=readout_bias)
    with torch.no_grad():
        head.weight.uniform_(-0.5, 0.5, generator=g)
        if readout_bias:
            head.bias.uniform_(-0.3, 0.3, generator=g)
    mods.append(head)
    return FusedSequential(*mods), torch.nn.Sequential(*mods)


def _run(model, x, seed=9, create_graph=False):
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)  # the masks' draws
    x = x.clone().requires_grad_()
    y = model(x)
    if create_graph:  # a gradient penalty: the double backward
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.square().sum().backward()
        return [gx.detach()] + [p.grad for p in model.parameters()]
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


def _count_chain_nodes(monkeypatch):
    """Patch the fused run's forward to record the number of layers of each call, plus 0.5 when
    it takes in a readout."""
    from set_kernels.nn import dropout

    calls = []
    f = dropout._SparseReLUDropoutChain.forward
    monkeypatch.setattr(dropout._SparseReLUDropoutChain, "forward",
                        staticmethod(lambda ctx, x, layers, readout, *p:
                                     calls.append(len(layers) + (0.5 if readout else 0)) or f(ctx, x, layers, readout, *p)))
    return calls


def _assert_same_as_modules(got, ref, plain, M, dtype):
    """Bit for bit, except the element layers' bias gradients (summed in another order: close)."""
    names = ["y", "dx"] + [n for n, _ in plain.named_parameters()]
    assert len(got) == len(ref) == len(names)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    readout = f"{len(plain) - 1}.bias"
    for name, a, b in zip(names, got, ref):
        if name.endswith("bias") and name != readout:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * M, msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,density", [(1, None), (7, None), (40, None), (300, None), (9, 0.0), (9, 1.0)])
def test_fused_sparse_relu_dropout_matches_the_modules(dtype, M, density, monkeypatch):
    """FusedSequential runs the element SparseLinear + ReLUDropout pairs as one node (checked:
    one call of the fused run, with both layers), with the same masks and values as the modules
    one by one: bit for bit in the outputs, dx and dW; the bias gradients are summed in another
    order (close). Up to and past the long-run forward (256 tokens), empty and full layers (no
    product to fuse with)."""
    from set_kernels.backends import numba as nb

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    fused, plain = _mlp(dtype, density)
    x = torch.randn(M, 70, generator=torch.Generator().manual_seed(M), dtype=dtype)
    calls = _count_chain_nodes(monkeypatch)
    token_major = []  # the path that keeps the activations token-major: taken below 256 tokens with live entries
    f = nb.relu_dropout_chain_backward
    monkeypatch.setattr(nb, "relu_dropout_chain_backward", lambda *a: token_major.append(1) or f(*a))
    got = _run(fused, x)
    assert calls == [2]
    assert len(token_major) == (1 if M < 256 and density != 0.0 else 0)
    ref = _run(plain, x)
    assert calls == [2]
    _assert_same_as_modules(got, ref, plain, M, dtype)


def test_fused_run_without_bias(monkeypatch):
    """Element layers without bias run fused too, with what the modules give, bit for bit."""
    from set_kernels.backends import numba as nb

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    fused, plain = _mlp(torch.float32, bias=False)
    x = torch.randn(13, 70, generator=torch.Generator().manual_seed(8))
    calls = _count_chain_nodes(monkeypatch)
    got, ref = _run(fused, x), _run(plain, x)
    assert calls == [2]
    names = ["y", "dx"] + [n for n, _ in plain.named_parameters()]
    assert len(got) == len(ref) == len(names) == 6
    for name, a, b in zip(names, got, ref):
        assert torch.equal(a, b), name


def test_fused_run_is_cut_by_a_hook_and_skips_unneeded_grads(monkeypatch):
    """Three pairs, a hook on the middle SparseLinear: the first and last pairs run fused (one
    layer each), the middle one module by module, and everything is still what the modules give.
    An input that needs no gradient, a frozen first layer and frozen middle weights: no dx and no
    dW where none is needed, the rest as the modules give it."""
    from set_kernels.backends import numba as nb

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    fused, plain = _mlp(torch.float64, sizes=(30, 41, 17, 23, 4))
    x = torch.randn(11, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    calls = _count_chain_nodes(monkeypatch)
    seen = []
    handle = fused[2].register_forward_hook(lambda *args: seen.append(1))
    got, ref = _run(fused, x), _run(plain, x)
    assert calls == [1, 1] and len(seen) == 2
    _assert_same_as_modules(got, ref, plain, 11, torch.float64)
    handle.remove()
    frozen = (fused[0].values, fused[0].bias, fused[2].values)  # the middle layer: dx but no dW
    for p in frozen:
        p.requires_grad_(False)
    try:
        results = []
        for model in (fused, plain):
            for p in model.parameters():
                p.grad = None
            torch.manual_seed(2)
            y = model(x)
            y.backward(torch.ones_like(y))
            results.append([y] + [p.grad for p in model.parameters()])
        assert calls == [1, 1, 3]
        assert results[0][1] is None and results[0][2] is None and results[0][3] is None
        for name, a, b in zip(["y"] + [n for n, _ in plain.named_parameters()], *results):
            if a is None or b is None:
                assert a is None and b is None, name
            elif name.endswith("bias") and name != "6.bias":
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11, msg=name)
            else:
                assert torch.equal(a, b), name
    finally:
        for p in frozen:
            p.requires_grad_(True)


def test_fused_run_is_cut_by_a_layer_of_another_backend(monkeypatch):
    """Three pairs, the middle SparseLinear on the torch backend: the first and last pairs run
    fused (the backend is resolved per layer: the first layer's answer is not reused for the
    others), the middle one module by module; then the middle layer back on auto: one run of
    three. The outputs and gradients are what the modules give."""
    from set_kernels.backends import numba as nb

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    fused, plain = _mlp(torch.float64, sizes=(30, 41, 17, 23, 4))
    x = torch.randn(11, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    calls = _count_chain_nodes(monkeypatch)
    fused[2].backend = "torch"
    got = _run(fused, x)
    assert calls == [1, 1]
    fused[2].backend = None
    ref = _run(plain, x)
    _assert_same_as_modules(_run(fused, x), ref, plain, 11, torch.float64)
    assert calls == [1, 1, 3]
    for name, a, b in zip(["y", "dx"], got, ref):  # the torch backend's sums: close
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_fused_path_falls_back_to_the_modules():
    """Hooks, eval mode, another dtype or backend, and the double backward: FusedSequential
    then gives exactly what the modules give (and a hook sees its module's call)."""
    from set_kernels.backends import numba as nb

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    fused, plain = _mlp(torch.float64)
    x = torch.randn(6, 70, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []
    handle = fused[0].register_forward_hook(lambda *args: seen.append(1))
    for a, b in zip(_run(fused, x), _run(plain, x)):
        assert torch.equal(a, b)
    assert len(seen) == 2
    handle.remove()
    fused.eval()
    plain.eval()
    assert torch.equal(fused(x), plain(x))
    fused.train()
    plain.train()
    for a, b in zip(_run(fused, x, create_graph=True), _run(plain, x, create_graph=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fused[0].backend = fused[2].backend = "torch"  # not the numba backend: module by module
    for a, b in zip(_run(fused, x), _run(plain, x)):
        assert torch.equal(a, b)


def _assert_close_to_modules(got, ref, plain, dtype, exact_y=False):
    """Every output and gradient close to the modules' (the readout's kernels sum in their own
    order); ``exact_y``: the output bit for bit."""
    names = ["y", "dx"] + [n for n, _ in plain.named_parameters()]
    assert len(got) == len(ref) == len(names)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    for name, a, b in zip(names, got, ref):
        if a is None or b is None:
            assert a is None and b is None, name
        elif exact_y and name == "y":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M", [1, 7, 40, 255, 300])
def test_fused_run_takes_in_a_small_readout(dtype, M, monkeypatch):
    """A plain ``nn.Linear`` of at most ``READOUT_MAX`` outputs after the pairs joins the fused
    run (one node: both layers and the readout). Below 256 tokens its kernels sum in their own
    order: the outputs and every gradient are close to the modules' (the same masks: a wrong
    mask would move them by far more); from 256 tokens the layers run one by one and the readout
    through ``F.linear``, so the output is the modules' bit for bit."""
    from set_kernels.backends import numba as nb
    from set_kernels.nn import dropout

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    assert dropout._READOUT_MAX == nb._load()[3].READOUT_MAX
    fused, plain = _mlp(dtype, sizes=(70, 53, 33, 10), fuse_readout=True)
    x = torch.randn(M, 70, generator=torch.Generator().manual_seed(M + 1), dtype=dtype)
    calls = _count_chain_nodes(monkeypatch)
    got = _run(fused, x)
    assert calls == [2.5]
    ref = _run(plain, x)
    assert calls == [2.5]
    _assert_close_to_modules(got, ref, plain, dtype, exact_y=M >= 256)
    assert not torch.equal(got[-2], torch.zeros_like(got[-2])), "no readout weight gradient"


def test_fused_readout_variants(monkeypatch):
    """A readout without bias, a frozen readout weight (no dW for it, the rest as before), a
    readout of more than READOUT_MAX outputs and one with a hook (both run as modules, bit for
    bit, the hook sees its call), and the double backward through a fused readout."""
    from set_kernels.backends import numba as nb
    from set_kernels.nn import dropout

    if not nb.availability()[0]:
        pytest.skip(nb.availability()[1])
    x = torch.randn(9, 70, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = _count_chain_nodes(monkeypatch)
    fused, plain = _mlp(torch.float64, sizes=(70, 53, 33, 10), fuse_readout=True, readout_bias=False)
    _assert_close_to_modules(_run(fused, x), _run(plain, x), plain, torch.float64)
    assert calls == [2.5]
    fused[4].weight.requires_grad_(False)
    got, ref = _run(fused, x), _run(plain, x)
    assert got[-1] is None
    _assert_close_to_modules(got, ref, plain, torch.float64)
    assert calls == [2.5, 2.5]
    fused[4].weight.requires_grad_(True)
    for a, b in zip(_run(fused, x, create_graph=True), _run(plain, x, create_graph=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # (squares of values up to ~20)
    assert calls[2:] == [2.5, 1, 1]  # the fused node, then its replay: one node per layer (and F.linear)
    calls.clear()
    wide, wide_plain = _mlp(torch.float64, sizes=(70, 53, 33, dropout._READOUT_MAX + 1), fuse_readout=True)
    _assert_same_as_modules(_run(wide, x), _run(wide_plain, x), wide_plain, 9, torch.float64)
    assert calls == [2]
    calls.clear()
    seen = []
    fused[4].register_forward_hook(lambda *args: seen.append(1))
    _assert_same_as_modules(_run(fused, x), _run(plain, x), plain, 9, torch.float64)
    assert calls == [2] and len(seen) == 2
