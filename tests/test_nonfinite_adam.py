"""NaN and Inf through every CPU-runnable Adam backend (numba, torch, and triton interpreted on CPU).

* Without AMP the result is ``torch.optim.Adam``'s, NaN and Inf included: a NaN or Inf gradient
  makes the live entry NaN (or leaves it alone where IEEE says so, e.g. ``m / inf = 0`` after a
  finite gradient whose square overflows), in the parameter and in both moments.
* Masked entries come out exactly 0 even when p, m, v or the gradient hold NaN or Inf there,
  including whole 32-element runs of masked entries (the numba kernel's skip path).
* With ``found_inf`` non-zero the step is skipped: nothing changes, bit for bit.

A kernel compiled with LLVM's ``nnan``/``ninf`` fast-math flags may assume none of this happens.
"""
from __future__ import annotations

import pytest
import torch

import set_kernels as sk
from conftest import REQUIRED_CPU_BACKENDS, TRITON_INTERPRETED, randn, require_backend

BACKENDS = REQUIRED_CPU_BACKENDS + ("triton",)
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
N = 200  # > 2 runs of 32, and not a multiple of 32 (the kernels' tail path)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    if name == "triton" and not TRITON_INTERPRETED:
        ok, why = sk.backends.availability("triton")
        pytest.skip(f"triton runs on CPU tensors only interpreted (TRITON_INTERPRET=1); here: {why or 'compiled'}")
    require_backend(name)
    return name


def _state(seed=0):
    p = randn(N, seed=seed)
    m = randn(N, seed=seed + 1, scale=0.1)
    v = randn(N, seed=seed + 2, scale=0.1).abs()
    return p, m, v


def _poisoned_grad(seed=3):
    g = randn(N, seed=seed)
    g[5] = NAN
    g[6] = INF
    g[7] = -INF
    # Finite, but g * g overflows fp32 (however grouped: torch computes (1 - beta2) * g * g, the
    # kernels (1 - beta2) * (g * g)): v = inf, sqrt(v) = inf, m / inf = 0, so p stays finite.
    g[8] = 1e30
    g[9] = -1e30
    g[150] = NAN
    g[199] = INF  # the tail
    return g


def _torch_adam(p, g, m, v, step, weight_decay=0.0, decoupled=False):
    """torch.optim.Adam / AdamW (single-tensor loop) from the given state: (p, m, v) after ``step``."""
    q = torch.nn.Parameter(p.clone())
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([q], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
              weight_decay=weight_decay, foreach=False)
    opt.state[q] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    q.grad = g.clone()
    opt.step()
    return q.detach(), opt.state[q]["exp_avg"], opt.state[q]["exp_avg_sq"]


def _ours(backend, p, g, m, v, mask, step, weight_decay=0.0, decoupled=False, **amp):
    p, m, v = p.clone(), m.clone(), v.clone()
    sk.ops.masked_adam_([p], [g.clone()], [m], [v], [mask], step=step, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled, backend=backend, **HYPER, **amp)
    return p, m, v


def _assert_same(actual, expected, what):
    # NaN where torch has NaN, the same infinities, the finite values within torch's loop-vs-fused tolerance.
    for a, e, name in zip(actual, expected, ("param", "exp_avg", "exp_avg_sq")):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("wd", [(0.0, False), (0.01, False), (0.01, True)], ids=["plain", "L2", "AdamW"])
@pytest.mark.parametrize("step", [1, 7])
def test_nan_inf_gradients_match_torch_adam(backend, wd, step):
    p, m, v = _state()
    g = _poisoned_grad()
    expected = _torch_adam(p, g, m, v, step, *wd)
    assert expected[0].isnan().any() and expected[2].isinf().any()  # the case is what it claims
    _assert_same(_ours(backend, p, g, m, v, None, step, *wd), expected, f"{backend} no mask")
    # An all-True mask is the same update.
    _assert_same(_ours(backend, p, g, m, v, torch.ones(N, dtype=torch.bool), step, *wd), expected,
                 f"{backend} all-True mask")


def test_nan_inf_state_propagates_like_torch(backend):
    """NaN or Inf already in the parameter or the moments, with finite gradients."""
    p, m, v = _state()
    p[10], p[11] = NAN, INF
    m[20], m[21] = NAN, -INF
    v[30], v[31] = NAN, INF
    g = randn(N, seed=4)
    expected = _torch_adam(p, g, m, v, 3)
    _assert_same(_ours(backend, p, g, m, v, None, 3), expected, f"{backend} non-finite state")


def test_masked_entries_become_zero_whatever_they_hold(backend):
    p, m, v = _state()
    g = _poisoned_grad()
    mask = torch.rand(N, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[:64] = False  # two whole masked runs of 32 (numba skips their arithmetic)
    mask[100:110] = True
    for t in (p, m, v, g):  # non-finite values under the mask, in whole runs and in mixed ones
        t[0], t[1], t[33], t[63] = NAN, INF, -INF, NAN
    dead = ~mask
    p[dead & (torch.arange(N) % 3 == 0)] = NAN
    v[dead & (torch.arange(N) % 5 == 0)] = INF
    g[dead & (torch.arange(N) % 7 == 0)] = -INF
    assert (dead & (p.isnan() | v.isinf() | g.isinf())).any()
    out = _ours(backend, p, g, m, v, mask, 2)
    for t, name in zip(out, ("param", "exp_avg", "exp_avg_sq")):
        assert torch.equal(t[dead], torch.zeros(int(dead.sum()))), f"{backend}: masked {name} not exactly 0"
    # Live entries: torch's Adam on them (the masked ones do not leak in).
    expected = _torch_adam(p[mask], g[mask], m[mask], v[mask], 2)
    _assert_same([t[mask] for t in out], expected, f"{backend} live entries")
    assert out[0][mask].isnan().any()  # a live NaN gradient propagated


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_found_inf_skips_the_step(backend, masked):
    p, m, v = _state()
    p[3] = NAN  # bit-exact comparison below, NaN included
    g = _poisoned_grad()
    mask = (torch.arange(N) % 4 != 0) if masked else None
    before = [t.clone() for t in (p, m, v)]
    out = _ours(backend, p, g, m, v, mask, 4, grad_scale=torch.tensor([1024.0]), found_inf=torch.tensor([1.0]))
    for a, b, name in zip(out, before, ("param", "exp_avg", "exp_avg_sq")):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{backend}: {name} changed on a skipped step"


def test_grad_scale_without_inf_divides_then_matches_torch(backend):
    """AMP with found_inf = 0: the update of grad / scale, non-finite entries included."""
    p, m, v = _state()
    scale = 1024.0
    g = _poisoned_grad() * scale
    expected = _torch_adam(p, g / scale, m, v, 2)
    out = _ours(backend, p, g, m, v, None, 2, grad_scale=torch.tensor([scale]), found_inf=torch.tensor([0.0]))
    _assert_same(out, expected, f"{backend} grad_scale")
