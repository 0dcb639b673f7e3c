"""MaskedAdam and the fused masked_adam_ op: parity with torch.optim.Adam / AdamW, masks, AMP, state."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import set_kernels as sk
from conftest import CUDA_BACKENDS, gen, randn, require_cuda_backend

MaskedAdam = sk.optim.MaskedAdam
SHAPES = [(37, 13), (5,), (4, 3, 2), (64,)]
# torch's own fused/foreach-vs-loop tolerances for Adam.
PARITY_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def make_params(dtype, seed=0, shapes=SHAPES):
    return [torch.nn.Parameter(randn(*s, dtype=dtype, seed=seed + i)) for i, s in enumerate(shapes)]


def set_grads(params, step, seed=1000):
    for i, p in enumerate(params):
        p.grad = randn(*p.shape, dtype=p.dtype, seed=seed + 100 * step + i)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ------------------------------------------------------------------------- parity, no masks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["nowd", "wd"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
def test_parity_with_torch_adam(cpu_backend, dtype, weight_decay, decoupled):
    ours = make_params(dtype)
    theirs = clone_params(ours)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt = MaskedAdam(ours, decoupled_weight_decay=decoupled, backend=cpu_backend, **hyper)
    ref_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = ref_cls(theirs, foreach=False, **hyper)
    for step in range(10):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, **PARITY_TOL[dtype])
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], ref.state[q][key], **PARITY_TOL[dtype])
    assert int(opt.state[ours[0]]["step"]) == 10
    # Weight decay made a difference (the test would notice it being ignored).
    if weight_decay:
        plain = clone_params(make_params(dtype))
        ref_plain = ref_cls(plain, foreach=False, **{**hyper, "weight_decay": 0.0})
        for step in range(10):
            set_grads(plain, step)
            ref_plain.step()
        assert not torch.allclose(plain[0], ours[0], **PARITY_TOL[dtype])


def test_param_groups_use_their_own_hyperparameters(cpu_backend):
    a, b = make_params(torch.float64, shapes=[(6, 5)]), make_params(torch.float64, seed=7, shapes=[(9,)])
    ra, rb = clone_params(a), clone_params(b)
    opt = MaskedAdam([{"params": a}, {"params": b, "lr": 0.1, "weight_decay": 0.2}], lr=1e-3, backend=cpu_backend)
    ref = torch.optim.Adam([{"params": ra}, {"params": rb, "lr": 0.1, "weight_decay": 0.2}], lr=1e-3, foreach=False)
    for step in range(3):
        for ps in ((a + b), (ra + rb)):
            set_grads(ps, step)
        opt.step()
        ref.step()
    for p, q in zip(a + b, ra + rb):
        torch.testing.assert_close(p, q, **PARITY_TOL[torch.float64])


def test_params_without_grad_are_skipped(cpu_backend):
    ps = make_params(torch.float32, shapes=[(4, 4), (3,)])
    before = ps[1].detach().clone()
    opt = MaskedAdam(ps, lr=0.1, backend=cpu_backend)
    ps[0].grad = randn(4, 4, seed=5)
    opt.step()
    assert torch.equal(ps[1], before)
    assert len(opt.state[ps[1]]) == 0


# ----------------------------------------------------------------------------------- masks
def live_reference(param, mask, steps, hyper, decoupled):
    """torch Adam/AdamW run on the live entries alone."""
    live = torch.nn.Parameter(param.detach()[mask].clone())
    ref = (torch.optim.AdamW if decoupled else torch.optim.Adam)([live], foreach=False, **hyper)
    history = []
    for step in range(steps):
        live.grad = randn(*param.shape, dtype=param.dtype, seed=1000 + 100 * step)[mask]
        ref.step()
        history.append((live.detach().clone(), ref.state[live]["exp_avg"].clone(),
                        ref.state[live]["exp_avg_sq"].clone()))
    return history


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_mask_zeroes_and_live_entries_match_torch(cpu_backend, dtype, decoupled):
    param = torch.nn.Parameter(randn(20, 30, dtype=dtype, seed=3))  # nonzero at masked entries too
    mask = torch.rand(20, 30, generator=gen(4)) < 0.3
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.02)
    history = live_reference(param, mask, 10, hyper, decoupled)
    opt = MaskedAdam([param], masks={param: mask}, decoupled_weight_decay=decoupled, backend=cpu_backend, **hyper)
    zero = torch.zeros((~mask).sum().item(), dtype=dtype)
    for step in range(10):
        param.grad = randn(20, 30, dtype=dtype, seed=1000 + 100 * step)
        opt.step()
        state = opt.state[param]
        assert torch.equal(param.detach()[~mask], zero)
        assert torch.equal(state["exp_avg"][~mask], zero)
        assert torch.equal(state["exp_avg_sq"][~mask], zero)
        live_p, live_m, live_v = history[step]
        torch.testing.assert_close(param.detach()[mask], live_p, **PARITY_TOL[dtype])
        torch.testing.assert_close(state["exp_avg"][mask], live_m, **PARITY_TOL[dtype])
        torch.testing.assert_close(state["exp_avg_sq"][mask], live_v, **PARITY_TOL[dtype])


def test_poisoned_moments_and_params_are_zeroed(cpu_backend):
    param = torch.nn.Parameter(randn(16, 24, seed=3))
    mask = torch.rand(16, 24, generator=gen(4)) < 0.4
    opt = MaskedAdam([param], lr=1e-2, masks={param: mask}, backend=cpu_backend)
    param.grad = randn(16, 24, seed=5)
    opt.step()
    # Poison everything masked: the next step must write exact zeros there.
    with torch.no_grad():
        param[~mask] = 3.0
        opt.state[param]["exp_avg"].copy_(randn(16, 24, seed=6))
        opt.state[param]["exp_avg_sq"].copy_(randn(16, 24, seed=7).abs() + 0.5)
    param.grad = randn(16, 24, seed=8)
    opt.step()
    for t in (param.detach(), opt.state[param]["exp_avg"], opt.state[param]["exp_avg_sq"]):
        assert torch.equal(t[~mask], torch.zeros_like(t[~mask]))
        assert (t[mask] != 0).all()


def test_masked_linear_mask_found_automatically(cpu_backend):
    layer = sk.nn.MaskedLinear(30, 20, density=0.3, generator=gen(1))
    mask = layer.mask.clone()
    other = torch.nn.Parameter(randn(7, seed=2))
    opt = MaskedAdam(list(layer.parameters()) + [other], lr=1e-2, backend=cpu_backend)
    assert opt.mask_for(layer.weight) is layer.mask
    assert opt.mask_for(layer.bias) is None and opt.mask_for(other) is None
    x = randn(8, 30, seed=3)
    for step in range(3):
        with torch.no_grad():  # poison the masked weights and moments before every step
            layer.weight[~mask] = 1.0
            if opt.state:
                opt.state[layer.weight]["exp_avg"].fill_(0.5)
                opt.state[layer.weight]["exp_avg_sq"].fill_(0.25)
        opt.zero_grad()
        (layer(x).square().sum() + other.sum()).backward()
        opt.step()
        for t in (layer.weight.detach(), opt.state[layer.weight]["exp_avg"], opt.state[layer.weight]["exp_avg_sq"]):
            assert torch.equal(t[~mask], torch.zeros_like(t[~mask]))
        assert (layer.weight[mask] != 0).all()


def test_masked_linear_mask_followed_after_load_state_dict(cpu_backend):
    layer = sk.nn.MaskedLinear(12, 10, density=0.5, generator=gen(1))
    donor = sk.nn.MaskedLinear(12, 10, density=0.5, generator=gen(2))
    assert not torch.equal(layer.mask, donor.mask)
    opt = MaskedAdam(layer.parameters(), lr=1e-2, backend=cpu_backend)
    layer.load_state_dict(donor.state_dict())
    with torch.no_grad():
        layer.weight.fill_(1.0)
    layer.weight.grad = randn(10, 12, seed=3)
    layer.bias.grad = randn(10, seed=4)
    opt.step()
    assert torch.equal(layer.weight[~donor.mask], torch.zeros_like(layer.weight[~donor.mask]))
    assert (layer.weight[donor.mask] != 0).all()


# ----------------------------------------------------------------------------- lr schedule
def test_lr_scheduler_changes_effective_lr(cpu_backend):
    ours = make_params(torch.float64)
    theirs = clone_params(ours)
    constant = clone_params(ours)
    opt = MaskedAdam(ours, lr=0.05, backend=cpu_backend)
    ref = torch.optim.Adam(theirs, lr=0.05, foreach=False)
    ref_constant = torch.optim.Adam(constant, lr=0.05, foreach=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.1)
    for step in range(6):
        for ps in (ours, theirs, constant):
            set_grads(ps, step)
        opt.step()
        ref.step()
        ref_constant.step()
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1 ** 3)
    for p, q, c in zip(ours, theirs, constant):
        torch.testing.assert_close(p, q, **PARITY_TOL[torch.float64])
        assert not torch.allclose(p, c, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- state_dict
def state_dict_round_trip(backend, dtype):
    """Train 4 steps, save, load into a fresh optimizer over cloned params, train 4 more on both."""
    shapes = [(20, 30), (30,), (8, 16)]
    mask = torch.rand(20, 30, generator=gen(9)) < 0.3
    a = make_params(dtype, shapes=shapes)
    opt_a = MaskedAdam(a, lr=1e-2, weight_decay=0.01, masks={a[0]: mask}, backend=backend)
    for step in range(4):
        set_grads(a, step)
        opt_a.step()
    saved = copy.deepcopy(opt_a.state_dict())
    b = clone_params(a)
    opt_b = MaskedAdam(b, lr=0.5, masks={b[0]: mask}, backend=backend)  # hyper-parameters come from the state
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["lr"] == 1e-2 and opt_b.param_groups[0]["weight_decay"] == 0.01
    for pa, pb in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt_b.state[pb][key].dtype == opt_a.state[pa][key].dtype, f"{key} dtype changed by loading"
    for step in range(4, 8):
        set_grads(a, step)
        set_grads(b, step)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), key
        assert float(opt_a.state[pa]["step"]) == float(opt_b.state[pb]["step"]) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_state_dict_round_trip_is_bit_identical(cpu_backend, dtype):
    state_dict_round_trip(cpu_backend, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_state_dict_round_trip_low_precision_params(dtype):
    """fp16/bf16 params keep fp32 moments; a reload must not round them to the param dtype."""
    state_dict_round_trip("torch", dtype)


# ---------------------------------------------------------------------- the op, directly
def adam_reference(p, g, m, v, mask, *, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """A readable single-tensor Adam/AdamW in float64; returns new (p, m, v)."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    if weight_decay:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    denom = v.sqrt() / math.sqrt(1 - beta2 ** step) + eps
    p = p - lr * m_hat / denom
    if mask is not None:
        p, m, v = (t.masked_fill(~mask, 0.0) for t in (p, m, v))
    return p, m, v


