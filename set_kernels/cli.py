"""The ``set-kernels`` command (also ``python -m set_kernels``)."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from ._info import format_info

    print(format_info())
    return 0


def _bench(args) -> int:
    import os

    import torch

    from . import bench
    from .backends import BACKENDS

    def fail(msg: str) -> int:
        print(f"set-kernels bench: {msg}", file=sys.stderr)
        return 2

    try:  # the plot needs the [bench] extra: say so now, not after the whole run
        bench.report.require_plotting()
    except ImportError as exc:
        return fail(str(exc))
    requested = list(args.backends or [])
    for name in requested:
        if name not in BACKENDS:
            return fail(f"--backends must be names from {BACKENDS}, got {name!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    try:
        ops = bench.canonical_ops(args.ops or bench.OPS)
        grid = bench.with_overrides(bench.default_grid(device.type, mode), features=args.features,
                                    tokens=args.tokens, blocks=args.block_sizes, densities=args.densities,
                                    dtypes=args.dtypes, repeats=args.repeats)
    except ValueError as exc:
        return fail(str(exc))
    out = args.out or os.path.join("benchmarks", "results", bench.slug(bench.device_name(device)))
    command = "set-kernels " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    print(f"set-kernels bench: {bench.device_name(device)} ({device.type}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), {mode} grid, ops {', '.join(ops)}", file=sys.stderr)
    doc = bench.run(device, grid, ops, backends=requested or None, mode=mode, command=command,
                    progress=not args.no_progress)
    paths = bench.write_all(doc, out, mode)
    print(bench.format_markdown(doc))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} ({doc['meta']['wall_s']:.0f} s)")
    failed = [s for s in doc["skipped"] if s["impl"] == "-"]
    for s in failed:
        print(f"set-kernels bench: case failed: {s['case']}: {s['reason']}", file=sys.stderr)
    return 1 if failed or not doc["records"] else 0


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and keep freed memory for reuse (``mallopt``
    ``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 2 GiB); True when applied.

    By default glibc serves blocks above 32 MB with a fresh ``mmap`` and unmaps them when freed, so
    every large activation or gradient tensor of a training step is new memory that the kernel
    faults in and zeroes page by page: at hidden width 1,000,000 (160 MB activations) about 600,000
    page faults a step, 48,000 with this setting. It changes the whole process's allocator, so
    only ``set-kernels train`` (a process of its own) applies it; the library never does. No-op
    where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _train(args, parser) -> int:
    from . import train

    try:
        config = train.TrainConfig.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2, as for a value argparse rejects itself
    keep_freed_memory()
    try:
        train.run(config)
    except (FileNotFoundError, ValueError) as exc:  # no data files, or unreadable ones
        print(f"set-kernels train: {exc}", file=sys.stderr)
        return 2
    return 0


def _selftest(args) -> int:
    from . import selftest

    return selftest.main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="set-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available on this machine, and why not").set_defaults(fn=_info)
    bench = sub.add_parser("bench", help="time SparseLinear ops, MaskedAdam and a SET-MLP step against dense torch",
                           description="Times every op on every available backend against dense torch (and "
                                       "torch's BSR matmul); writes <mode>.json, <mode>.md and <mode>.png to --out "
                                       "and prints the table.")
    bench.add_argument("--quick", action="store_true", help="the short grid (the README's main job)")
    bench.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device-name>/)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    bench.add_argument("--ops", nargs="+", default=None, metavar="OP",
                       help="block_sparse_linear, masked_adam_, set_mlp_step (default: all)")
    bench.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                       help="backends to time (default: every available one but the plain-torch reference; "
                            "triton only on GPU unless named)")
    bench.add_argument("--features", type=int, default=None, help="override: in = out features of the linear grid")
    bench.add_argument("--tokens", type=int, default=None, help="override: rows of x in the linear grid")
    bench.add_argument("--block-sizes", "--block-size", dest="block_sizes", type=int, nargs="+", default=None,
                       choices=(1, 16, 32, 64, 128), help="override: block sizes (1: element sparsity)")
    bench.add_argument("--densities", type=float, nargs="+", default=None, help="override: densities")
    bench.add_argument("--dtypes", nargs="+", default=None, help="override: dtypes (float32, bfloat16, ...)")
    bench.add_argument("--repeats", type=int, default=None, help="override: CPU repeats per case")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CI: toy sizes, same code path
    bench.set_defaults(fn=_bench)
    train = sub.add_parser("train", help="train the SET-MLP on Fashion-MNIST (or synthetic data)")
    from .train import add_arguments as _train_arguments  # light: argparse only, no torch work

    _train_arguments(train)
    train.set_defaults(fn=lambda args: _train(args, train))
    selftest = sub.add_parser("selftest", help="check every available backend here against a float64 reference",
                              description="Runs every op of every available backend on this machine (each dtype "
                                          "and block size it supports) against a float64 reference, prints a "
                                          "table and exits non-zero on any failure.")
    from .selftest import add_arguments as _selftest_arguments

    _selftest_arguments(selftest)
    selftest.set_defaults(fn=_selftest)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
