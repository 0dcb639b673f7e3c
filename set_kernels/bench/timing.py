"""Timers for ``set-kernels bench`` and the pytest-benchmark suites.

* CPU: the callables of one comparison group are run in turn, ``repeats`` times over (sparse,
  dense and baseline interleaved, so that drift on a shared machine hits all of them alike),
  after ``warmup`` untimed calls each (which also trigger Numba's JIT or load its cache).
* GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, its own warm-up),
  falling back to a CUDA-event loop when triton is missing.

Every timer returns :class:`Stats` in milliseconds: median, 20th/80th percentiles, min, max, n.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

QUANTILES = (0.2, 0.8)  # the spread reported next to every median (do_bench's usual pair)


@dataclass
class Stats:
    median_ms: float
    q20_ms: float
    q80_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_ts: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (the same rule as ``torch.quantile``)."""
    if len(sorted_ts) == 1:
        return sorted_ts[0]
    pos = q * (len(sorted_ts) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ts) - 1)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> Stats:
    """Stats of raw per-run times (ms)."""
    if not times_ms:
        raise ValueError("times_ms: expected at least one timing")
    ts = sorted(float(t) for t in times_ms)
    return Stats(median_ms=statistics.median(ts), q20_ms=_quantile(ts, QUANTILES[0]),
                 q80_ms=_quantile(ts, QUANTILES[1]), min_ms=ts[0], max_ms=ts[-1], repeats=len(ts))


def time_cpu_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """``{name: Stats}`` for CPU callables, timed round-robin ``repeats`` times after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: summarize(ts) for name, ts in times.items()}


def time_gpu(fn, *, warmup_ms: int = 25, rep_ms: int = 100) -> Stats:
    """Stats of ``fn`` on the current CUDA device: ``triton.testing.do_bench`` times (ms)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_gpu_events(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except (AssertionError, TypeError, ValueError):  # an older triton without return_mode="all"
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, QUANTILES[0], QUANTILES[1], 0.0, 1.0])
        return Stats(median_ms=q[0], q20_ms=q[1], q80_ms=q[2], min_ms=q[3], max_ms=q[4], repeats=0)
    return summarize(list(times))


def _time_gpu_events(fn, *, warmup_ms: int, rep_ms: int) -> Stats:
    """CUDA-event timing without triton: warm up for ``warmup_ms``, then time ~``rep_ms`` of runs."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_group(fns: dict, device: torch.device, *, repeats: int, warmup: int = 2, rep_ms: int = 100) -> dict:
    """``{name: Stats}`` for one comparison group on ``device`` (CPU interleaved, GPU do_bench)."""
    if device.type == "cuda":
        return {name: time_gpu(fn, rep_ms=rep_ms) for name, fn in fns.items()}
    return time_cpu_interleaved(fns, repeats=repeats, warmup=warmup)


def copy_kernel(device: torch.device, nbytes: int):
    """``(fn, moved)``: ``fn`` copies an ``nbytes`` fp32 buffer (``dst.copy_(src)``); ``moved`` = bytes
    read + written per call. The buffer should be much larger than the caches."""
    n = max(1, nbytes // 4)
    src = torch.empty(n, device=device).uniform_(-1.0, 1.0)  # random, never zeros
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * n * 4


def copy_bandwidth(device: torch.device, *, nbytes: int, repeats: int, rep_ms: int = 100) -> dict:
    """The copy ceiling: ``dst.copy_(src)`` of ``nbytes`` fp32 bytes, bytes read + written per second.

    Returns ``{"bytes": 2 * nbytes, "gbps": ..., **Stats}``: the device-memory bandwidth any
    memory-bound op is compared with.
    """
    fn, moved = copy_kernel(device, nbytes)
    stats = time_group({"copy": fn}, device, repeats=repeats, warmup=2, rep_ms=rep_ms)["copy"]
    return {"bytes": moved, "gbps": moved / (stats.median_ms * 1e-3) / 1e9, **stats.as_dict()}
