"""``MaskedLinear``: element-level mask on a dense weight, the exact semantics of the SET paper."""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from .._checks import check_fraction, check_int


class MaskedLinear(torch.nn.Module):
    """``y = x @ (W * mask).T + bias`` with a dense weight and a boolean element mask.

    Attributes:
        weight: dense ``nn.Parameter (out_features, in_features)``, exactly 0 where ``mask`` is False.
        mask: bool buffer ``(out_features, in_features)`` with exactly ``round(density * numel)`` True.
        bias: ``nn.Parameter (out_features,)`` or None.

    The forward multiplies by the mask, so masked entries get zero gradient under any optimizer;
    :class:`set_kernels.optim.MaskedAdam` finds the mask automatically and also zeroes the moments.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, density: float = 0.1,
                 device=None, dtype=None, generator=None):
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        density = check_fraction("density", density)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        numel = out_features * in_features
        gen_device = generator.device if generator is not None else self.weight.device
        live = torch.randperm(numel, generator=generator, device=gen_device)[: round(density * numel)]
        mask = torch.zeros(numel, dtype=torch.bool, device=self.weight.device)
        mask[live.to(mask.device)] = True
        self.register_buffer("mask", mask.reshape(out_features, in_features))
        self.reset_parameters(generator=generator)
        _tag_masked_param(self.weight, self)

    @torch.no_grad()
    def reset_parameters(self, generator=None) -> None:
        """``nn.Linear``'s default init U(-1/sqrt(in), 1/sqrt(in)) on live entries; 0 elsewhere."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight.uniform_(-bound, bound, generator=generator).mul_(self.mask)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound, generator=generator)

    def __setstate__(self, state) -> None:
        # deepcopy and unpickling build a new weight: register the copy's own mask for it.
        super().__setstate__(state)
        _tag_masked_param(self.weight, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, *, density: float):
        """A ``MaskedLinear`` keeping the ``round(density * numel)`` weights of largest ``|w|``."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        density = check_fraction("density", density)
        weight = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, density=0.0,
                  device=weight.device, dtype=weight.dtype)
        keep = torch.topk(weight.abs().reshape(-1), round(density * weight.numel()), sorted=False).indices
        with torch.no_grad():
            out.mask.view(-1)[keep] = True
            out.weight.copy_(weight * out.mask)
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach())
        return out

    def extra_repr(self) -> str:
        density = self.mask.sum().item() / self.mask.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={density:.4f}")


# Every live MaskedLinear (weakly held: an entry goes with its module). MaskedAdam resolves the
# owner of each of its parameters once, through :func:`mask_owners`, keeps the module and reads
# its *current* ``mask`` buffer at each step (so it follows .to(), load_state_dict and topology
# updates). Nothing is stored on the parameter itself, so modules stay picklable and
# deep-copyable; __setstate__ registers a copy. The weight is read from ``_parameters`` at lookup
# time, so a weight assigned later (``layer.weight = nn.Parameter(...)``) is found too.
_LIVE: "weakref.WeakSet[MaskedLinear]" = weakref.WeakSet()


def _tag_masked_param(param: torch.nn.Parameter, module: MaskedLinear) -> None:
    """Register ``module`` as a mask owner (``param`` is its weight; kept for the callers' signature)."""
    _LIVE.add(module)


def current_weight(module: MaskedLinear):
    """The module's weight Parameter as registered now, or None when it has none (for example
    while ``weight`` is parametrized with ``torch.nn.utils.parametrize``)."""
    return module._parameters.get("weight")


def parametrized_originals(module: MaskedLinear) -> list:
    """The original tensors behind a parametrized ``weight`` (``torch.nn.utils.parametrize``), else []."""
    plist = module.__dict__.get("_modules", {}).get("parametrizations")
    if plist is None or "weight" not in plist._modules:
        return []
    holder = plist._modules["weight"]
    return [t for name, t in list(holder._parameters.items()) + list(holder._buffers.items())
            if name.startswith("original") and t is not None]


def mask_owners(params) -> dict:
    """``{param: MaskedLinear}`` for the tensors in ``params`` that are the current weight of a live
    :class:`MaskedLinear`; other tensors are left out. One pass over the live modules and the
    params. Raises ValueError for a tensor that is the original of a parametrized MaskedLinear
    weight: the mask applies to the parametrized value, not to that tensor, so no mask can be
    inferred for it (pass one explicitly, e.g. ``MaskedAdam(masks={param: mask})``).
    """
    current, parametrized = {}, {}
    for module in list(_LIVE):
        weight = current_weight(module)
        if weight is not None:
            current[id(weight)] = module
        for original in parametrized_originals(module):
            parametrized[id(original)] = module
    owners = {}
    for p in params:
        module = current.get(id(p))
        if module is not None:
            owners[p] = module
        elif id(p) in parametrized:
            raise ValueError(
                "a parameter is the original of a parametrized MaskedLinear weight "
                "(torch.nn.utils.parametrize): its mask applies to the parametrized weight, not to this tensor, "
                "so MaskedAdam cannot infer one; pass masks={param: bool tensor} explicitly or remove the "
                "parametrization")
    return owners


def mask_of(param: torch.Tensor):
    """The current mask of a ``MaskedLinear`` weight, or None for any other tensor."""
    module = mask_owners([param]).get(param)
    return None if module is None else module.mask
