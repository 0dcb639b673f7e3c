"""``sparsify``: replace a model's ``nn.Linear`` layers with sparse ones at a total density."""
from __future__ import annotations

import torch

from .._checks import check_block_size, check_choice, check_fraction
from .masked_linear import MaskedLinear
from .sparse_linear import SparseLinear

DISTRIBUTIONS = ("uniform", "er", "erk")


def layer_densities(shapes: list[tuple[int, int]], density: float, distribution: str) -> list[float]:
    """Per-layer densities for weights of ``shapes`` [(out, in), ...] whose total density is ``density``.

    ``uniform`` gives every layer ``density``. ``er`` / ``erk`` (Erdos-Renyi(-Kernel), as in RigL;
    identical for linear layers, which have no kernel dims) make density proportional to
    ``(n_in + n_out) / (n_in * n_out)``. A layer whose density would exceed 1 is made dense and
    the remaining budget is spread over the others, so that ``sum(d_l * n_l) == density * sum(n_l)``.
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    density = check_fraction("density", density)
    sizes = [o * i for o, i in shapes]
    if distribution == "uniform":
        return [density] * len(shapes)
    raw = [(o + i) / (o * i) for o, i in shapes]
    budget = density * sum(sizes)
    dense: set[int] = set()
    while True:
        free = [k for k in range(len(shapes)) if k not in dense]
        left = budget - sum(sizes[k] for k in dense)
        denom = sum(raw[k] * sizes[k] for k in free)
        scale = left / denom if denom > 0 else 0.0
        over = [k for k in free if raw[k] * scale > 1.0]
        if not over:
            return [1.0 if k in dense else raw[k] * scale for k in range(len(shapes))]
        dense.update(over)


def sparsify(model: torch.nn.Module, *, density: float, block_size: int | None = 32, distribution: str = "erk",
             exclude=()) -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place (except module names in ``exclude``).

    With ``block_size=None`` each becomes a :class:`MaskedLinear`, otherwise a :class:`SparseLinear`
    with that block size. The layers keep their largest weights (``from_dense``), with per-layer
    densities from :func:`layer_densities` so that the total density over the replaced layers is
    ``density``. Returns ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    density = check_fraction("density", density)
    if block_size is not None:
        check_block_size(block_size)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise TypeError("exclude: expected a collection of module names (strings)")
    exclude = set(exclude)
    names = {name for name, _ in model.named_modules()}
    unknown = exclude - names
    if unknown:
        raise ValueError(f"exclude: no module named {sorted(unknown)} in the model")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and name not in exclude]
    if not targets:
        raise ValueError("model: expected at least one torch.nn.Linear to sparsify (after exclude)")
    densities = layer_densities([tuple(m.weight.shape) for _, m in targets], density, distribution)
    for (name, linear), d in zip(targets, densities):
        if block_size is None:
            new = MaskedLinear.from_dense(linear, density=d)
        else:
            new = SparseLinear.from_dense(linear, density=d, block_size=block_size)
        _set_submodule(model, name, new)
    return model


def _set_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    if name == "":
        raise ValueError("model: the model itself is an nn.Linear; wrap it or build a sparse layer directly")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
