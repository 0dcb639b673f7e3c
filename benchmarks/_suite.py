"""Shared helpers of the pytest-benchmark suites: the device, the grid, cached comparison groups."""
from __future__ import annotations

import os

import pytest
import torch

from set_kernels.bench import default_grid
from set_kernels.bench.run import plan

DEVICE = torch.device(os.environ.get("SET_KERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
ROUNDS = int(os.environ.get("SET_KERNELS_BENCH_ROUNDS", "10"))
WARMUP = 1
_BACKENDS_ENV = os.environ.get("SET_KERNELS_BENCH_BACKENDS")  # comma-separated; default: every available one
REQUESTED = [b.strip() for b in _BACKENDS_ENV.split(",") if b.strip()] if _BACKENDS_ENV else None

_cache: dict = {}


def timing_requested(config) -> bool:
    """Whether this pytest run times benchmarks (``--benchmark-only`` or ``--benchmark-enable``)."""
    return bool(config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False))


def bench_mode(config) -> str:
    """``tiny`` for smoke runs, else ``$SET_KERNELS_BENCH_GRID`` (``full`` or ``quick``; default ``full``)."""
    if not timing_requested(config):
        return "tiny"
    mode = os.environ.get("SET_KERNELS_BENCH_GRID", "full")
    if mode not in ("full", "quick", "tiny"):
        raise pytest.UsageError(f"SET_KERNELS_BENCH_GRID: expected full, quick or tiny, got {mode!r}")
    return mode


def cached(key, build):
    """``build()``'s result for ``key``, keeping only the latest case alive (memory)."""
    if key not in _cache:
        _cache.clear()
        _cache[key] = build()
    return _cache[key]


def case_params(config, op: str) -> list:
    """``pytest.param(case, pass_, impl)`` for every implementation of every case ``set-kernels bench``
    runs for ``op`` on this grid (:func:`set_kernels.bench.run.plan`); ids like
    ``512x4096-float32-b32-d0.05-forward-numba`` (the pass only where a case has two)."""
    out = []
    for case in plan(default_grid(DEVICE.type, bench_mode(config)), (op,), DEVICE, REQUESTED):
        name = case.label.split(" ", 1)[1].replace(" ", "-").replace("=", "")
        for pass_, impls in case.impls.items():
            out += [pytest.param(case, pass_, impl, id="-".join([name] + [pass_] * (len(case.impls) > 1) + [impl]))
                    for impl in impls]
    return out


def run_case(benchmark, case, pass_: str, impl: str):
    """Time ``impl`` of ``case``'s ``pass_`` group (built once for all its implementations) with
    pytest-benchmark (pytest.skip with the reason when it could not run)."""
    group = cached(case.label, lambda: {g.pass_: g for g in case.groups()})[pass_]
    if impl not in group.fns:
        reasons = [r for i, r in group.skipped if i == impl]
        pytest.skip(f"{impl}: {reasons[0] if reasons else 'not available here'}")
    fn = group.fns[impl]
    if DEVICE.type == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    benchmark.group = f"{case.op} {pass_} {case.label.split(' ', 1)[1]}"
    benchmark.extra_info.update(op=group.op, pass_=group.pass_, impl=impl, kind=group.kinds[impl], dtype=group.dtype,
                                block=group.block, density=group.density, shape=group.shape,
                                flops=group.flops.get(impl), bytes=group.nbytes.get(impl))
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