def adam_inputs(dtype, moment_dtype=None, seed=0):
    moment_dtype = moment_dtype or dtype
    shapes = [(33, 17), (5,), (2, 3, 64), (150, 130), (0, 3)]  # 19500 > one numba chunk; empty
    params = [randn(*s, dtype=dtype, seed=seed + i) for i, s in enumerate(shapes)]
    grads = [randn(*s, dtype=dtype, seed=seed + 10 + i) for i, s in enumerate(shapes)]
    exp_avgs = [randn(*s, dtype=moment_dtype, seed=seed + 20 + i, scale=0.1) for i, s in enumerate(shapes)]
    exp_avg_sqs = [randn(*s, dtype=moment_dtype, seed=seed + 30 + i, scale=0.1).square() for i, s in enumerate(shapes)]
    masks = [torch.rand(shapes[0], generator=gen(seed + 1)) < 0.5, None,
             torch.rand(shapes[2], generator=gen(seed + 2)) < 0.2, torch.rand(shapes[3], generator=gen(seed + 3)) < 0.1,
             torch.zeros(0, 3, dtype=torch.bool)]
    return params, grads, exp_avgs, exp_avg_sqs, masks


HYPER = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.03)


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("dtype,moment_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                (torch.float64, torch.float32)], ids=["fp32", "fp64", "fp64-fp32m"])
def test_op_matches_readable_reference(cpu_backend, dtype, moment_dtype, decoupled):
    params, grads, exp_avgs, exp_avg_sqs, masks = adam_inputs(dtype, moment_dtype)
    expected = [adam_reference(*t, decoupled=decoupled, **HYPER)
                for t in zip(params, grads, exp_avgs, exp_avg_sqs, masks)]
    sk.ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, decoupled_weight_decay=decoupled,
                        backend=cpu_backend, **HYPER)
    tol = dict(rtol=1e-5, atol=1e-6) if moment_dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for (p_ref, m_ref, v_ref), p, m, v, mask in zip(expected, params, exp_avgs, exp_avg_sqs, masks):
        assert p.dtype == dtype and m.dtype == v.dtype == moment_dtype
        torch.testing.assert_close(p.double(), p_ref, **tol)
        torch.testing.assert_close(m.double(), m_ref, **tol)
        torch.testing.assert_close(v.double(), v_ref, **tol)
        if mask is not None:
            for t in (p, m, v):
                assert torch.equal(t[~mask], torch.zeros_like(t[~mask]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_op_low_precision_params_fp32_moments(dtype):
    params, grads, exp_avgs, exp_avg_sqs, masks = adam_inputs(dtype, moment_dtype=torch.float32)
    expected = [adam_reference(*t, decoupled=False, **HYPER) for t in zip(params, grads, exp_avgs, exp_avg_sqs, masks)]
    sk.ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, backend="torch", **HYPER)
    ulp = torch.finfo(dtype).eps
    for (p_ref, m_ref, v_ref), p, m, v in zip(expected, params, exp_avgs, exp_avg_sqs):
        assert p.dtype == dtype and m.dtype == torch.float32 and v.dtype == torch.float32
        # The parameter is rounded once to its dtype; the moments stay fp32.
        torch.testing.assert_close(p.double(), p_ref, rtol=ulp, atol=ulp * 1e-2)
        torch.testing.assert_close(m.double(), m_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-6)


def test_op_found_inf_skips_everything(cpu_backend):
    params, grads, exp_avgs, exp_avg_sqs, masks = adam_inputs(torch.float32, seed=3)
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs]
    sk.ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, found_inf=torch.tensor([1.0]),
                        grad_scale=torch.tensor([8.0]), backend=cpu_backend, **HYPER)
    for t, b in zip(params + exp_avgs + exp_avg_sqs, before):
        assert torch.equal(t, b)  # masked entries are not zeroed either: nothing changes
    # found_inf == 0 does update
    sk.ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, found_inf=torch.tensor([0.0]),
                        backend=cpu_backend, **HYPER)
    assert not torch.equal(params[1], before[1])


