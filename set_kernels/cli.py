"""The ``set-kernels`` command (also ``python -m set_kernels``)."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from ._info import format_info

    print(format_info())
    return 0


def _bench(args) -> int:
    import torch

    from . import bench
    from .backends import BACKENDS

    if args.backend not in (None, "auto") + BACKENDS:
        print(f"set-kernels bench: --backend must be one of {('auto',) + BACKENDS}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    size = 4096 if args.quick else args.features
    print(f"set-kernels bench: CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.tokens} tokens, fp32, block {args.block_size}")
    rows = bench.run_quick(features=size, tokens=args.tokens, block_size=args.block_size,
                           repeats=5 if args.quick else 15, backend=args.backend)
    print(bench.format_table(rows))
    print("E = density * T_dense / T_sparse (1.0 = time scales with density); speedup = T_dense / T_sparse; "
          "masked_adam's dense baseline is torch.optim.Adam(fused=True) plus two mask multiplies.")
    return 0


def _train(args) -> int:
    from . import train

    return train.main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="set-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available on this machine, and why not").set_defaults(fn=_info)
    bench = sub.add_parser("bench", help="compare SparseLinear and MaskedAdam with dense torch (CPU)")
    bench.add_argument("--quick", action="store_true", help="a short run (4096x4096 weight, 5 repeats)")
    bench.add_argument("--features", type=int, default=4096, help="in = out features (without --quick)")
    bench.add_argument("--tokens", type=int, default=512)
    bench.add_argument("--block-size", type=int, default=32, choices=(16, 32, 64, 128))
    bench.add_argument("--backend", default=None, help="auto, numba or torch (default: auto)")
    bench.set_defaults(fn=_bench)
    train = sub.add_parser("train", help="train the SET-MLP on Fashion-MNIST (or synthetic data)")
    from .train import add_arguments as _train_arguments  # light: argparse only, no torch work

    _train_arguments(train)
    train.set_defaults(fn=_train)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
