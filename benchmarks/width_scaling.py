"""Width scaling of the SET-MLP (never run in CI): seconds per epoch, peak memory, accuracy.

    .venv/bin/python benchmarks/width_scaling.py                       # every width, 2 threads
    .venv/bin/python benchmarks/width_scaling.py --widths 1000,4000 --epochs 3

For each hidden width W (three hidden layers, 784-W-W-W-10, epsilon = 13, 2,000 Fashion-MNIST
training and 1,000 test images, batch 40, SGD), runs ``set-kernels train --mode set`` with
``--layer sparse`` (element sparsity stored sparse), and where they fit ``--layer block
--block-size 16``, ``--layer masked`` and ``--mode dense``, each in its own process, one after the
other (so that the ratios compare runs of one session on the same machine). Reported per run:
the median training time per epoch (steps plus the SET update, without evaluation), the peak
resident memory of the process, and the test accuracy after the last epoch. Results go to
``--out`` (default ``benchmarks/results/<cpu>/width_scaling/``): a JSON per run, ``summary.md``
and ``scaling.png``. Existing JSON files are kept, so the script resumes.

The speed of the 2-core test machine drifts over time (up to 2x for tens of seconds), so ratios
between these processes are only indicative: ``epoch_ratio.py`` measures the sparse / block /
dense epoch ratios with the configurations interleaved in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (1000, 4000, 20000, 100000, 1000000)
# Largest width each configuration is run at: dense and masked hold W x W tensors (the masked
# layer also a W x W mask and dense gradient); beyond these they would not fit 24 GB or would take
# hours per epoch on 2 cores.
CONFIGS = {  # name: (flags, largest width)
    "sparse": (["--mode", "set", "--layer", "sparse"], None),
    "block16": (["--mode", "set", "--layer", "block", "--block-size", "16"], 20000),
    "masked": (["--mode", "set", "--layer", "masked"], 4000),
    "dense": (["--mode", "dense"], 4000),
}


def _device_name() -> str:
    try:
        import torch
        from set_kernels.bench.run import device_name, slug

        return slug(device_name(torch.device("cpu")))
    except Exception:  # the folder name only
        return "cpu"


def run_one(name: str, width: int, args, out_dir: str) -> dict | None:
    path = os.path.join(out_dir, f"{name}_w{width}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    flags, limit = CONFIGS[name]
    if limit is not None and width > limit:
        return None
    epochs = args.epochs if width < 100_000 else max(1, min(args.epochs, args.epochs_large))
    cmd = [sys.executable, "-m", "set_kernels", "train", "--data", "fashion-mnist", "--hidden", f"{width},{width},{width}",
           "--epochs", str(epochs), "--train-samples", str(args.train_samples), "--test-samples",
           str(args.test_samples), "--threads", str(args.threads), "--seed", "0", "--json", path + ".part", *flags]
    t0 = time.time()
    with open(os.path.join(out_dir, f"{name}_w{width}.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"{name} width {width}: rc={rc} in {time.time() - t0:.0f}s", flush=True)
    if rc != 0:
        return None
    os.replace(path + ".part", path)
    with open(path) as f:
        return json.load(f)


def summarise(results: dict, out_dir: str, args) -> str:
    lines = ["# SET-MLP width scaling", "",
             f"784-W-W-W-10, epsilon 13, {args.train_samples} train / {args.test_samples} test Fashion-MNIST images, "
             f"batch 40, SGD; {args.threads} threads, one run at a time. s/epoch: median over the epochs of the "
             "training steps plus the SET update, without evaluation. Peak RSS: the whole process.", "",
             "| width | layer | live weights | epochs | s/epoch | speedup over dense | peak RSS (MB) | test acc |",
             "|---|---|---|---|---|---|---|---|"]
    for width in sorted({w for (_, w) in results}):
        dense = results.get(("dense", width))
        dense_t = statistics.median(h["time_s"] for h in dense["history"]) if dense else None
        for name in CONFIGS:
            r = results.get((name, width))
            if r is None:
                continue
            t = statistics.median(h["time_s"] for h in r["history"])
            ratio = f"{dense_t / t:.1f}x" if dense_t and name != "dense" else "–"
            rss = r["final"].get("peak_rss_mb")
            lines.append(f"| {width:,} | {name} | {r['final']['live_weights']:,} | {len(r['history'])} | {t:.3f} | "
                         f"{ratio} | {rss:.0f} | {r['final']['test_acc']:.4f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    _plot(results, os.path.join(out_dir, "scaling.png"))
    return text


def _plot(results: dict, path: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(9, 4))
    ax_t, ax_m = fig.subplots(1, 2)
    for name in CONFIGS:
        pts = sorted((w, r) for (n, w), r in results.items() if n == name)
        if not pts:
            continue
        ws = [w for w, _ in pts]
        ax_t.plot(ws, [statistics.median(h["time_s"] for h in r["history"]) for _, r in pts], "o-", label=name)
        ax_m.plot(ws, [r["final"].get("peak_rss_mb") or 0 for _, r in pts], "o-", label=name)
    for ax, label in ((ax_t, "seconds per epoch"), (ax_m, "peak resident memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("hidden width")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("SET-MLP 784-W-W-W-10, epsilon 13, 2,000 images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--epochs-large", type=int, default=2, help="epochs at widths >= 100,000")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out_dir = os.path.abspath(args.out or os.path.join(ROOT, "benchmarks", "results", _device_name(), "width_scaling"))
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for width in (int(w) for w in args.widths.split(",")):
        for name in args.configs.split(","):
            r = run_one(name, width, args, out_dir)
            if r is not None:
                results[(name, width)] = r
        print(summarise(results, out_dir, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