@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_op_grad_scale_divides_grads(cpu_backend, scale):
    a = adam_inputs(torch.float32, seed=4)
    b = tuple([t.clone() if t is not None else None for t in ts] for ts in a)
    params, grads, exp_avgs, exp_avg_sqs, masks = a
    scaled = [g * scale for g in grads]
    sk.ops.masked_adam_(params, scaled, exp_avgs, exp_avg_sqs, masks, grad_scale=torch.tensor([scale]),
                        backend=cpu_backend, **HYPER)
    sk.ops.masked_adam_(*b, backend=cpu_backend, **HYPER)
    for x, y in zip(params + exp_avgs + exp_avg_sqs, b[0] + b[2] + b[3]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_op_empty_lists_are_a_no_op(cpu_backend):
    sk.ops.masked_adam_([], [], [], [], [], backend=cpu_backend, **HYPER)


def test_op_non_contiguous_mask(cpu_backend):
    """A mask that is a transposed view is accepted by the checks and must work on every backend."""
    a = adam_inputs(torch.float32, seed=5)
    b = tuple([t.clone() if t is not None else None for t in ts] for ts in a)
    params, grads, exp_avgs, exp_avg_sqs, masks = a
    def other_strides(m):  # same values, reversed memory order
        dims = list(reversed(range(m.dim())))
        return m.permute(dims).contiguous().permute(dims)

    masks = [other_strides(m) if m is not None else None for m in masks]
    assert not masks[0].is_contiguous()
    sk.ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, backend=cpu_backend, **HYPER)
    sk.ops.masked_adam_(*b, backend=cpu_backend, **HYPER)
    for x, y in zip(params + exp_avgs + exp_avg_sqs, b[0] + b[2] + b[3]):
        assert torch.equal(x, y)


