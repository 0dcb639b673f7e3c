"""Mixed precision: SparseLinear under torch.autocast, MaskedAdam with torch.amp.GradScaler,
and bf16 parameters with fp32 optimizer state."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import set_kernels as sk
from set_kernels import backends
from conftest import dense_ref, gen, randn

CPU = torch.device("cpu")


def _backends_for(device, dtype, op="linear_forward"):
    names = [n for n in backends.BACKENDS if not backends.unsupported_reasons(n, op, device, dtype)]
    assert "torch" in names, "the torch backend must run every float dtype"
    return names


def _autocast_cases():
    cases = [("cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        cases += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return cases


def _ids(case):
    return f"{case[0]}-{str(case[1]).replace('torch.', '')}"


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("case", _autocast_cases(), ids=_ids)
def test_sparse_linear_autocast_dtype_and_accuracy(case):
    device_type, dtype = case
    device = torch.device(device_type)
    for backend in _backends_for(device, dtype):
        lin = sk.nn.SparseLinear(200, 77, density=0.5, block_size=32, generator=gen(0), backend=backend,
                                 device=device)
        x = randn(3, 5, 200, seed=1).to(device).requires_grad_()
        with torch.autocast(device_type, dtype=dtype):
            y = lin(x)
            # torch's own error for the same computation: F.linear under autocast on the dense W.
            w = lin.dense_weight().detach()
            y_torch = F.linear(x.detach(), w, lin.bias.detach())
        assert y.dtype == dtype and y_torch.dtype == dtype
        # Reference: the same low-precision operands, exact float64 arithmetic.
        x_lp = x.detach().to(dtype).double().cpu()
        w_lp = dense_ref(lin.values.detach().to(dtype).cpu(), lin.layout.to("cpu"))
        ref = x_lp @ w_lp.T + lin.bias.detach().to(dtype).double().cpu()
        err = (y.double().cpu() - ref).abs().max().item()
        err_torch = (y_torch.double().cpu() - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"{backend}: error {err:.3e} vs torch's {err_torch:.3e}"
        # Gradients come back in the parameters' (fp32) dtype.
        y.float().sum().backward()
        assert lin.values.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32
        assert x.grad.dtype == torch.float32
        dy = torch.ones(15, 77, dtype=torch.float64)
        dv_ref = (dy.T @ x_lp.reshape(15, 200))
        dv_ref_blocks = sk.ops.from_dense(dv_ref.to(device), lin.layout)  # float64 blocks of dW
        err_dv = (lin.values.grad.double() - dv_ref_blocks).abs().max().item()
        assert err_dv <= 0.02 * dv_ref.abs().max().item(), f"{backend}: dvalues error {err_dv:.3e}"


def test_autocast_mixed_dtype_chain_and_fp64_untouched():
    """Under autocast a bf16 activation may meet fp32 values (as with F.linear); fp64 is not cast."""
    lin = sk.nn.SparseLinear(64, 48, density=0.5, block_size=16, generator=gen(0))
    x = randn(4, 64, seed=1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
        lin64 = copy.deepcopy(lin).double()
        assert lin64(randn(4, 64, seed=1, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match="values"):  # without autocast, no silent promotion
        lin(x)


def test_autocast_backend_without_bf16_says_why():
    lin = sk.nn.SparseLinear(64, 48, density=0.5, block_size=16, generator=gen(0), backend="numba")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="numba.*bfloat16"):
            lin(randn(4, 64, seed=1))


def test_masked_linear_autocast():
    m = sk.nn.MaskedLinear(64, 48, density=0.3, generator=gen(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(randn(4, 64, seed=1))
    assert y.dtype == torch.bfloat16


def test_autocast_compiled_matches_eager():
    torch._dynamo.reset()
    model = torch.nn.Sequential(sk.nn.SparseLinear(70, 45, density=0.5, block_size=16, generator=gen(0)),
                                torch.nn.ReLU(), sk.nn.MaskedLinear(45, 20, density=0.4, generator=gen(1)))
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = randn(6, 70, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_e, y_c = model(x), compiled(x)
    assert y_c.dtype == torch.bfloat16
    torch.testing.assert_close(y_c, y_e)
    y_e.float().sum().backward()
    y_c.float().sum().backward()
    for pe, pc in zip(model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- GradScaler
def _model(device="cpu"):
    g = gen(3)
    readout = torch.nn.Linear(33, 9, device=device)
    with torch.no_grad():  # seeded, not drawn from the global generator (whatever ran before)
        readout.weight.copy_(randn(9, 33, seed=4, scale=33**-0.5))
        readout.bias.copy_(randn(9, seed=5, scale=0.1))
    return torch.nn.Sequential(
        sk.nn.SparseLinear(40, 33, density=0.6, block_size=16, generator=g, device=device),
        torch.nn.ReLU(),
        readout,
    )


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())
             if p in opt.state}
    return params, state


def _assert_same_snapshot(a, b):
    for pa, pb in zip(a[0], b[0]):
        assert torch.equal(pa, pb)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        for k in a[1][i]:
            assert torch.equal(a[1][i][k], b[1][i][k]), f"state {i}.{k} changed"


def _amp_step(model, opt, scaler, x, target, poison=False, device_type="cpu"):
    opt.zero_grad()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = F.mse_loss(model(x).float(), target)
    scaler.scale(loss).backward()
    if poison:
        next(model.parameters()).grad.view(-1)[3] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_grad_scaler_skips_inf_step_and_tracks_adam(device_type, monkeypatch):
    """MaskedAdam under GradScaler: an inf gradient skips the step (params, moments and step
    count unchanged, scale backed off); otherwise it follows torch.optim.Adam under the same scaler."""
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert sk.optim.MaskedAdam._step_supports_amp_scaling
    model = _model(device_type)
    ref_model = copy.deepcopy(model)
    opt = sk.optim.MaskedAdam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device_type, init_scale=2.0**10)
    ref_scaler = torch.amp.GradScaler(device_type, init_scale=2.0**10)
    seen_scales = []
    from set_kernels.ops import _library

    fused = _library.masked_adam_  # the custom op MaskedAdam calls (its lists are checked once)

    def spy(*args, **kwargs):
        seen_scales.append(args[5])  # grad_scale
        return fused(*args, **kwargs)

    monkeypatch.setattr(_library, "masked_adam_", spy)
    for step in range(5):
        x = randn(8, 40, seed=step).to(device_type)
        target = randn(8, 9, seed=50 + step).to(device_type)
        poison = step == 2
        # Each step starts both models from the same weights, so that both see the same gradients:
        # otherwise the two optimizers' last-bit differences can round a weight to different bf16
        # values under autocast, and the gradients then part by a bf16 ulp, which Adam's
        # normalised step turns into differences of ~1e-5 (seen once in a full run). The moments
        # and step counts are each optimizer's own, carried from step to step.
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref_model.parameters()):
                q.copy_(p)
        before = _snapshot(model, opt)
        scale_before = scaler.get_scale()
        _amp_step(model, opt, scaler, x, target, poison, device_type)
        _amp_step(ref_model, ref_opt, ref_scaler, x, target, poison, device_type)
        if poison:
            opt._settle_skipped_steps()  # a no-op on CPU; on CUDA the skip settles lazily
            _assert_same_snapshot(before, _snapshot(model, opt))
            assert scaler.get_scale() == scale_before * 0.5
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    steps = {int(opt.state[p]["step"]) for p in model.parameters()}
    assert steps == {4}  # 5 calls, one skipped
    # The scaler handed its scale to the fused update (no separate unscale pass over the grads).
    assert seen_scales and all(s is not None and s.numel() == 1 for s in seen_scales)
    assert {int(ref_opt.state[p]["step"]) for p in ref_model.parameters()} == {4}


def test_step_kwargs_grad_scale_and_found_inf():
    """step(grad_scale=, found_inf=) directly: found_inf != 0 changes nothing; grad_scale divides."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(randn(7, 13, seed=1))
    mask = torch.rand(7, 13, generator=gen(2)) < 0.5
    opt = sk.optim.MaskedAdam([p], lr=1e-2, masks={p: mask})
    p.grad = randn(7, 13, seed=3)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    p.grad = randn(7, 13, seed=4) * 64
    opt.step(grad_scale=torch.tensor(64.0), found_inf=torch.tensor(1.0))
    assert torch.equal(p, before[0])
    for k, v in opt.state[p].items():
        assert torch.equal(v, before[1][k]), k
    twin = torch.nn.Parameter(p.detach().clone())
    twin_opt = sk.optim.MaskedAdam([twin], lr=1e-2, masks={twin: mask})
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step(grad_scale=torch.tensor(64.0), found_inf=torch.tensor(0.0))
    twin.grad = p.grad / 64
    twin_opt.step()
    torch.testing.assert_close(p, twin, rtol=1e-6, atol=1e-7)
    assert int(opt.state[p]["step"]) == 2
    assert bool((p[~mask] == 0).all())


