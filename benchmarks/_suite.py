"""Shared helpers of the pytest-benchmark suites: the device, the grid, cached comparison groups."""
from __future__ import annotations

import os

import pytest
import torch

from set_kernels.bench import cases, default_grid

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


def grid_for(mode: str):
    return default_grid(DEVICE.type, mode)


def cached(key, build):
    """``build()``'s result for ``key``, keeping only the latest case alive (memory)."""
    if key not in _cache:
        _cache.clear()
        _cache[key] = build()
    return _cache[key]


def run_benchmark(benchmark, group: cases.Group, impl: str, label: str):
    """Time ``group.fns[impl]`` with pytest-benchmark (pytest.skip with the reason when it could not run)."""
    if impl not in group.fns:
        reasons = [r for i, r in group.skipped if i == impl]
        pytest.skip(f"{impl}: {reasons[0] if reasons else 'not available here'}")
    fn = group.fns[impl]
    if DEVICE.type == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    benchmark.group = label
    benchmark.extra_info.update(op=group.op, pass_=group.pass_, impl=impl, kind=group.kinds[impl], dtype=group.dtype,
                                block=group.block, density=group.density, shape=group.shape,
                                flops=group.flops.get(impl), bytes=group.nbytes.get(impl))
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
