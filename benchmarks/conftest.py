"""pytest setup for the benchmarks: import the package from this checkout, and keep plain runs fast.

``pytest benchmarks --benchmark-only`` times the grid (``$SET_KERNELS_BENCH_GRID``: ``full``, the
default, or ``quick``). Without ``--benchmark-only`` (or ``--benchmark-enable``) the benchmarks are
disabled and the grid is the toy ``tiny`` one, so ``pytest benchmarks`` is a smoke test of every
case (each callable runs once) that finishes in seconds.

(set_kernels.backends.numba caches its compiled kernels per user, under ~/.cache/set_kernels/numba.)
"""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)


from _suite import timing_requested  # noqa: E402  (benchmarks/ is on sys.path: pytest's prepend mode)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark reads its options: benchmarks are off unless asked for.
    if not timing_requested(config) and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True
