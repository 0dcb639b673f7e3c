"""``set_mlp_step``: one SET-MLP training step against the same MLP trained dense.

The model is the SET paper's MLP (``Grid.mlp_layers``, 784-1000-1000-1000-10 by default, ReLU),
made block-sparse with ``set_kernels.sparsify(distribution="er")`` at a total density. A sparse
step is forward, cross-entropy, backward and ``MaskedAdam.step()``; the SET topology update
(``set_kernels.SET``, zeta 0.3, random regrowth) is timed on its own (with ``interval=1`` every
call updates) and amortised: ``median_ms = step_ms + evolution_ms / Grid.mlp_interval``. The
dense step is the same MLP of ``nn.Linear`` layers with ``torch.optim.Adam(fused=True)``.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from .. import backends as _backends
from ..nn import SparseLinear, layer_densities, sparsify
from ..optim import MaskedAdam
from .cases import Group, _live_elements, _try_add

ZETA = 0.3
# Dense weights above which the dense MLP is not built (the scale cases: it would not fit or
# would take minutes a step); the sparse model is then built directly, without a dense template.
DENSE_LIMIT = 50_000_000


def _relu_between(layers) -> torch.nn.Sequential:
    return torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())][:-1])


def _sparse_mlp(layers, density, block, device, dtype, gen) -> torch.nn.Sequential:
    """The SET-MLP with SparseLinear layers at ER densities of total ``density``, built directly."""
    shapes = [(n_out, n_in) for n_in, n_out in zip(layers[:-1], layers[1:])]
    densities = layer_densities(shapes, density, "er")
    return _relu_between([SparseLinear(n_in, n_out, density=d, block_size=block, generator=gen, device=device,
                                       dtype=dtype) for (n_out, n_in), d in zip(shapes, densities)])


def _dense_mlp(layers, device, dtype, gen) -> torch.nn.Sequential:
    mods = []
    for n_in, n_out in zip(layers[:-1], layers[1:]):
        lin = torch.nn.Linear(n_in, n_out)
        with torch.no_grad():
            bound = n_in ** -0.5
            lin.weight.copy_(torch.rand(n_out, n_in, generator=gen) * 2 * bound - bound)
            lin.bias.copy_(torch.rand(n_out, generator=gen) * 2 * bound - bound)
        mods.append(lin)
    return _relu_between(mods).to(device=device, dtype=dtype)


def _train_step(model, opt, x, y):
    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def mlp_group(grid, density: float, device, names, *, seed: int = 2, layers=None, block=None) -> Group:
    """The SET-MLP step with each backend in ``names`` (its SparseLinear layers) against the dense MLP.

    ``layers`` and ``block`` default to ``grid.mlp_layers`` and ``grid.mlp_block``. Above
    :data:`DENSE_LIMIT` dense weights the dense MLP is skipped (with the reason) and the sparse one
    built directly: the scale cases.
    """
    from .. import SET  # the evolution module; ImportError is reported as a skipped case

    dtype = getattr(torch, grid.mlp_dtype)
    layers = tuple(grid.mlp_layers if layers is None else layers)
    block = grid.mlp_block if block is None else block
    gen = torch.Generator().manual_seed(seed)
    total = sum(a * b for a, b in zip(layers[:-1], layers[1:]))
    dense = _dense_mlp(layers, device, dtype, gen) if total <= DENSE_LIMIT else None
    x = torch.randn(grid.mlp_batch, layers[0], generator=gen).to(device, dtype)
    y = torch.randint(0, layers[-1], (grid.mlp_batch,), generator=gen).to(device)
    if dense is not None:
        template = sparsify(copy.deepcopy(dense), density=density, block_size=block, distribution="er")
    else:
        template = _sparse_mlp(layers, density, block, device, dtype, gen)
    sparse_layers = [m for m in template.modules() if isinstance(m, SparseLinear)]
    live = sum(_live_elements(m.layout) for m in sparse_layers)
    group = Group(op="set_mlp_step", pass_="train_step", shape={"batch": grid.mlp_batch, "layers": list(layers)},
                  dtype=grid.mlp_dtype, block=block, density=live / total, nnz_blocks=None)
    try:
        opt_backend = _backends.resolve(None, "masked_adam_", torch.device(device), dtype)
    except RuntimeError:
        opt_backend = None
    evolutions = {}
    for name in names:
        def build(name=name):
            model = copy.deepcopy(template)
            for m in model.modules():
                if isinstance(m, SparseLinear):
                    m.backend = name
            opt = MaskedAdam(model.parameters(), lr=1e-3)
            evolutions[name] = SET(model, opt, zeta=ZETA, interval=1, regrow="random", seed=seed)
            return _train_step(model, opt, x, y)
        _try_add(group, name, "sparse", build)
        if name in group.fns:
            evo = evolutions[name]
            _try_add(group, f"{name}/set_update", "sparse", lambda evo=evo: evo.step)
        group.flops[name] = 6 * grid.mlp_batch * live

    def build_dense():
        model = copy.deepcopy(dense)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        return _train_step(model, opt, x, y)
    if dense is None:
        group.skipped.append(("dense", f"the dense MLP has {total:,} weights (over {DENSE_LIMIT:,}: it would not "
                                       "fit, or take minutes a step, on this machine)"))
    else:
        _try_add(group, "dense", "dense", build_dense)
    group.flops["dense"] = 6 * grid.mlp_batch * total
    group.postprocess = lambda stats: _amortise(stats, grid.mlp_interval, group, opt_backend)
    return group


def _amortise(stats: dict, interval: int, group: Group, opt_backend) -> dict:
    """Fold each ``<backend>/set_update`` timing into ``<backend>``: step + update / interval."""
    out = {}
    for impl, st in stats.items():
        if impl.endswith("/set_update"):
            continue
        upd = stats.get(f"{impl}/set_update")
        if upd is not None:
            group.extra[impl] = {"step_ms": st.median_ms, "evolution_ms": upd.median_ms, "interval": interval,
                                 "zeta": ZETA, "optimizer_backend": opt_backend}
            st = dataclasses.replace(st, **{k: getattr(st, k) + getattr(upd, k) / interval
                                             for k in ("median_ms", "q20_ms", "q80_ms", "min_ms", "max_ms")})
        elif group.kinds[impl] == "sparse":
            continue  # no evolution timing: not a complete SET step
        out[impl] = st
    return out
