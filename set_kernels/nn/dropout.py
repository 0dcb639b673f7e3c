"""``Dropout``: ``nn.Dropout`` with the mask drawn by a parallel counter-based hash on the CPU.

torch's CPU ``bernoulli_`` draws from one Mersenne Twister, serially: on a 40 x 1000 activation it
takes about 0.3 ms, which was a third of a truly sparse SET-MLP step. This module keeps
``nn.Dropout``'s semantics (zero with probability ``p``, scale the rest by ``1 / (1 - p)``,
identity in eval mode) and draws the mask with :mod:`set_kernels.backends.numba.dropout`, seeded by
one draw from torch's default generator, so ``torch.manual_seed`` still fixes every mask. Only the
seed is kept for the backward pass, which recomputes the mask (no mask tensor is stored). Other
devices, dtypes, traced code, or a machine without numba fall back to ``F.dropout``. Not part of
the public API: ``set-kernels train`` uses it for every model it builds (dense ones too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .._checks import check_fraction


class _NumbaDropout(torch.autograd.Function):
    # Only the seed is saved: the backward pass recomputes the mask (the hash is cheaper than
    # storing and reading a mask), ``grad * mult`` by the same kernel.
    @staticmethod
    def forward(ctx, x, p):
        kernel = backends.get("numba")._load()[4]
        out = torch.empty(x.shape, dtype=x.dtype)  # returned as is: a view would cost autograd's view tracking
        seed = int(torch.randint(0, 2**62, ()))
        key = (seed & 0xFFFFFFFF, seed >> 32, int(p * 2**32), 1.0 / (1.0 - p))
        kernel.dropout(x.detach().contiguous().view(-1).numpy(), *key, out.view(-1).numpy())
        ctx.key = key
        return out

    @staticmethod
    def backward(ctx, grad):
        kernel = backends.get("numba")._load()[4]
        if grad.requires_grad:  # create_graph: a differentiable grad * mult
            mult = torch.empty(grad.numel(), dtype=grad.dtype)
            kernel.dropout(torch.ones_like(mult).numpy(), *ctx.key, mult.numpy())
            return grad * mult.view(grad.shape), None
        out = torch.empty(grad.shape, dtype=grad.dtype)
        kernel.dropout(grad.contiguous().view(-1).numpy(), *ctx.key, out.view(-1).numpy())
        return out, None


class Dropout(torch.nn.Module):
    """``nn.Dropout(p)``; input and output of any shape."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = check_fraction("p", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if (self.p < 1.0 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and not torch.compiler.is_compiling() and type(x) is torch.Tensor
                and backends.availability("numba")[0]):
            return _NumbaDropout.apply(x, self.p)
        return F.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}"
