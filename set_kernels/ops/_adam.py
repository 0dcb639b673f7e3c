"""The public masked Adam op: its checks and the call of the ``set_kernels::masked_adam_`` custom op."""
from __future__ import annotations

import math

import torch

from .._checks import check_same_device, check_tensor
from .. import backends
from . import _library


def _check_adam_lists(params, grads, exp_avgs, exp_avg_sqs, masks):
    lists = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, masks=masks)
    for name, seq in lists.items():
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name}: expected a list of tensors, got {type(seq).__name__}")
        if len(seq) != len(params):
            raise ValueError(f"{name}: expected {len(params)} entries (one per param), got {len(seq)}")
    for i, (p, g, m, v, mask) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, masks)):
        check_tensor(f"params[{i}]", p, floating=True)
        if not p.is_contiguous():
            raise ValueError(f"params[{i}]: expected a contiguous tensor (it is updated in place)")
        for name, t in ((f"grads[{i}]", g), (f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v)):
            check_tensor(name, t, floating=True)
            if t.shape != p.shape:
                raise ValueError(f"{name}: expected shape {tuple(p.shape)} (params[{i}]), got {tuple(t.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}]: expected dtype {p.dtype} (params[{i}]), got {g.dtype}")
        for name, t in ((f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v)):
            if not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor (it is updated in place)")
            if t.dtype != m.dtype or t.dtype not in (torch.float32, p.dtype):
                raise TypeError(f"{name}: expected dtype float32 or {p.dtype}, the same for both moments, got {t.dtype}")
        if mask is not None:
            check_tensor(f"masks[{i}]", mask)
            if mask.dtype != torch.bool:
                raise TypeError(f"masks[{i}]: expected a bool tensor, got dtype {mask.dtype}")
            if mask.shape != p.shape:
                raise ValueError(f"masks[{i}]: expected shape {tuple(p.shape)} (params[{i}]), got {tuple(mask.shape)}")
        check_same_device(**{f"params[{i}]": p, f"grads[{i}]": g, f"exp_avgs[{i}]": m,
                             f"exp_avg_sqs[{i}]": v, f"masks[{i}]": mask, "params[0]": params[0]})


def _check_hyper(step, lr, beta1, beta2, eps, weight_decay):
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step: expected an int >= 1 (the step count after this update), got {step!r}")
    for name, value, lo, hi in (("lr", lr, 0.0, math.inf), ("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0),
                                ("eps", eps, 0.0, math.inf), ("weight_decay", weight_decay, 0.0, math.inf)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        if not (lo <= value < hi):
            raise ValueError(f"{name}: expected a value in [{lo}, {hi}), got {value}")


def _contiguous(t):
    return None if t is None else t.contiguous()


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step, lr, beta1, beta2, eps,
                 weight_decay=0.0, decoupled_weight_decay=False, grad_scale=None, found_inf=None,
                 backend=None) -> None:
    """Fused masked Adam/AdamW, in place, over lists of tensors (one pass over p, g, m, v, mask).

    Args:
        params: tensors of any shape, fp32/fp64 (fp16/bf16 on backends that support them), contiguous.
        grads: same shapes and dtypes as ``params``.
        exp_avgs, exp_avg_sqs: same shapes; float32 or the param dtype; contiguous.
        masks: bool tensors of the param shapes, or None entries (no mask).
        step: the step count after this update (>= 1), for bias correction.
        grad_scale: optional 1-element tensor; grads are divided by it (AMP).
        found_inf: optional 1-element tensor; when non-zero nothing changes (AMP).

    Where a mask is False the parameter and both moments are set to exactly 0; elsewhere the
    update is ``torch.optim.Adam`` (L2 decay folded into the gradient) or, with
    ``decoupled_weight_decay=True``, ``torch.optim.AdamW``.
    """
    _check_adam_lists(params, grads, exp_avgs, exp_avg_sqs, masks)
    _check_hyper(step, lr, beta1, beta2, eps, weight_decay)
    if not params:
        return
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            check_tensor(name, t, floating=True)
            if t.numel() != 1:
                raise ValueError(f"{name}: expected a 1-element tensor, got shape {tuple(t.shape)}")
    device = check_same_device(params=params[0], grad_scale=grad_scale, found_inf=found_inf)
    explicit = backend is not None and backend != "auto"
    for dt in {p.dtype for p in params}:  # raises here, naming the argument, when no backend can run it
        _library.resolve(backend, "masked_adam_", device, dt)
    args = ([p for p in params], [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
            [_contiguous(m) for m in masks], grad_scale, found_inf, step, float(lr), float(beta1), float(beta2),
            float(eps), float(weight_decay), bool(decoupled_weight_decay))
    if explicit:
        with backends.use(backend):  # the op's kernel picks the backend when it runs
            _library.masked_adam_(*args)
    else:
        _library.masked_adam_(*args)
