"""SET-MLP epoch time against dense, the configurations interleaved in one process (never in CI).

    .venv/bin/python benchmarks/epoch_ratio.py --width 1000 --rounds 9
    .venv/bin/python benchmarks/epoch_ratio.py --width 4000 --rounds 5 --configs sparse,block16,dense

Why interleaved: on the 2-core machine of ``benchmarks/results/amd-epyc`` the speed of the whole
machine changes over time, by up to 2x, for tens of seconds at a time, within one process and
for every configuration alike (``step_overhead.py``-style loops print runs of ~1.95 ms steps,
then runs of 3.3-4.1 ms, then ~2.0 ms again). A ratio between two configurations run one after
the other, each in its own process (``width_scaling.py``), then depends on when each ran. Here
every configuration is built once, in one process, and each round trains **one epoch of each
configuration in turn** (the order rotates every round), so that each round's ratio compares
epochs run seconds apart. Reported: the median epoch time of each configuration, and the median
over rounds of each round's ``dense / config`` ratio.

An epoch is exactly what ``set-kernels train`` times (``set_kernels.train._epoch``): the training
steps plus the SET topology update at the end of the epoch, without evaluation; the models,
optimizers, data (``--train-samples`` Fashion-MNIST images, batch 40) and SET settings are those
of ``set-kernels train`` with ``--hidden W,W,W`` and the configuration's flags, and so is the
process's allocator setting (:func:`set_kernels.cli.keep_freed_memory`). The first round
(compilation, first touch of memory) is not counted. Results: ``--out`` (default
``benchmarks/results/<cpu>/epoch_ratio/``), ``w<W>.json`` and ``w<W>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from width_scaling import ROOT, _device_name  # this folder is sys.path[0] when run as a script

CONFIGS = {  # name: TrainConfig fields
    "sparse": dict(mode="set", layer="sparse"),
    "block16": dict(mode="set", layer="block", block_size=16),
    "masked": dict(mode="set", layer="masked"),
    "dense": dict(mode="dense"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--configs", default="sparse,block16,dense")
    p.add_argument("--rounds", type=int, default=9, help="counted rounds (one more is run first, as warm-up)")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    names = args.configs.split(",")
    if "dense" not in names or any(n not in CONFIGS for n in names):
        p.error(f"--configs: a comma-separated subset of {list(CONFIGS)} that includes dense")

    import torch

    from set_kernels import cli, train

    cli.keep_freed_memory()  # the allocator setting of a `set-kernels train` process
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    W = args.width
    rounds = args.rounds + 1
    runs = {}
    for name in names:
        # epochs > rounds: SET updates at the end of every epoch this script runs
        config = train.TrainConfig(data="fashion-mnist", hidden=(W, W, W), epochs=rounds + 1,
                                   train_samples=args.train_samples, test_samples=1, seed=0, **CONFIGS[name])
        _, _, (x_train, y_train, _, _) = train._load_data(config)
        sizes = train.model_sizes(config.hidden)
        steps = -(-len(x_train) // config.batch)
        model, opt, evo, _ = train._build(config, sizes, steps)
        shuffle = torch.Generator().manual_seed(config.seed + 1)
        runs[name] = (model, opt, evo, x_train, y_train, config.batch, shuffle)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            model, opt, evo, x_train, y_train, batch, shuffle = runs[name]
            perm = torch.randperm(len(x_train), generator=shuffle)
            row = train._epoch(model, opt, evo, x_train, y_train, batch, perm, lambda: 0.0)
            if r > 0:
                times[name].append(row["time_s"])
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names if r > 0), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    ratio = {n: statistics.median(d / t for d, t in zip(times["dense"], times[n])) for n in names if n != "dense"}
    result = {"width": W, "train_samples": args.train_samples, "batch": 40, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rounds": args.rounds, "epoch_s": times, "median_epoch_s": med,
              "median_round_ratio_dense_over": ratio}
    out_dir = os.path.abspath(args.out or os.path.join(ROOT, "benchmarks", "results", _device_name(), "epoch_ratio"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"w{W}.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# SET-MLP epoch, width {W}, configurations interleaved", "",
             f"784-{W}-{W}-{W}-10, {args.train_samples} Fashion-MNIST images, batch 40, SGD, fp32, "
             f"{torch.get_num_threads()} threads; an epoch is the training steps plus the SET update, without "
             f"evaluation; {args.rounds} rounds of one epoch per configuration (after one warm-up round). "
             "Command: `python benchmarks/epoch_ratio.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`.",
             "", "| layer | median s/epoch | min | max | dense / layer (median of the rounds' ratios) |",
             "|---|---|---|---|---|"]
    for n in names:
        r = f"{ratio[n]:.2f}x" if n in ratio else "–"
        lines.append(f"| {n} | {med[n]:.3f} | {min(times[n]):.3f} | {max(times[n]):.3f} | {r} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"w{W}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