def test_unscale_then_step_with_clipping():
    """scaler.unscale_(opt) + grad clipping + scaler.step(opt): grads are not divided twice."""
    model, ref = _model(), None
    ref = copy.deepcopy(model)
    opt = sk.optim.MaskedAdam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for m, o in ((model, opt), (ref, ref_opt)):
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        o.zero_grad()
        loss = F.mse_loss(m(randn(8, 40, seed=1)), randn(8, 9, seed=2))
        scaler.scale(loss).backward()
        scaler.unscale_(o)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        scaler.step(o)
        scaler.update()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- bf16 params, fp32 optimizer state
def test_bf16_values_with_fp32_state():
    lin = sk.nn.SparseLinear(64, 48, density=0.5, block_size=16, generator=gen(0), dtype=torch.bfloat16)
    opt = sk.optim.MaskedAdam(lin.parameters(), lr=1e-2)
    master = [p.detach().float().clone().requires_grad_() for p in lin.parameters()]
    ref_opt = torch.optim.Adam(master, lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        y = lin(randn(8, 64, seed=step).to(torch.bfloat16))
        y.float().square().mean().backward()
        for p, m in zip(lin.parameters(), master):
            with torch.no_grad():
                m.copy_(p.float())  # the reference starts from the same bf16 values
            m.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        for p, m in zip(lin.parameters(), master):
            assert p.dtype == torch.bfloat16
            # fp32 math, one rounding to bf16 at the end: within one bf16 ulp of the fp32 result.
            torch.testing.assert_close(p.float(), m.detach().to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)
    for p in lin.parameters():
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[master[0] if p is lin.values else
                                                                           master[1]]["exp_avg"])
