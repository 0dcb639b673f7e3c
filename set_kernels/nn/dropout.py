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

Neither module is part of the public API: ``set-kernels train`` uses them for every model it
builds (dense ones too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .._checks import check_fraction


class _NumbaDropout(torch.autograd.Function):
    # Plain dropout saves only the seed: the backward pass recomputes the mask (the hash is cheaper
    # than storing and reading a mask), ``grad * mult`` by the same kernel. With ``relu`` the
    # output is saved instead and the backward pass is ``grad * scale`` where it is positive.
    @staticmethod
    def forward(ctx, x, p, relu):
        kernel = backends.get("numba")._load()[4]
        out = torch.empty(x.shape, dtype=x.dtype)  # returned as is: a view would cost autograd's view tracking
        seed = int(torch.randint(0, 2**62, ()))
        key = (seed & 0xFFFFFFFF, seed >> 32, int(p * 2**32), 1.0 / (1.0 - p))
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