def test_params_at_different_step_counts(cpu_backend):
    """A parameter that skips steps (no grad) has its own step count, as in torch."""
    ours = make_params(torch.float64, shapes=[(6, 5), (7,)])
    theirs = clone_params(ours)
    opt = MaskedAdam(ours, lr=1e-2, backend=cpu_backend)
    ref = torch.optim.Adam(theirs, lr=1e-2, foreach=False)
    for step in range(6):
        for ps in (ours, theirs):
            set_grads(ps, step)
            if step % 2:
                ps[1].grad = None
        opt.step()
        ref.step()
    assert float(opt.state[ours[0]]["step"]) == 6 and float(opt.state[ours[1]]["step"]) == 3
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **PARITY_TOL[torch.float64])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_op_cuda_matches_readable_reference(name, dtype):
    device = require_cuda_backend(name, "masked_adam_", dtype)
    cpu = adam_inputs(dtype, moment_dtype=torch.float32)
    expected = [adam_reference(*t, decoupled=True, **HYPER) for t in zip(*cpu)]
    params, grads, exp_avgs, exp_avg_sqs, masks = ([t.to(device) if t is not None else None for t in ts] for ts in cpu)
    sk.ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, decoupled_weight_decay=True, backend=name,
                        **HYPER)
    p_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-4)
    for (p_ref, m_ref, v_ref), p, m, v, mask in zip(expected, params, exp_avgs, exp_avg_sqs, masks):
        torch.testing.assert_close(p.cpu().double(), p_ref, **p_tol)
        torch.testing.assert_close(m.cpu().double(), m_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.cpu().double(), v_ref, rtol=1e-5, atol=1e-6)
        if mask is not None:
            for t in (p, m, v):
                assert torch.equal(t[~mask].cpu(), torch.zeros_like(t[~mask].cpu()))


