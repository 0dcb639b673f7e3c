"""MaskedAdam follows torch.optim.Adam's conventions: tensor lr, schedulers, maximize, the
implementation keywords, state_dict (explicit masks included), re-wrapped MaskedLinear weights,
and its argument lists are checked once, not at every step."""
from __future__ import annotations

import copy

import pytest
import torch

import set_kernels as sk
from conftest import gen, randn

MaskedAdam = sk.optim.MaskedAdam
TOL64 = dict(rtol=1e-10, atol=1e-12)
SHAPES = [(9, 7), (5,), (3, 2, 4)]


def make_params(seed=0, dtype=torch.float64, shapes=SHAPES):
    return [torch.nn.Parameter(randn(*s, dtype=dtype, seed=seed + i)) for i, s in enumerate(shapes)]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step, seed=700):
    for i, p in enumerate(params):
        p.grad = randn(*p.shape, dtype=p.dtype, seed=seed + 31 * step + i)


def step_both(opt, ref, ours, theirs, steps):
    """Give both parameter lists the same gradients and step both optimizers, once per step in ``steps``."""
    for step in steps:
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()


def assert_same(ours, theirs, tol=TOL64):
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)


# ------------------------------------------------------------------------------ lr and schedulers
def test_tensor_lr_matches_torch_and_follows_in_place_changes(cpu_backend):
    # float64 lr tensors: torch does its step-size arithmetic in the tensor's dtype, MaskedAdam in
    # Python floats (float(lr)); with a float64 tensor the two agree to the last bits.
    ours = make_params()
    theirs = clone(ours)
    lr = torch.tensor(0.02, dtype=torch.float64)
    opt = MaskedAdam(ours, lr=lr, backend=cpu_backend)
    ref = torch.optim.Adam(theirs, lr=torch.tensor(0.02, dtype=torch.float64), foreach=False)
    for step in range(4):
        if step == 2:
            lr.fill_(0.005)  # the group holds this tensor: the change applies from the next step
            ref.param_groups[0]["lr"].fill_(0.005)
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
    assert opt.param_groups[0]["lr"] is lr
    assert_same(ours, theirs)


@pytest.mark.parametrize("lr", [torch.tensor([0.1, 0.2]), torch.tensor([])], ids=["2 elements", "empty"])
def test_tensor_lr_must_have_one_element(lr):
    with pytest.raises(ValueError, match="lr: expected a float or a 1-element tensor"):
        MaskedAdam(make_params(), lr=lr)


def test_negative_tensor_lr_is_rejected():
    with pytest.raises(ValueError, match="lr: expected a value in"):
        MaskedAdam(make_params(), lr=torch.tensor(-1.0))


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float lr", "tensor lr"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
def test_one_cycle_lr_with_cycled_momentum_matches_torch(cpu_backend, tensor_lr, decoupled):
    ours = make_params(seed=3)
    theirs = clone(ours)
    lr = torch.tensor(0.01, dtype=torch.float64) if tensor_lr else 0.01
    opt = MaskedAdam(ours, lr=lr, weight_decay=0.01, decoupled_weight_decay=decoupled, backend=cpu_backend)
    ref_lr = torch.tensor(0.01, dtype=torch.float64) if tensor_lr else 0.01
    ref = (torch.optim.AdamW if decoupled else torch.optim.Adam)(theirs, lr=ref_lr, weight_decay=0.01,
                                                                  foreach=False)
    kw = dict(max_lr=0.05, total_steps=12, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, **kw)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, **kw)
    lrs, beta1s = set(), set()
    for step in range(12):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        lrs.add(round(float(opt.param_groups[0]["lr"]), 12))
        beta1s.add(round(float(opt.param_groups[0]["betas"][0]), 12))
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(float(ref.param_groups[0]["lr"]))
        assert opt.param_groups[0]["betas"] == pytest.approx(ref.param_groups[0]["betas"])
    assert len(lrs) > 5 and len(beta1s) > 5  # the schedule really moved lr and beta1
    assert_same(ours, theirs)


# ---------------------------------------------------------------------------------- maximize
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["nowd", "wd"])
def test_maximize_matches_torch(cpu_backend, decoupled, weight_decay):
    ours = make_params(seed=5)
    theirs, minimized = clone(ours), clone(ours)
    hyper = dict(lr=1e-2, weight_decay=weight_decay)
    opt = MaskedAdam(ours, maximize=True, decoupled_weight_decay=decoupled, backend=cpu_backend, **hyper)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = cls(theirs, maximize=True, foreach=False, **hyper)
    ref_min = cls(minimized, foreach=False, **hyper)
    grads_before = None
    for step in range(5):
        for ps in (ours, theirs, minimized):
            set_grads(ps, step)
        grads_before = [p.grad.clone() for p in ours]
        opt.step()
        ref.step()
        ref_min.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], **TOL64)
    assert_same(ours, theirs)
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads_before))  # the user's grads are untouched
    assert not torch.allclose(ours[0], minimized[0])  # maximize made a difference


