"""pytest-benchmark suite: one SET-MLP training step (784-1000-1000-1000-10, block SparseLinear
layers at densities 0.03 and 0.1) against the dense MLP, on the device at hand.

    pytest benchmarks/test_bench_set_mlp.py --benchmark-only

Members of each group: ``<backend>`` (forward, cross-entropy, backward, ``MaskedAdam.step()``),
``<backend>/set_update`` (one SET topology update; divide by the interval, 100 by default, for
its amortised share of a step, as ``set-kernels bench`` does), and ``dense``
(``nn.Linear`` layers with ``torch.optim.Adam(fused=True)``).
"""
from __future__ import annotations

import pytest

from set_kernels.bench import cases, mlp
from set_kernels.bench.grid import DTYPES

from _suite import DEVICE, bench_mode, REQUESTED, cached, grid_for, run_benchmark


def pytest_generate_tests(metafunc):
    mode = bench_mode(metafunc.config)
    grid = grid_for(mode)
    names = cases.select_backends(REQUESTED, ["train_step"], DEVICE, DTYPES[grid.mlp_dtype])[0]
    params = [pytest.param(mode, density, impl, names, id=f"d{density}-{impl}")
              for density in grid.mlp_densities
              for impl in [x for n in names for x in (n, f"{n}/set_update")] + ["dense"]]
    metafunc.parametrize("mode,density,impl,names", params)


def test_set_mlp_step(benchmark, mode, density, impl, names):
    grid = grid_for(mode)
    group = cached(("mlp", mode, density), lambda: mlp.mlp_group(grid, density, DEVICE, names))
    layers = "-".join(map(str, grid.mlp_layers))
    run_benchmark(benchmark, group, impl, f"set_mlp_step {layers} batch {grid.mlp_batch} density {density}")
