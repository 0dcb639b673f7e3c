"""The SET-MLP experiment of issue 5 (never run in CI): every configuration x every seed.

    .venv/bin/python benchmarks/set_mlp_experiment.py                      # full: 400 epochs, 5 seeds
    .venv/bin/python benchmarks/set_mlp_experiment.py --epochs 100 --seeds 3 --tag reduced

Each run is ``set-kernels train`` in its own process with one torch / numba / OpenMP thread,
``--jobs`` runs at a time, on a frozen copy of the package (so edits to the working tree during
the experiment do not leak into it). JSON per run goes to ``--out`` (default
benchmarks/results/cpu/set_mlp/<tag>/); ``summary.md`` there is rewritten after every run: mean
+- sd (sample sd, n-1) of the final test accuracy, best test accuracy, train time per epoch, the
accuracy at chosen epochs and paired differences against SET; ``curves.png`` plots the test accuracy.
Existing JSON files are kept and not rerun, so the script can be resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = [  # name, extra flags
    ("set_masked", ["--mode", "set", "--layer", "masked"]),
    ("static_masked", ["--mode", "static", "--layer", "masked"]),
    ("dense_lr0.001", ["--mode", "dense"]),
    ("dense_lr0.01", ["--mode", "dense", "--lr", "0.01"]),
    ("set_block16", ["--mode", "set", "--layer", "block", "--block-size", "16"]),
    ("set_masked_adam", ["--mode", "set", "--layer", "masked", "--optimizer", "adam"]),
    # SET with the paper's sign-split pruning (the rows above prune by magnitude)
    ("set_masked_signsplit", ["--mode", "set", "--layer", "masked", "--prune", "set"]),
    # element sparsity stored sparse (SparseLinear, block_size=1): the computation of the masked rows
    ("set_sparse", ["--mode", "set", "--layer", "sparse"]),
    ("static_sparse", ["--mode", "static", "--layer", "sparse"]),
]


def _load_runs(out_dir: str, args) -> dict[str, dict[int, dict]]:
    """``{configuration: {seed: run JSON}}`` of the finished runs in ``out_dir``."""
    runs: dict[str, dict[int, dict]] = {}
    for name, _ in CONFIGS:
        for seed in range(args.seeds):
            path = os.path.join(out_dir, f"{name}_seed{seed}.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs.setdefault(name, {})[seed] = json.load(f)
    return runs


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(out_dir: str, args) -> str:
    """Rewrite ``summary.md`` (and ``curves.png`` when matplotlib is there) from the finished runs.

    Tables: final / last-10-epoch / best test accuracy and train s/epoch per configuration; the mean
    test accuracy at chosen epochs; and, against ``set_masked``, the paired difference of the final
    test accuracy over the seeds both configurations finished (same seed = same data order and, for
    the sparse configurations, the same initial topology), with ``t = mean / (sd / sqrt(n))``.
    """
    runs = _load_runs(out_dir, args)
    lines = [f"# SET-MLP on Fashion-MNIST ({args.tag})", "",
             f"Protocol: {args.train_samples} train / {args.test_samples} test samples, {args.epochs} epochs, "
             f"seeds 0..{args.seeds - 1}; one thread per run, {args.jobs} runs in parallel on a shared 2-core CPU "
             "(times are indicative only: other jobs shared the machine).", "",
             "| configuration | runs | final test acc (mean ± sd) | last-10-epoch test acc (mean ± sd) | "
             "best test acc (mean) | train s/epoch (mean) |",
             "|---|---|---|---|---|---|"]
    for name, _ in CONFIGS:
        done = runs.get(name, {})
        if not done:
            lines.append(f"| {name} | 0 | – | – | – | – |")
            continue
        finals = [r["final"]["test_acc"] for r in done.values()]
        lasts = [statistics.mean(h["test_acc"] for h in r["history"][-10:]) for r in done.values()]
        m, sd = _mean_sd(finals)
        ml, sdl = _mean_sd(lasts)
        lines.append(f"| {name} | {len(done)} | {m:.4f} ± {sd:.4f} | {ml:.4f} ± {sdl:.4f} | "
                     f"{statistics.mean(r['final']['best_test_acc'] for r in done.values()):.4f} | "
                     f"{statistics.mean(r['final']['time_per_epoch_s'] for r in done.values()):.3f} |")

    marks = sorted({e for e in (1, 5, 10, 25, 50, 100, 200, 300, 400) if e <= args.epochs} | {args.epochs})
    lines += ["", "Mean test accuracy over the finished seeds at chosen epochs:", "",
              "| configuration | " + " | ".join(str(e) for e in marks) + " |",
              "|---|" + "---|" * len(marks)]
    for name, done in runs.items():
        cells = []
        for e in marks:
            accs = [r["history"][e - 1]["test_acc"] for r in done.values() if len(r["history"]) >= e]
            cells.append(f"{statistics.mean(accs):.4f}" if accs else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    base_name = getattr(args, "base", "set_masked")
    base = runs.get(base_name, {})
    if base:
        lines += ["", f"Final test accuracy minus `{base_name}`'s, paired by seed (positive: better than SET):", "",
                  "| configuration | paired seeds | difference (mean ± sd) | t |", "|---|---|---|---|"]
        for name, done in runs.items():
            if name == base_name:
                continue
            common = sorted(set(done) & set(base))
            diffs = [done[s]["final"]["test_acc"] - base[s]["final"]["test_acc"] for s in common]
            if not diffs:
                continue
            m, sd = _mean_sd(diffs)
            t = m / (sd / len(diffs) ** 0.5) if len(diffs) > 1 and sd > 0 else float("nan")
            lines.append(f"| {name} | {len(diffs)} | {m:+.4f} ± {sd:.4f} | {t:+.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    _plot(runs, os.path.join(out_dir, "curves.png"), args)
    return text


def _plot(runs: dict[str, dict[int, dict]], path: str, args) -> None:
    """Mean test accuracy per epoch (5-epoch running mean) of every configuration."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, safe from the worker threads
    except ImportError:
        return
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for name, done in runs.items():
        n = min(len(r["history"]) for r in done.values())
        mean = [statistics.mean(r["history"][e]["test_acc"] for r in done.values()) for e in range(n)]
        smooth = [statistics.mean(mean[max(0, e - 4):e + 1]) for e in range(n)]
        ax.plot(range(1, n + 1), smooth, label=f"{name} ({len(done)} seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (mean over seeds, 5-epoch running mean)")
    lows = [line.get_ydata()[min(len(line.get_ydata()) - 1, 4)] for line in ax.get_lines()]
    ax.set_ylim(max(0.5, min(lows, default=0.75) - 0.02) if lows else 0.75, None)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"SET-MLP, Fashion-MNIST {args.train_samples}/{args.test_samples} ({args.tag})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--tag", default="full")
    p.add_argument("--out", default=None)
    p.add_argument("--init", default=None, choices=("sparse-fan-in", "dense-fan-in"),
                   help="passed to set-kernels train (default: its own default, sparse-fan-in)")
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--base", default="set_masked", help="configuration the paired differences are taken against")
    p.add_argument("--summary-only", action="store_true", help="rewrite summary.md from the JSON files, run nothing")
    args = p.parse_args()
    out_dir = os.path.abspath(args.out or os.path.join(ROOT, "benchmarks", "results", "cpu", "set_mlp", args.tag))
    os.makedirs(out_dir, exist_ok=True)
    if args.summary_only:
        print(summarise(out_dir, args))
        return 0
    snapshot = tempfile.mkdtemp(prefix="set_mlp_pkg_")
    shutil.copytree(os.path.join(ROOT, "set_kernels"), os.path.join(snapshot, "set_kernels"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(out_dir, "run_info.json"), "w") as f:
        json.dump({"commit": commit, "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "python": sys.executable}, f, indent=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=snapshot)
    only = set(args.only.split(",")) if args.only else None
    jobs = [(seed, name, flags) for seed in range(args.seeds) for name, flags in CONFIGS
            if only is None or name in only]

    summary_lock = threading.Lock()

    def run(job):
        seed, name, flags = job
        path = os.path.join(out_dir, f"{name}_seed{seed}.json")
        if os.path.exists(path) or os.path.exists(path + ".part"):
            return  # done, or being run by another invocation (a dead run leaves its .part: delete it)
        cmd = [sys.executable, "-m", "set_kernels", "train", "--data", "fashion-mnist", "--epochs", str(args.epochs),
               "--train-samples", str(args.train_samples), "--test-samples", str(args.test_samples),
               "--seed", str(seed), "--threads", "1", "--json", path + ".part", *flags]
        if args.init:
            cmd += ["--init", args.init]
        open(path + ".part", "w").close()  # claims the run (train writes its JSON there at the end)
        t0 = time.time()
        with open(os.path.join(out_dir, f"{name}_seed{seed}.log"), "w") as log:
            rc = subprocess.run(cmd, cwd=snapshot, env=env, stdout=log, stderr=subprocess.DEVNULL).returncode
        if rc == 0:
            os.replace(path + ".part", path)
        else:
            os.remove(path + ".part")
        with summary_lock:  # two runs may finish together: one rewrite of summary.md at a time
            print(f"{name} seed {seed}: rc={rc} in {time.time() - t0:.0f}s", flush=True)
            print(summarise(out_dir, args), flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, jobs))
    print(summarise(out_dir, args))
    shutil.rmtree(snapshot, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
