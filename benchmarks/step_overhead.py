"""Time of one training step of the element-sparse SET-MLP against the dense MLP (CPU).

Builds both models with :func:`set_kernels.train.build_model` (``784-W-W-W-10``, ReLU, dropout
0.2, ``SparseLinear(block_size=1)`` at epsilon 13 for the sparse one), SGD with momentum 0.9 and
weight decay 2e-4, batch 40 of random data, ``torch.set_flush_denormal(True)``. A step is
``zero_grad``, forward, ``cross_entropy``, backward, ``step``. Each round times ``--steps``
consecutive steps with ``time.perf_counter``; the models take turns round by round, and the
median over the rounds of the mean step time is printed, in ms, with the sparse/dense ratio.

``--stub-kernels`` replaces the numba element-sparse kernels by no-ops (outputs are left
uninitialised; they are filled with zeros once so that no NaN or denormal slows what follows):
what is left is the Python, autograd, dropout and optimizer overhead of the sparse step.
``--dropout`` also times the numba dropout alone on a ``(batch, W)`` activation.

Usage::

    python benchmarks/step_overhead.py [--width 1000] [--batch 40] [--threads 2] [--rounds 15]
                                       [--steps 50] [--stub-kernels] [--dropout]

Results vary between processes (memory placement): run it a few times. Run it with
``PYTHONPATH`` pointing at another checkout to compare commits.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from set_kernels.train import build_model


def _stub_kernels() -> None:
    from set_kernels.backends import numba as nb

    spmm = nb._load()[3]

    def noop(*args):
        return None

    for name in ("linear_forward", "linear_grad_input", "linear_backward", "linear_grad_weight"):
        setattr(spmm, name, noop)


def _make(mode: str, width: int, batch: int, seed: int = 0):
    model = build_model(mode, "sparse", 1, 13.0, seed, sizes=(784, width, width, width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return model, step


def _round(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--stub-kernels", action="store_true", help="no-op numba SpMM kernels: the overhead alone")
    ap.add_argument("--dropout", action="store_true", help="also time the numba dropout alone")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.stub_kernels:
        _stub_kernels()
    models = {mode: _make(mode, args.width, args.batch) for mode in ("set", "dense")}
    if args.stub_kernels:  # the stubs leave outputs uninitialised: start from zeros, not garbage
        with torch.no_grad():
            for p in models["set"][0].parameters():
                p.zero_()
    for _, step in models.values():  # compile, warm the caches and the allocator
        _round(step, 20)
    times = {mode: [] for mode in models}
    for _ in range(args.rounds):
        for mode, (_, step) in models.items():
            times[mode].append(_round(step, args.steps))
    med = {mode: statistics.median(t) for mode, t in times.items()}
    label = "sparse (kernels stubbed)" if args.stub_kernels else "sparse"
    print(f"width {args.width}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps")
    print(f"{label:>24}: {med['set']:.3f} ms/step  (min {min(times['set']):.3f})")
    print(f"{'dense':>24}: {med['dense']:.3f} ms/step  (min {min(times['dense']):.3f})")
    print(f"{'dense / sparse':>24}: {med['dense'] / med['set']:.2f}x")
    if args.dropout:
        from set_kernels.nn.dropout import Dropout

        d = Dropout(0.2)
        x = torch.randn(args.batch, args.width)
        for _ in range(200):
            d(x)
        ts = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(200):
                d(x)
            ts.append((time.perf_counter() - t0) / 200 * 1e6)
        print(f"{'dropout forward':>24}: {statistics.median(ts):.1f} us  ({args.batch} x {args.width})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
