"""Python overhead of one ``MaskedAdam.step()`` on many small parameters.

200 fp32 parameters of 64 elements each (so the arithmetic is negligible), every parameter with a
gradient, no masks; ``opt.step()`` timed with ``time.perf_counter`` over ``--steps`` steps after
``--warmup`` steps; prints the median and the 10th/90th percentiles per step, in microseconds, per
backend, with ``torch.optim.Adam`` (``foreach=False`` and ``foreach=True``) as references.

Usage::

    python benchmarks/adam_overhead.py [--params 200] [--numel 64] [--steps 2000] [--backends numba torch]
                                       [--stub-kernel] [--no-reference]

Run it with ``PYTHONPATH`` pointing at another checkout to compare commits.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import set_kernels as sk


def measure(make_opt, n_params: int, numel: int, steps: int, warmup: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, generator=gen)) for _ in range(n_params)]
    for p in params:
        p.grad = torch.randn(numel, generator=gen) * 1e-3
    opt = make_opt(params)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    times.sort()
    us = [t * 1e6 for t in times]
    return {"median_us": statistics.median(us), "p10_us": us[len(us) // 10], "p90_us": us[9 * len(us) // 10]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=200)
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--backends", nargs="+", default=["numba", "torch"])
    ap.add_argument("--no-reference", action="store_true", help="skip the torch.optim.Adam rows")
    ap.add_argument("--stub-kernel", action="store_true",
                    help="replace each backend's masked_adam_ by a no-op: what is left is the Python overhead "
                         "of the optimizer, the checks and the op dispatch")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.stub_kernel:
        for name in args.backends:
            sk.backends.get(name).masked_adam_ = lambda *a, **k: None
    rows = {}
    for name in args.backends:
        rows[f"MaskedAdam(backend={name!r})"] = measure(
            lambda ps, name=name: sk.optim.MaskedAdam(ps, lr=1e-3, backend=name),
            args.params, args.numel, args.steps, args.warmup)
    if not args.no_reference:
        for foreach in (False, True):
            rows[f"torch.optim.Adam(foreach={foreach})"] = measure(
                lambda ps, foreach=foreach: torch.optim.Adam(ps, lr=1e-3, foreach=foreach),
                args.params, args.numel, args.steps, args.warmup)
    print(f"# {'kernel stubbed out; ' if args.stub_kernel else ''}{args.params} fp32 params x {args.numel} elements, median of {args.steps} steps after "
          f"{args.warmup}; set_kernels from {sk.__file__}; torch {torch.__version__}; {platform.processor() or platform.machine()}")
    for label, r in rows.items():
        print(f"{label:36s} median {r['median_us']:9.1f} us   p10 {r['p10_us']:9.1f}   p90 {r['p90_us']:9.1f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
