"""``set-kernels train``: the SET-MLP experiment (placeholder until the SET issue lands)."""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    """Add the fixed ``set-kernels train`` flags to ``parser``."""
    parser.add_argument("--data", choices=("fashion-mnist", "synthetic"), default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--test-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("set", "static", "dense"), default="set")
    parser.add_argument("--layer", choices=("masked", "block"), default="masked")
    parser.add_argument("--block-size", type=int, default=16, choices=(16, 32, 64, 128))
    parser.add_argument("--epsilon", type=float, default=13.0)
    parser.add_argument("--zeta", type=float, default=0.3)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--json", default=None)


def main(args) -> int:
    print("set-kernels train: not implemented yet", file=sys.stderr)
    return 2