def test_maximize_per_param_group(cpu_backend):
    a, b = make_params(seed=1, shapes=[(4, 4)]), make_params(seed=2, shapes=[(6,)])
    ra, rb = clone(a), clone(b)
    opt = MaskedAdam([{"params": a, "maximize": True}, {"params": b}], lr=1e-2, backend=cpu_backend)
    ref = torch.optim.Adam([{"params": ra, "maximize": True}, {"params": rb}], lr=1e-2, foreach=False)
    step_both(opt, ref, a + b, ra + rb, range(3))
    assert_same(a + b, ra + rb)


# ----------------------------------------------------------------- implementation keywords
def test_defaults_have_torch_adam_keys():
    p = torch.nn.Parameter(torch.zeros(3))
    theirs = set(torch.optim.Adam([p]).defaults)
    ours = MaskedAdam([torch.nn.Parameter(torch.zeros(3))]).defaults
    assert theirs <= set(ours), theirs - set(ours)
    assert ours["amsgrad"] is False and ours["maximize"] is False and ours["capturable"] is False


@pytest.mark.parametrize("kwargs", [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)],
                         ids=["foreach", "no-foreach", "fused", "no-fused"])
def test_foreach_and_fused_are_accepted_and_change_nothing(cpu_backend, kwargs):
    ours = make_params(seed=8)
    theirs = clone(ours)
    opt = MaskedAdam(ours, lr=1e-2, backend=cpu_backend, **kwargs)
    ref = MaskedAdam(theirs, lr=1e-2, backend=cpu_backend)
    step_both(opt, ref, ours, theirs, range(3))
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    key, value = next(iter(kwargs.items()))
    assert opt.param_groups[0][key] is value


@pytest.mark.parametrize("kwargs,match", [(dict(amsgrad=True), "amsgrad=True is not supported"),
                                          (dict(capturable=True), "capturable=True is not supported"),
                                          (dict(differentiable=True), "differentiable=True is not supported")],
                         ids=["amsgrad", "capturable", "differentiable"])
def test_unsupported_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedAdam(make_params(), **kwargs)
    opt = MaskedAdam(make_params())
    with pytest.raises(ValueError, match=match):  # also per param group
        opt.add_param_group({"params": make_params(seed=9), **kwargs})


def test_amsgrad_from_a_loaded_state_dict_is_rejected_at_step():
    ps = make_params()
    torch_state = torch.optim.Adam(clone(ps), amsgrad=True).state_dict()
    opt = MaskedAdam(ps)
    opt.load_state_dict(torch_state)
    set_grads(ps, 0)
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        opt.step()


def test_loads_a_torch_adam_state_dict_and_continues_like_it(cpu_backend):
    theirs = make_params(seed=11)
    ref = torch.optim.Adam(theirs, lr=1e-2, weight_decay=0.01, foreach=False)
    for step in range(3):
        set_grads(theirs, step)
        ref.step()
    ours = clone(theirs)
    opt = MaskedAdam(ours, backend=cpu_backend)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    step_both(opt, ref, ours, theirs, range(3, 6))
    assert_same(ours, theirs)
    assert all(opt.state[p]["step"].device.type == "cpu" for p in ours)


# ----------------------------------------------------------------------- masks in state_dict
def test_explicit_masks_are_saved_and_restored(cpu_backend):
    a = make_params(seed=12, dtype=torch.float32)
    mask = torch.rand(a[0].shape, generator=gen(3)) < 0.4
    opt = MaskedAdam(a, lr=1e-2, masks={a[0]: mask}, backend=cpu_backend)
    set_grads(a, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["masks"]) == {0} and torch.equal(saved["masks"][0], mask)

    b = clone(a)
    fresh = MaskedAdam(b, lr=0.5, backend=cpu_backend)  # no masks=
    assert fresh.mask_for(b[0]) is None
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.mask_for(b[0]), mask) and fresh.mask_for(b[1]) is None
    with torch.no_grad():
        b[0].fill_(1.0)  # poison the masked entries
    set_grads(b, 1)
    fresh.step()
    zero = torch.zeros(int((~mask).sum()))
    for t in (b[0].detach(), fresh.state[b[0]]["exp_avg"], fresh.state[b[0]]["exp_avg_sq"]):
        assert torch.equal(t[~mask], zero)
    assert (b[0][mask] != 0).all()
    # A round trip through the fresh optimizer keeps them.
    assert torch.equal(fresh.state_dict()["masks"][0], mask)


