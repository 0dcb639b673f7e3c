"""pytest-benchmark suite: block_sparse_linear (forward, forward+backward) and masked_adam_ on every
available backend, against dense torch and torch's BSR matmul, over the ``set-kernels bench`` grid.

    pytest benchmarks --benchmark-only                                   # full grid
    SET_KERNELS_BENCH_GRID=quick pytest benchmarks --benchmark-only      # the short grid
    pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-sort=name
    pytest benchmarks                                                    # smoke: toy sizes, no timing

Each pytest-benchmark group is one case (shape, dtype, block, density, pass); its members are
the backends, ``dense`` (``F.linear`` / autograd through it; ``torch.optim.Adam(fused=True)``
plus the two mask multiplies) and ``torch_bsr`` (``to_sparse_bsr`` matmul, forward only). The
cases and callables are those of ``set-kernels bench`` (:mod:`set_kernels.bench.cases`), so new
backends are covered as soon as :mod:`set_kernels.backends` lists them. Environment:
``SET_KERNELS_BENCH_DEVICE`` (cpu/cuda), ``SET_KERNELS_BENCH_ROUNDS`` (default 10),
``SET_KERNELS_BENCH_BACKENDS`` (comma-separated names). On GPU each call is followed by a
synchronize (``set-kernels bench`` uses ``triton.testing.do_bench`` instead).
"""
from __future__ import annotations

import pytest

from set_kernels.bench import cases
from set_kernels.bench.grid import DTYPES

from _suite import DEVICE, bench_mode, REQUESTED, cached, grid_for, run_benchmark


def _linear_params(mode):
    grid = grid_for(mode)
    out = []
    for tokens, features, dname in grid.linear:
        chosen = {p: cases.select_backends(REQUESTED, [p], DEVICE, DTYPES[dname])[0]
                  for p in ("forward", "forward_backward")}
        for block in grid.blocks:
            for density in grid.densities:
                for pass_ in ("forward", "forward_backward"):
                    impls = chosen[pass_] + ["dense"] + (["torch_bsr"] if pass_ == "forward" else [])
                    for impl in impls:
                        out.append(pytest.param((tokens, features, dname, block, density), pass_, impl, chosen,
                                                id=f"{tokens}x{features}-{dname}-b{block}-d{density}-{pass_}-{impl}"))
    return out


def _adam_params(mode):
    grid = grid_for(mode)
    out = []
    for rows, cols, dname in grid.adam:
        names = cases.select_backends(REQUESTED, ["step"], DEVICE, DTYPES[dname])[0]
        for density in grid.adam_densities:
            for impl in names + ["dense"]:
                out.append(pytest.param((rows, cols, dname, grid.adam_block, density), impl, names,
                                        id=f"{rows}x{cols}-{dname}-b{grid.adam_block}-d{density}-{impl}"))
    return out


def pytest_generate_tests(metafunc):
    mode = bench_mode(metafunc.config)
    if metafunc.function.__name__ == "test_block_sparse_linear":
        metafunc.parametrize("case,pass_,impl,chosen", _linear_params(mode))
    elif metafunc.function.__name__ == "test_masked_adam":
        metafunc.parametrize("case,impl,names", _adam_params(mode))


def test_block_sparse_linear(benchmark, case, pass_, impl, chosen):
    tokens, features, dname, block, density = case
    groups = cached(("linear", case), lambda: {
        g.pass_: g for g in cases.linear_groups(tokens, features, DTYPES[dname], block, density, DEVICE, chosen)})
    label = f"block_sparse_linear {pass_} {tokens}x{features}->{features} {dname} block {block} density {density}"
    run_benchmark(benchmark, groups[pass_], impl, label)


def test_masked_adam(benchmark, case, impl, names):
    rows, cols, dname, block, density = case
    group = cached(("adam", case), lambda: cases.adam_group(rows, cols, DTYPES[dname], block, density, DEVICE, names))
    run_benchmark(benchmark, group, impl, f"masked_adam_ {rows}x{cols} {dname} block-mask {block} density {density}")
