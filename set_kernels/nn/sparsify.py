"""``sparsify``: replace a model's ``nn.Linear`` layers with sparse ones at a total density.

Which layers are converted (the rule, applied in this order):

1. ``exclude``: a module named there, or lying under a module named there (``"encoder"``
   excludes ``encoder.0``, ``encoder.1``, ...), is left alone, silently: that was asked for.
2. Only modules whose type is exactly ``torch.nn.Linear`` are converted. A **subclass** is kept
   as it is, with a warning: a subclass may change ``forward`` (LoRA, quantisation, a
   parametrization), or its owner may read its ``weight`` directly
   (``nn.MultiheadAttention.out_proj``), and a sparse layer has no dense ``weight``.
3. A layer whose ``weight`` or ``bias`` is **tied** (the same ``Parameter`` is held by another
   module: an output layer tied to an embedding, two layers sharing a weight) is kept, with a
   warning: converting it would untie it silently.
4. A layer with **hooks** (forward, forward-pre, backward) is kept, with a warning: the hooks
   (``weight_norm``, ``spectral_norm``, user hooks) would not follow the replacement.

A module reachable under several names (the same ``nn.Linear`` object, **shared**) is converted
once and the one sparse layer is put at every name, so the sharing is kept; it counts once
toward the total density. A converted layer keeps its ``requires_grad`` flags and train/eval mode.

What happened is reported: a ``logging`` INFO record per converted layer (logger
``set_kernels.nn.sparsify``), a ``UserWarning`` naming the layers kept for reasons 2-4, and,
with ``return_report=True``, a :class:`SparsifyReport` (converted and skipped layers, their
realised densities).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch

from .._checks import check_block_size, check_choice, check_fraction
from .masked_linear import MaskedLinear
from .sparse_linear import SparseLinear

DISTRIBUTIONS = ("uniform", "er", "erk")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertedLayer:
    """One ``nn.Linear`` that ``sparsify`` replaced."""

    name: str  # the module's first name (``named_modules`` order)
    aliases: tuple  # its other names (a shared module): the same sparse layer is at each
    kind: str  # "SparseLinear" or "MaskedLinear"
    shape: tuple  # (out_features, in_features)
    target_density: float  # what the distribution asked for this layer
    density: float  # realised: live weights / (out * in) (blocks round it)
    live: int  # live weights


@dataclass(frozen=True)
class SkippedLayer:
    """An ``nn.Linear`` (or subclass) that ``sparsify`` left as it was, and why."""

    name: str
    aliases: tuple
    type: str  # the module's class name
    reason: str  # "excluded", "subclass", "tied", "hooks"
    detail: str  # the reason in words


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did: ``converted`` and ``skipped`` layers, and the realised total density."""

    converted: list = field(default_factory=list)  # [ConvertedLayer]
    skipped: list = field(default_factory=list)  # [SkippedLayer]

    @property
    def live(self) -> int:
        return sum(c.live for c in self.converted)

    @property
    def size(self) -> int:
        return sum(c.shape[0] * c.shape[1] for c in self.converted)

    @property
    def density(self) -> float:
        """Live weights over all weights of the converted layers."""
        return self.live / self.size if self.size else 0.0

    def __str__(self) -> str:
        lines = [f"sparsify: {len(self.converted)} layer(s) converted, total density {self.density:.4f} "
                 f"({self.live} of {self.size} weights live)"]
        for c in self.converted:
            also = f" (also {', '.join(c.aliases)})" if c.aliases else ""
            lines.append(f"  {c.name}{also}: {c.shape[0]}x{c.shape[1]} -> {c.kind}, density {c.density:.4f} "
                         f"(target {c.target_density:.4f})")
        for s in self.skipped:
            lines.append(f"  {s.name}: kept as {s.type} ({s.reason}: {s.detail})")
        return "\n".join(lines)


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
             exclude=(), return_report: bool = False):
    """Replace the ``nn.Linear`` layers of ``model`` in place by sparse ones; returns ``model``.

    With ``block_size=None`` each becomes a :class:`MaskedLinear`, otherwise a :class:`SparseLinear`
    with that block size. The layers keep their largest weights (``from_dense``), with per-layer
    densities from :func:`layer_densities` so that the total density over the replaced layers is
    ``density``.

    Which layers are converted, and what happens to shared and tied weights, is the rule of the
    module docstring: exact ``nn.Linear`` only (subclasses are kept, with a warning), tied weights
    and hooked layers kept (with a warning), a shared module converted once and kept shared,
    ``exclude`` naming modules or whole sub-trees.

    Every converted layer is logged at INFO level (logger ``set_kernels.nn.sparsify``). With
    ``return_report=True`` the result is ``(model, report)``, ``report`` a :class:`SparsifyReport`.
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
    # Every name of every module, duplicates included (a module may be reachable under several).
    named = list(model.named_modules(remove_duplicate=False))
    unknown = exclude - {name for name, _ in named}
    if unknown:
        raise ValueError(f"exclude: no module named {sorted(unknown)} in the model")
    names_of: dict[int, list[str]] = {}
    modules: dict[int, torch.nn.Module] = {}
    for name, m in named:
        if isinstance(m, torch.nn.Linear):
            names_of.setdefault(id(m), []).append(name)
            modules[id(m)] = m
    holders = _parameter_holders(named)
    report = SparsifyReport()
    targets = []  # (names, module)
    for key, m in modules.items():
        names = names_of[key]
        reason = _skip_reason(m, names, exclude, holders)
        if reason is None:
            targets.append((names, m))
        else:
            report.skipped.append(SkippedLayer(names[0], tuple(names[1:]), type(m).__name__, *reason))
    unsafe = [s for s in report.skipped if s.reason != "excluded"]
    if unsafe:
        warnings.warn("sparsify kept these nn.Linear layers dense: " + "; ".join(
            f"{s.name} ({s.type}): {s.detail}" for s in unsafe) + ". Name them in exclude= to silence this "
            "warning.", UserWarning, stacklevel=2)
    if not targets:
        raise ValueError("model: expected at least one torch.nn.Linear to sparsify (after exclude)"
                         + (f"; kept: {', '.join(s.name + ' (' + s.reason + ')' for s in report.skipped)}"
                            if report.skipped else ""))
    if any("" in names for names, _ in targets):
        raise ValueError("model: the model itself is an nn.Linear; wrap it or build a sparse layer directly")
    densities = layer_densities([tuple(m.weight.shape) for _, m in targets], density, distribution)
    for (names, linear), d in zip(targets, densities):
        if block_size is None:
            new = MaskedLinear.from_dense(linear, density=d)
            live = int(new.mask.sum())
        else:
            new = SparseLinear.from_dense(linear, density=d, block_size=block_size)
            live = _live_elements(new.layout)
        _keep_flags(linear, new)
        for name in names:
            _set_submodule(model, name, new)
        out_f, in_f = linear.weight.shape
        report.converted.append(ConvertedLayer(names[0], tuple(names[1:]), type(new).__name__, (out_f, in_f), d,
                                               live / (out_f * in_f) if out_f * in_f else 0.0, live))
    if log.isEnabledFor(logging.INFO):
        for line in str(report).splitlines():
            log.info(line)
    return (model, report) if return_report else model


def _parameter_holders(named) -> dict[int, set[int]]:
    """``{id(parameter): {id(module) holding it directly}}`` over every module of the model."""
    holders: dict[int, set[int]] = {}
    for _, m in named:
        for _, p in m.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), set()).add(id(m))
    return holders


def _skip_reason(m: torch.nn.Module, names: list[str], exclude: set, holders: dict):
    """``(reason, detail)`` when ``m`` is not converted, else None (the rule of the module docstring)."""
    for name in names:
        for e in exclude:
            if name == e:
                return "excluded", "named in exclude"
            if e == "" or name.startswith(e + "."):
                return "excluded", f"inside {e!r}, named in exclude"
    if torch.nn.utils.parametrize.is_parametrized(m):
        return "subclass", "parametrized (torch.nn.utils.parametrize): its weight is computed, not stored"
    if type(m) is not torch.nn.Linear:
        return "subclass", ("a subclass of nn.Linear, whose forward or owner may rely on its dense weight; "
                            "only exact nn.Linear is converted")
    for attr in ("weight", "bias"):
        p = getattr(m, attr, None)
        if isinstance(p, torch.nn.Parameter) and len(holders.get(id(p), ())) > 1:
            return "tied", f"its {attr} is shared with another module; converting it would untie them"
    hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(m, h, None)]
    if hooks:
        return "hooks", f"it has {', '.join(h.strip('_').replace('_', ' ') for h in hooks)}, which a new module " \
                        "would not have"
    return None


def _keep_flags(old: torch.nn.Linear, new: torch.nn.Module) -> None:
    """The new layer keeps the old one's ``requires_grad`` flags and train/eval mode."""
    weight = new.values if isinstance(new, SparseLinear) else new.weight
    weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)


def _live_elements(layout) -> int:
    """Live weights of a block layout (edge blocks clipped to the matrix), without a dense mask."""
    rows, cols = layout.shape
    b = layout.block_size
    if layout.nnz_blocks == 0:
        return 0
    br, bc = layout.block_row.long(), layout.col_idx.long()
    return int(((rows - br * b).clamp(max=b) * (cols - bc * b).clamp(max=b)).sum())


def _set_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    if name == "":
        raise ValueError("model: the model itself is an nn.Linear; wrap it or build a sparse layer directly")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