def test_state_dict_without_masks_has_no_masks_key_and_keeps_constructor_masks(cpu_backend):
    ps = make_params(dtype=torch.float32)
    assert "masks" not in MaskedAdam(ps).state_dict()
    mask = torch.rand(ps[0].shape, generator=gen(1)) < 0.5
    opt = MaskedAdam(clone(ps), masks=None)
    opt2 = MaskedAdam(ps, masks={ps[0]: mask}, backend=cpu_backend)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.mask_for(ps[0]) is mask


@pytest.mark.parametrize("bad,match", [({5: torch.ones(9, 7, dtype=torch.bool)}, "not a parameter index"),
                                       ({0: torch.ones(9, 7)}, "expected a bool tensor"),
                                       ({0: torch.ones(7, 9, dtype=torch.bool)}, "expected a bool tensor of shape")])
def test_bad_saved_masks_are_rejected(bad, match):
    ps = make_params()
    opt = MaskedAdam(ps)
    state = opt.state_dict()
    state["masks"] = bad
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)


def test_deepcopy_of_the_optimizer_keeps_backend_and_masks(cpu_backend):
    ps = make_params(dtype=torch.float32)
    mask = torch.rand(ps[0].shape, generator=gen(2)) < 0.5
    opt = MaskedAdam(ps, lr=1e-2, masks={ps[0]: mask}, backend=cpu_backend)
    other = copy.deepcopy(opt)
    assert other.backend == cpu_backend
    q = other.param_groups[0]["params"][0]
    assert q is not ps[0] and torch.equal(other.mask_for(q), mask)
    with torch.no_grad():
        q.fill_(1.0)
    q.grad = torch.ones_like(q)
    other.step()
    assert torch.equal(q[~mask], torch.zeros_like(q[~mask]))


# --------------------------------------------------------------- re-wrapped MaskedLinear weights
class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def _layer(seed=1):
    return sk.nn.MaskedLinear(12, 8, density=0.4, generator=gen(seed))


def test_parametrized_weight_after_the_optimizer_was_built_raises(cpu_backend):
    layer = _layer()
    opt = MaskedAdam(layer.parameters(), lr=1e-2, backend=cpu_backend)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Double())
    layer(randn(3, 12, seed=2)).sum().backward()
    with pytest.raises(RuntimeError, match=r"MaskedLinear weight was parametrized .* after the MaskedAdam"):
        opt.step()


def test_parametrized_weight_before_the_optimizer_is_built_needs_an_explicit_mask(cpu_backend):
    layer = _layer()
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Double())
    with pytest.raises(ValueError, match="original of a parametrized MaskedLinear weight"):
        MaskedAdam(layer.parameters(), lr=1e-2, backend=cpu_backend)
    original = layer.parametrizations.weight.original
    opt = MaskedAdam(layer.parameters(), lr=1e-2, masks={original: layer.mask}, backend=cpu_backend)
    with torch.no_grad():
        original.fill_(1.0)
    layer(randn(3, 12, seed=2)).sum().backward()
    opt.step()
    assert torch.equal(original[~layer.mask], torch.zeros_like(original[~layer.mask]))


def test_weight_replaced_after_the_optimizer_was_built_raises(cpu_backend):
    layer = _layer()
    opt = MaskedAdam(layer.parameters(), lr=1e-2, backend=cpu_backend)
    layer(randn(3, 12, seed=2)).sum().backward()
    opt.step()
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    opt.zero_grad()
    layer(randn(3, 12, seed=3)).sum().backward()  # only the new weight gets a gradient
    with pytest.raises(RuntimeError, match="MaskedLinear weight was replaced by another tensor"):
        opt.step()
    with pytest.raises(RuntimeError, match="was replaced"):
        opt.mask_for(opt.param_groups[0]["params"][0])


def test_weight_assigned_before_the_optimizer_is_built_keeps_its_mask(cpu_backend):
    layer = _layer()
    layer.weight = torch.nn.Parameter(torch.ones(8, 12))  # nonzero at masked entries too
    opt = MaskedAdam(layer.parameters(), lr=1e-2, backend=cpu_backend)
    assert opt.mask_for(layer.weight) is layer.mask
    layer(randn(3, 12, seed=2)).sum().backward()
    opt.step()
    assert torch.equal(layer.weight[~layer.mask], torch.zeros_like(layer.weight[~layer.mask]))
    assert sk.nn.masked_linear.mask_of(layer.weight) is layer.mask