# -------------------------------------------------- streams, CUDA graphs and devices (desk-check fixes)
SLEEP_CYCLES = 200_000_000  # torch.cuda._sleep: ~0.1 s at 2 GHz, longer at idle clocks


def _triton_adam_module():
    ok, why = sk.backends.availability("triton")
    if not ok:
        pytest.skip(f"backend 'triton' unavailable: {why}")
    from set_kernels.backends.triton import masked_adam

    return masked_adam


def _fake_rows(n=3):
    """Table rows (p, g, m, v, mask addresses, numel) that are never dereferenced."""
    return [(1 << 40 | 16 * i, 2 << 40 | 16 * i, 3 << 40, 4 << 40, 0, 5000 + 7 * i) for i in range(n)]


def _expected_table(rows):
    mod = _triton_adam_module()
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + -(-r[5] // mod.CHUNK))
    return torch.tensor([a for r in rows for a in r[:5]] + [r[5] for r in rows] + starts, dtype=torch.int64)


def test_triton_adam_tables_are_cached_per_stream(monkeypatch):
    """A pointer table is reused on the stream it was uploaded on, and rebuilt for another stream
    (its upload is ordered only with the first one). Runs wherever triton does (interpreted here)."""
    mod = _triton_adam_module()
    device = torch.device("cuda" if torch.cuda.is_available() and not mod._common.INTERPRET else "cpu")
    mod.clear_table_cache()
    rows = _fake_rows()
    key = (str(device), torch.float32, torch.float32, False, tuple(rows))
    monkeypatch.setattr(mod, "_stream_id", lambda dev: 7)
    first = mod._tables_for(key, rows, device)
    assert mod._tables_for(key, rows, device)[0] is first[0]  # same stream: cached
    monkeypatch.setattr(mod, "_stream_id", lambda dev: 8)
    other = mod._tables_for(key, rows, device)
    assert other[0] is not first[0]  # another stream: its own upload
    for table in (first, other):
        assert torch.equal(torch.cat(table[:3]).cpu(), _expected_table(rows))
        assert table[3] == _expected_table(rows)[-1].item()
    mod.clear_table_cache()


@pytest.mark.gpu
def test_triton_adam_table_from_a_busy_stream_is_not_read_on_another():
    """A table uploaded behind a long sleep on a side stream must not be handed to the default
    stream, which does not wait for it: read there at once, it would hold garbage."""
    require_cuda_backend("triton", "masked_adam_", torch.float32)
    mod = _triton_adam_module()
    device = torch.device("cuda")
    mod.clear_table_cache()
    rows = _fake_rows(5)
    key = (str(device), torch.float32, torch.float32, False, tuple(rows))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        mod._tables_for(key, rows, device)  # its upload waits behind the sleep
    table = mod._tables_for(key, rows, device)  # on the default stream
    got = torch.cat(table[:3]).cpu()  # read on the default stream, right away
    torch.cuda.synchronize()
    assert torch.equal(got, _expected_table(rows))
    mod.clear_table_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_op_cuda_replays_in_a_cuda_graph(name):
    """masked_adam_ captured in a CUDA graph: every replay is one more update (with the step
    count of the capture), also after the backend's caches were cleared and the memory reused."""
    device = require_cuda_backend(name, "masked_adam_", torch.float32)
    cpu = adam_inputs(torch.float32, seed=40)
    params, grads, exp_avgs, exp_avg_sqs, masks = ([t.to(device) if t is not None else None for t in ts] for ts in cpu)
    hyper = dict(HYPER, step=2)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):  # warm-up (compiles, fills caches) on copies
        copies = [[t.clone() if t is not None else None for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        sk.ops.masked_adam_(*copies, masks, decoupled_weight_decay=True, backend=name, **hyper)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sk.ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, decoupled_weight_decay=True,
                            backend=name, **hyper)
    expected = [(p, m, v) for p, m, v in zip(cpu[0], cpu[2], cpu[3])]  # float64 state on the CPU
    for replay in range(3):
        if replay == 2 and name == "triton":
            _triton_adam_module().clear_table_cache()  # a table the graph still reads must survive this
        junk = [torch.full((1 << 16,), 7.0, device=device) for _ in range(16)]  # reuse freed memory
        new_grads = [randn(*g.shape, seed=500 + 10 * replay + i) for i, g in enumerate(cpu[1])]
        for g, ng in zip(grads, new_grads):
            g.copy_(ng)
        graph.replay()
        torch.cuda.synchronize()
        del junk
        expected = [adam_reference(p, g, m, v, mask, decoupled=True, **hyper)
                    for (p, m, v), g, mask in zip(expected, new_grads, cpu[4])]
        for (p_ref, m_ref, v_ref), p, m, v in zip(expected, params, exp_avgs, exp_avg_sqs):
            what = f"replay {replay}"
            torch.testing.assert_close(p.cpu().double(), p_ref, rtol=1e-5, atol=1e-6, msg=lambda s: f"{what}: {s}")
            torch.testing.assert_close(m.cpu().double(), m_ref, rtol=1e-5, atol=1e-6, msg=lambda s: f"{what}: {s}")
            torch.testing.assert_close(v.cpu().double(), v_ref, rtol=1e-5, atol=1e-6, msg=lambda s: f"{what}: {s}")


def _step_skipped_behind_a_sleep(device):
    """MaskedAdam.step with a found_inf that a kernel sets to 1 only after a long sleep on its
    device's current stream; returns (step count after settling, params changed?)."""
    p = torch.nn.Parameter(randn(1000, seed=90).to(device))
    opt = MaskedAdam([p], lr=1e-2)
    p.grad = randn(1000, seed=91).to(device)
    before = p.detach().clone()
    found_inf = torch.zeros(1, device=device)
    with torch.cuda.device(device):
        torch.cuda._sleep(SLEEP_CYCLES)
        found_inf.fill_(1.0)  # queued behind the sleep
    opt.step(found_inf=found_inf)
    state = opt.state_dict()  # settles the skipped step: must wait for the flag's copy
    torch.cuda.synchronize()
    return float(state["state"][0]["step"]), not torch.equal(p.detach(), before)


@pytest.mark.gpu
def test_gpu_found_inf_read_back_after_it_is_written():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    assert _step_skipped_behind_a_sleep(torch.device("cuda")) == (0.0, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_found_inf_on_another_device_than_the_current_one():
    """Parameters and found_inf on cuda:1 while cuda:0 is current: the flag's copy to the host
    runs on cuda:1's stream, and the event that the step count waits for must be recorded there."""
    torch.cuda.set_device(0)
    assert _step_skipped_behind_a_sleep(torch.device("cuda", 1)) == (0.0, False)
    assert torch.cuda.current_device() == 0
