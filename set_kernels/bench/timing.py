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


COPY_METHOD = ("in-place streams over fp32 buffers as large as the op's, reading every byte once and writing back "
               "as many as the op writes (a += b, c = -c); bytes read + written, fastest run")


@dataclass
class CopyCeiling:
    """The copy reference of a memory-bound op: ``fn`` moves what the op moves, with no arithmetic.

    The op reads ``footprint`` bytes (all of its buffers, once) and writes ``written`` of them
    back in place (masked Adam: reads the mask, p, g, m, v; writes p, m, v). The reference does
    the same with plain torch streams over fp32 buffers, ``a += b`` and ``c = -c``: ``a`` and ``b``
    of ``footprint - written`` bytes each, ``c`` of the rest, so that

    * **size:** its buffers total ``footprint`` bytes, as the op's do, and sit at the same level of
      the memory hierarchy (both in cache, or both streaming from memory);
    * **bytes:** it reads ``footprint`` and writes ``written`` bytes, the op's own mix, and is
      credited with exactly those. Every store goes to a line it has just read, so no
      write-allocate traffic is left uncounted (``dst.copy_(src)`` on a CPU first reads every
      line of ``dst`` it stores to, 1.5x the bytes a read + write count credits it with; that
      made the ceiling too low and let masked Adam report 159 % of it);
    * **cache state:** it is timed in the op's own group, the same way (CPU: interleaved with the
      op, after the same warm-up; GPU: ``do_bench``, L2 flushed before every run).

    :meth:`gbps` takes the fastest run: a ceiling is the best the memory system did. The op,
    reported at its median, can then exceed it only by really moving its bytes faster.
    """

    fn: object
    footprint: int  # bytes of the buffers, all read once per call
    written: int  # bytes written back per call
    moved: int  # bytes credited per call: footprint + written

    def gbps(self, stats: Stats) -> float:
        """Bytes moved per second / 1e9, at the fastest run."""
        return self.moved / (stats.min_ms * 1e-3) / 1e9

    def record(self, stats: Stats) -> dict:
        """The JSON form: ``{"bytes", "footprint_bytes", "written_bytes", "gbps", "method", **Stats}``."""
        return {"bytes": self.moved, "footprint_bytes": self.footprint, "written_bytes": self.written,
                "gbps": self.gbps(stats), "method": COPY_METHOD, **stats.as_dict()}


def copy_ceiling(device: torch.device, footprint: int, written: int | None = None) -> CopyCeiling:
    """The copy reference of an op that reads ``footprint`` bytes and writes ``written`` of them back
    in place (default: half; see :class:`CopyCeiling`). Needs ``footprint / 2 <= written <= footprint``."""
    footprint = int(footprint)
    written = footprint // 2 if written is None else int(written)
    read_only = footprint - written
    if not 0 <= read_only <= written:
        raise ValueError(f"written: expected between footprint / 2 and footprint ({footprint}), got {written}")
    n_ab, n_c = read_only // 4, (written - read_only) // 4
    if n_ab + n_c == 0:
        n_ab = 1

    def buffer(n, scale):
        return torch.empty(n, device=device).uniform_(-scale, scale)  # random, never zeros

    a, b, c = buffer(n_ab, 1.0), buffer(n_ab, 1e-30), buffer(n_c, 1.0)  # tiny b: a keeps its size

    def fn():
        if n_ab:
            a.add_(b)
        if n_c:
            c.neg_()
    return CopyCeiling(fn=fn, footprint=4 * (2 * n_ab + n_c), written=4 * (n_ab + n_c), moved=4 * (3 * n_ab + 2 * n_c))


def copy_bandwidth(device: torch.device, *, footprint: int, written: int | None = None, repeats: int,
                   warmup: int = 2, rep_ms: int = 100) -> dict:
    """The copy ceiling on its own: :func:`copy_ceiling` timed; its JSON record (:meth:`CopyCeiling.record`)."""
    ceiling = copy_ceiling(device, footprint, written)
    stats = time_group({"copy": ceiling.fn}, device, repeats=repeats, warmup=warmup, rep_ms=rep_ms)["copy"]
    return ceiling.record(stats)