def test_masked_linear_mask_followed_after_to(cpu_backend):
    """Module.to(dtype) swaps .data (same Parameter object): the mask still applies, the new
    dtype is checked once, and a replaced mask buffer is followed."""
    layer = _layer()
    opt = MaskedAdam(layer.parameters(), lr=1e-2, backend=cpu_backend)
    layer.double()
    old_mask = layer.mask
    layer.mask = old_mask.clone()
    layer.mask[0, :] = False
    with torch.no_grad():
        layer.weight.fill_(1.0)
    layer(randn(3, 12, dtype=torch.float64, seed=2)).sum().backward()
    opt.step()
    assert opt.state[layer.weight]["exp_avg"].dtype == torch.float64
    assert torch.equal(layer.weight[~layer.mask], torch.zeros_like(layer.weight[~layer.mask]))
    assert (layer.weight[layer.mask] != 0).all()


# ------------------------------------------------------------------------------ validate once
def test_lists_are_checked_once_then_again_when_they_change(cpu_backend, monkeypatch):
    calls = []
    real = sk.ops._adam._check_adam_lists

    def spy(*args):
        calls.append(len(args[0]))
        return real(*args)

    monkeypatch.setattr(sk.ops._adam, "_check_adam_lists", spy)
    ps = make_params(dtype=torch.float32)
    opt = MaskedAdam(ps, lr=1e-2, backend=cpu_backend)
    for step in range(10):
        set_grads(ps, step)
        opt.step()
    assert calls == [3]  # once, not at every step
    ps[1].grad = None  # another set of parameters with gradients
    opt.step()
    assert calls == [3, 2]
    set_grads(ps, 11)
    opt.step()
    assert calls == [3, 2, 3]
    opt.load_state_dict(opt.state_dict())  # new state tensors
    opt.step()
    assert calls == [3, 2, 3, 3]
    # The public op still checks every call.
    p, g = torch.zeros(4), torch.ones(4)
    for _ in range(2):
        sk.ops.masked_adam_([p], [g], [torch.zeros(4)], [torch.zeros(4)], [None], step=1, lr=1e-3, beta1=0.9,
                            beta2=0.999, eps=1e-8, backend=cpu_backend)
    assert calls == [3, 2, 3, 3, 1, 1]


def test_a_parameter_swapped_after_steps_is_checked_again(cpu_backend):
    ps = make_params(dtype=torch.float32)
    opt = MaskedAdam(ps, lr=1e-2, backend=cpu_backend)
    set_grads(ps, 0)
    opt.step()
    ps[0].data = torch.zeros(4, 4)  # new storage, another shape than its moments
    ps[0].grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]: expected shape \(4, 4\)"):
        opt.step()


def test_bad_grad_scale_is_still_rejected_by_the_optimizer(cpu_backend):
    ps = make_params(dtype=torch.float32)
    opt = MaskedAdam(ps, lr=1e-2, backend=cpu_backend)
    set_grads(ps, 0)
    with pytest.raises(ValueError, match="grad_scale: expected a 1-element tensor"):
        opt.step(grad_scale=torch.ones(2))
    with pytest.raises(TypeError, match="found_inf: expected a floating-point tensor"):
        opt.step(found_inf=torch.zeros(1, dtype=torch.int32))


def test_float32_tensor_lr_steps_like_its_float_value(cpu_backend):
    ours = make_params(seed=4, dtype=torch.float32)
    theirs = clone(ours)
    lr = torch.tensor([0.03])  # 1-element, not 0-dim: accepted too
    opt = MaskedAdam(ours, lr=lr, backend=cpu_backend)
    ref = MaskedAdam(theirs, lr=float(lr), backend=cpu_backend)
    step_both(opt, ref, ours, theirs, range(3))
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def test_grad_scale_on_the_parameters_device_divides_the_gradients(cpu_backend):
    ours = make_params(seed=6, dtype=torch.float32)
    theirs = clone(ours)
    opt = MaskedAdam(ours, lr=1e-2, backend=cpu_backend)
    ref = MaskedAdam(theirs, lr=1e-2, backend=cpu_backend)
    set_grads(theirs, 0)
    for p, q in zip(ours, theirs):
        p.grad = q.grad * 64
    opt.step(grad_scale=torch.tensor(64.0))
    ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
