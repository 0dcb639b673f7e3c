"""Functional ops: thin, checked wrappers over the ``torch.ops.set_kernels`` custom ops.

Each wrapper validates its arguments before any work (``TypeError`` for types and dtypes,
``ValueError`` for shapes, values and devices), resolves the backend (see
:mod:`set_kernels.backends`) and calls the custom op. A plain eager call (no torch.compile or
export tracing, no fake tensors or dispatch modes) of ``block_sparse_linear`` runs the same kernels
and autograd formulas through :class:`~set_kernels.ops._library.EagerLinear` instead, which skips
the custom-op dispatch (tens of microseconds a call, a large share of a small layer's time).
"""
from __future__ import annotations

import math

import torch

from .. import backends
from .._checks import check_same_device, check_tensor
from ..layout import BlockSparseLayout
from . import _library

__all__ = ["block_sparse_linear", "to_dense", "from_dense", "masked_adam_"]


def _check_layout(layout) -> BlockSparseLayout:
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout: expected a BlockSparseLayout, got {type(layout).__name__}")
    # O(1): the packed index must fit the layout's grid (the ops check its contents once).
    nnz = _library.check_index_structure(layout.index, *layout.shape, layout.block_size)
    if nnz != layout.nnz_blocks:
        raise ValueError(f"layout: its index holds {nnz} blocks but nnz_blocks is {layout.nnz_blocks}")
    return layout


_ERRORS = {"ValueError": ValueError, "RuntimeError": RuntimeError, "TypeError": TypeError}


@torch.compiler.assume_constant_result
def _resolve_or_error(backend, op: str, device: torch.device, dtype: torch.dtype,
                      block_size=None) -> tuple[str, str]:
    """``(backend name, "")``, or ``(error type name, message)``; a constant under torch.compile.

    Under ``torch.compile`` this runs once, when the graph is traced, and its result is baked in
    (so ``$SET_KERNELS_BACKEND`` is read at compile time). Returning the error instead of raising
    it lets the caller raise it as the same exception type, compiled or not.
    """
    try:
        return backends.resolve(backend, op, device, dtype, block_size), ""
    except (ValueError, RuntimeError, TypeError) as exc:
        return type(exc).__name__, str(exc)


def _resolve(backend, op: str, device: torch.device, dtype: torch.dtype, block_size=None) -> str:
    """:func:`set_kernels.backends.resolve`, traceable by torch.compile without a graph break."""
    name, error = _resolve_or_error(backend, op, device, dtype, block_size)
    if error:
        raise _ERRORS[name](error)
    return name


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t


def _autocast_dtype(device: torch.device):
    """The autocast dtype when autocast is on for ``device`` (a matmul is cast to it), else None."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _check_values(values, layout: BlockSparseLayout) -> torch.Tensor:
    check_tensor("values", values, floating=True)
    b = layout.block_size
    expected = (layout.nnz_blocks, b, b)
    if tuple(values.shape) != expected:
        raise ValueError(f"values: expected shape {expected} (nnz_blocks, block_size, block_size), "
                         f"got {tuple(values.shape)}")
    return values


def block_sparse_linear(x, values, layout, bias=None, *, backend=None) -> torch.Tensor:
    """``y = x @ to_dense(values, layout).T + bias``, touching only live blocks.

    Args:
        x: ``(..., cols)`` floating tensor, any number of leading dims.
        values: ``(nnz_blocks, b, b)``, same dtype and device as ``x``, in the layout's CSR order.
        layout: :class:`BlockSparseLayout` of shape ``(rows, cols)`` on the same device.
        bias: ``(rows,)`` or None.
        backend: None/"auto", "triton", "cuda", "numba" or "torch".

    Returns:
        ``(..., rows)`` tensor. Gradients flow to ``x``, ``values`` and ``bias``.

    Under ``torch.autocast`` (a float16 or bfloat16 autocast dtype) the op runs in that dtype,
    like ``F.linear``: ``x``, ``values`` and ``bias`` are cast, the result has the autocast dtype,
    and gradients come back in the inputs' own dtypes. The backend must support that dtype.

    Raises:
        TypeError: a non-tensor or non-floating argument, mismatched dtypes, or a non-layout.
        ValueError: a shape mismatch, tensors on different devices, or an unknown backend name.
        RuntimeError: the requested backend is not available for this device and dtype.
    """
    layout = _check_layout(layout)
    check_tensor("x", x, floating=True)
    _check_values(values, layout)
    rows, cols = layout.shape
    if x.dim() == 0 or x.shape[-1] != cols:
        raise ValueError(f"x: expected last dimension {cols} (the layout's cols), got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias: expected shape ({rows},), got {tuple(bias.shape)}")
    device = check_same_device(x=x, values=values, bias=bias, layout=layout.index)
    cast = _autocast_dtype(device)
    if cast is not None:
        # Autocast, like F.linear: fp16/bf16/fp32 operands are cast to the autocast dtype (fp64
        # ones are left alone), the kernels accumulate in fp32, and gradients flow back through
        # the casts in each input's own dtype.
        x, values = _autocast(x, cast), _autocast(values, cast)
        bias = None if bias is None else _autocast(bias, cast)
    if values.dtype != x.dtype:
        raise TypeError(f"values: expected dtype {x.dtype} (the dtype of x), got {values.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected dtype {x.dtype} (the dtype of x), got {bias.dtype}")
    name = _resolve(backend, "bsmm_dsd", device, x.dtype, layout.block_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols).contiguous()
    values = values.contiguous()
    fn = _library.EagerLinear.apply if _library.plain_eager(x2, values, bias) else _library.bsmm_dsd
    y = fn(x2, values, layout.index, bias, rows, cols, layout.block_size, name)
    return y.reshape(*lead, rows)


def to_dense(values, layout) -> torch.Tensor:
    """``W (rows, cols)`` from ``values (nnz_blocks, b, b)``; zeros outside live blocks."""
    layout = _check_layout(layout)
    _check_values(values, layout)
    check_same_device(values=values, layout=layout.index)
    return _library.to_dense(values.contiguous(), layout.index, *layout.shape, layout.block_size)


def from_dense(weight, layout) -> torch.Tensor:
    """``values (nnz_blocks, b, b)``: the live blocks of ``weight (rows, cols)``.

    Parts of edge blocks that lie beyond ``rows`` / ``cols`` are zero.
    """
    layout = _check_layout(layout)
    check_tensor("weight", weight, floating=True)
    if tuple(weight.shape) != layout.shape:
        raise ValueError(f"weight: expected shape {layout.shape} (the layout's shape), got {tuple(weight.shape)}")
    check_same_device(weight=weight, layout=layout.index)
    return _library.from_dense(weight.contiguous(), layout.index, *layout.shape, layout.block_size)


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
    chosen = {dt: _resolve(backend, "masked_adam_", device, dt) for dt in {p.dtype for p in params}}
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(chosen[p.dtype], []).append(i)
    for name, idx in groups.items():  # one fused call per backend (usually exactly one)
        _library.masked_adam_(
            [params[i] for i in idx], [grads[i].contiguous() for i in idx], [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx], [_contiguous(masks[i]) for i in idx], grad_scale, found_inf, step,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            bool(decoupled_weight_decay), name,
        )
