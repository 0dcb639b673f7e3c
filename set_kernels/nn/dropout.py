"""``Dropout``: ``nn.Dropout`` with the mask drawn by a parallel counter-based hash on the CPU.

torch's CPU ``bernoulli_`` draws from one Mersenne Twister, serially: on a 40 x 1000 activation it
takes about 0.3 ms, which was a third of a truly sparse SET-MLP step. This module keeps
``nn.Dropout``'s semantics (zero with probability ``p``, scale the rest by ``1 / (1 - p)``,
identity in eval mode) and draws the mask with :mod:`set_kernels.backends.numba.dropout`, seeded by
one draw from torch's default generator, so ``torch.manual_seed`` still fixes every mask. Only the
seed is kept for the backward pass, which recomputes the mask (no mask tensor is stored). Other
devices, dtypes, traced code, or a machine without numba fall back to ``F.dropout``.

``ReLUDropout`` is ``ReLU`` then ``Dropout`` in one kernel: the same masks and the same values,
bit for bit, as the two modules in a row (for finite inputs; a NaN input may come out as 0). Its backward pass needs no hash: it keeps the output
``y`` (which the next layer keeps as its input anyway) and passes ``grad * scale`` where
``y > 0``, which is exactly where the element was kept and its input was positive. One autograd
node and one kernel per pass instead of two.

``FusedSequential`` is ``nn.Sequential`` that runs an element-level ``SparseLinear`` followed by a
``ReLUDropout`` as one op in training, when the numba backend serves them (CPU, fp32/fp64, plain
eager tensors, no hooks on either module): the element forward applies the ReLU and the mask as
it writes its output (the same draw from torch's generator, the same mask and values, bit for
bit), and its backward takes the epilogue's gradient in the transpose of ``dy`` it makes anyway,
summing the bias gradient there too. That removes one autograd node, one kernel and one pass over
the activation per layer and pass (a width-1,000 SET-MLP step had ~350 us of its ~2.4 ms in the
three ReLU + dropout modules). Anything else runs module by module, as ``nn.Sequential`` does.

None of these is part of the public API: ``set-kernels train`` uses them for every model it
builds (dense ones too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torch.nn.modules import module as _module

from .. import backends
from .._checks import check_fraction
from ..ops import _library
from .sparse_linear import SparseLinear


def _draw_key(p: float) -> tuple:
    """``(k0, k1, threshold, scale)`` of one dropout call: one 62-bit draw from torch's default
    generator (so ``torch.manual_seed`` fixes every mask)."""
    seed = int(torch.randint(0, 2**62, ()))
    return seed & 0xFFFFFFFF, seed >> 32, int(p * 2**32), 1.0 / (1.0 - p)


class _NumbaDropout(torch.autograd.Function):
    # Plain dropout saves only the seed: the backward pass recomputes the mask (the hash is cheaper
    # than storing and reading a mask), ``grad * mult`` by the same kernel. With ``relu`` the
    # output is saved instead and the backward pass is ``grad * scale`` where it is positive.
    @staticmethod
    def forward(ctx, x, p, relu):
        kernel = backends.get("numba")._load()[4]
        out = torch.empty(x.shape, dtype=x.dtype)  # returned as is: a view would cost autograd's view tracking
        key = _draw_key(p)
        kernel.dropout(x.detach().contiguous().view(-1).numpy(), *key, out.view(-1).numpy(), relu)
        ctx.key, ctx.relu = key, relu
        if relu:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        kernel = backends.get("numba")._load()[4]
        scale = ctx.key[3]
        if ctx.relu:
            (y,) = ctx.saved_tensors
            if grad.requires_grad:  # create_graph: differentiable in grad
                return grad * ((y > 0).to(grad.dtype) * scale), None, None
            out = torch.empty(grad.shape, dtype=grad.dtype)
            kernel.relu_dropout_grad(grad.contiguous().view(-1).numpy(), y.detach().view(-1).numpy(), scale,
                                     out.view(-1).numpy())
            return out, None, None
        if grad.requires_grad:  # create_graph: a differentiable grad * mult
            mult = torch.empty(grad.numel(), dtype=grad.dtype)
            kernel.dropout(torch.ones_like(mult).numpy(), *ctx.key, mult.numpy(), False)
            return grad * mult.view(grad.shape), None, None
        out = torch.empty(grad.shape, dtype=grad.dtype)
        kernel.dropout(grad.contiguous().view(-1).numpy(), *ctx.key, out.view(-1).numpy(), False)
        return out, None, None


def _numba_ok(x: torch.Tensor, p: float) -> bool:
    return (p < 1.0 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and type(x) is torch.Tensor
            and backends.availability("numba")[0])


class Dropout(torch.nn.Module):
    """``nn.Dropout(p)``; input and output of any shape."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = check_fraction("p", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if _numba_ok(x, self.p):
            return _NumbaDropout.apply(x, self.p, False)
        return F.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLUDropout(Dropout):
    """``nn.ReLU()`` then :class:`Dropout` ``(p)`` in one kernel; input and output of any shape.

    The masks and values are those of the two modules in a row (the same draw from torch's
    generator per call), bit for bit; so are the gradients.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return F.relu(x)
        if _numba_ok(x, self.p):
            return _NumbaDropout.apply(x, self.p, True)
        return F.dropout(F.relu(x), self.p, True)


class _SparseReLUDropout(torch.autograd.Function):
    """``ReLUDropout(p)(SparseLinear(block_size=1)(x))`` through the numba element kernels, one
    node: ``forward(x, values, bias, index, rows, cols, key)`` with ``key`` from :func:`_draw_key`."""

    @staticmethod
    def forward(ctx, x, values, bias, index, rows, cols, key):
        numba_backend = backends.get("numba")
        row_ptr, col_idx, *_ = _library.check_index(index, rows, cols, 1)
        y = numba_backend.linear_forward(x, values, row_ptr, col_idx, bias, rows, cols, 1, relu_dropout=key)
        ctx.save_for_backward(x, values, index, y)
        ctx.meta = (rows, cols, key[3], bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values, index, y = ctx.saved_tensors
        rows, cols, scale, has_bias = ctx.meta
        need_dx, need_dv, need_db = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        if torch.is_grad_enabled():  # create_graph: the differentiable ops
            g = dy * ((y > 0).to(dy.dtype) * scale)
            with backends.use("numba"):
                dx = _library.linear_grad_input(g, values, index, rows, cols, 1) if need_dx else None
                dv = _library.linear_grad_weight(g, x, index, rows, cols, 1) if need_dv else None
            return dx, dv, (g.sum(0) if need_db and has_bias else None), None, None, None, None
        _, col_idx, block_row, col_ptr, row_idx, perm = _library.check_index(index, rows, cols, 1)
        dx, dv, db = backends.get("numba").linear_backward_relu_dropout(
            dy, y, scale, x, values, col_ptr, row_idx, perm, block_row, col_idx, rows, cols, need_dx, need_dv)
        return dx, dv, (db if need_db and has_bias else None), None, None, None, None


_FUSABLE_DTYPES = (torch.float32, torch.float64)


def _fusable(linear, act, x):
    """``linear``'s layout when ``act(linear(x))`` may run as :class:`_SparseReLUDropout`, else
    None (module by module: the modules' own calls raise what there is to raise)."""
    if not (type(act) is ReLUDropout and act.training and 0.0 < act.p < 1.0 and isinstance(linear, SparseLinear)
            and linear.block_size == 1 and type(x) is torch.Tensor and x.dim() == 2):
        return None
    values, bias = linear.values, linear.bias
    dtype = x.dtype
    if (x.shape[1] != linear.in_features or dtype not in _FUSABLE_DTYPES or values.dtype != dtype
            or x.device.type != "cpu" or values.device.type != "cpu"
            or (bias is not None and (bias.dtype != dtype or bias.shape != (linear.out_features,)))):
        return None
    if (linear._forward_hooks or linear._forward_pre_hooks or act._forward_hooks or act._forward_pre_hooks
            or _module._global_forward_hooks or _module._global_forward_pre_hooks):
        return None  # hooks see each module's call
    if torch.is_autocast_enabled("cpu") or not _library.plain_eager(x, values, bias):
        return None
    try:
        if _library.resolve(linear.backend, "linear_forward", x.device, dtype, 1) != "numba":
            return None
    except (RuntimeError, ValueError):
        return None
    layout = linear.layout
    return layout if values.shape[0] == layout.nnz_blocks else None


class FusedSequential(torch.nn.Sequential):
    """``nn.Sequential`` that fuses ``SparseLinear(block_size=1)`` + ``ReLUDropout`` pairs in
    training (see the module docstring); otherwise the same modules, state and outputs."""

    def forward(self, x):
        mods = list(self._modules.values())
        i, n = 0, len(mods)
        while i < n:
            m = mods[i]
            layout = _fusable(m, mods[i + 1], x) if i + 1 < n and self.training else None
            if layout is not None:
                x = _SparseReLUDropout.apply(x.contiguous(), m.values, m.bias, layout.index, m.out_features,
                                             m.in_features, _draw_key(mods[i + 1].p))
                i += 2
            else:
                x = m(x)
                i += 1
        return x
