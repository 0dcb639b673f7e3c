"""Quick comparison of SparseLinear and MaskedAdam against dense torch on the machine at hand.

Timing: every measurement is the median of interleaved repeats (sparse and dense alternate, so
drift hits both), after a warm-up that also triggers Numba's JIT compilation.
E = density * T_dense / T_sparse: 1.0 means time scales exactly with density.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from . import ops
from .layout import BlockSparseLayout


def _interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _linear_rows(features: int, tokens: int, block_size: int, density: float, repeats: int, backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, features, generator=gen)
    weight = torch.randn(features, features, generator=gen) / features**0.5
    rows = []
    layout = BlockSparseLayout.random(features, features, block_size, density, generator=gen)
    values = ops.from_dense(weight, layout)
    with warnings.catch_warnings():  # torch warns that BSR support is in beta
        warnings.simplefilter("ignore")
        wbsr = ops.to_dense(values, layout).to_sparse_bsr((block_size, block_size))
    xs = x.clone().requires_grad_(True)
    vs = values.clone().requires_grad_(True)
    xd = x.clone().requires_grad_(True)
    wd = weight.clone().requires_grad_(True)
    dy = torch.randn(tokens, features, generator=gen)

    def sparse_fwd():
        with torch.no_grad():
            ops.block_sparse_linear(x, values, layout, backend=backend)

    def sparse_step():
        ops.block_sparse_linear(xs, vs, layout, backend=backend).backward(dy)

    def dense_step():
        F.linear(xd, wd).backward(dy)

    t = _interleaved_medians({
        "sparse": sparse_fwd, "dense": lambda: F.linear(x, weight), "bsr": lambda: (wbsr @ x.T).T,
        "sparse_step": sparse_step, "dense_step": dense_step,
    }, repeats)
    for op, s, d in (("forward", "sparse", "dense"), ("fwd+dX+dW", "sparse_step", "dense_step")):
        rows.append(dict(op=op, shape=f"{tokens}x{features}x{features}", block=block_size, density=density,
                         t_sparse_ms=t[s] * 1e3, t_dense_ms=t[d] * 1e3, speedup=t[d] / t[s],
                         E=density * t[d] / t[s],
                         vs_torch_bsr=(t["bsr"] / t[s]) if op == "forward" else float("nan")))
    return rows


def _adam_row(features: int, density: float, repeats: int, backend):
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(features, features, generator=gen) < density
    p1 = torch.randn(features, features, generator=gen) * mask
    p2 = p1.clone()
    g = torch.randn(features, features, generator=gen)
    m1, v1 = torch.zeros_like(p1), torch.zeros_like(p1)
    p2.grad = g.clone()
    torch_adam = torch.optim.Adam([p2], lr=1e-3, fused=True)
    step = [0]

    def sparse():
        step[0] += 1
        ops.masked_adam_([p1], [g], [m1], [v1], [mask], step=step[0], lr=1e-3, beta1=0.9, beta2=0.999,
                         eps=1e-8, backend=backend)

    fmask = mask.float()  # multiplying by a float mask is torch's fastest way to apply it

    def dense():
        p2.grad.mul_(fmask)
        torch_adam.step()
        p2.data.mul_(fmask)

    t = _interleaved_medians({"sparse": sparse, "dense": dense}, repeats)
    return dict(op="masked_adam", shape=f"{features}x{features}", block=0, density=density,
                t_sparse_ms=t["sparse"] * 1e3, t_dense_ms=t["dense"] * 1e3, speedup=t["dense"] / t["sparse"],
                E=float("nan"), vs_torch_bsr=float("nan"))


def run_quick(features: int = 4096, tokens: int = 512, block_size: int = 32, densities=(0.05, 0.1, 0.25),
              repeats: int = 7, backend=None, progress=print) -> list[dict]:
    """Rows of measurements: SparseLinear forward and training step vs dense, masked Adam vs torch."""
    rows = []
    for density in densities:
        progress(f"  block_sparse_linear density={density} ...")
        rows += _linear_rows(features, tokens, block_size, density, repeats, backend)
    progress("  masked_adam ...")
    rows.append(_adam_row(features, 0.1, repeats, backend))
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of :func:`run_quick` rows."""
    head = ("| op | shape | block | density | sparse ms | dense ms | speedup | E | vs torch BSR |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        def fmt(v):
            return "-" if v != v else f"{v:.2f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['block'] or '-'} | {r['density']} | {r['t_sparse_ms']:.2f} | "
                     f"{r['t_dense_ms']:.2f} | {r['speedup']:.2f}x | {fmt(r['E'])} | {fmt(r['vs_torch_bsr'])} |")
    return "\n".join(lines)
