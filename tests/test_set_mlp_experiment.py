"""``benchmarks/set_mlp_experiment.py``: the summary of finished runs (the runs themselves never run in CI)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("set_mlp_experiment",
                                                  os.path.join(ROOT, "benchmarks", "set_mlp_experiment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(out_dir, name, seed, accs, time_per_epoch):
    history = [{"epoch": e + 1, "test_acc": a} for e, a in enumerate(accs)]
    run = {"history": history, "final": {"test_acc": accs[-1], "best_test_acc": max(accs),
                                         "time_per_epoch_s": time_per_epoch}}
    with open(os.path.join(out_dir, f"{name}_seed{seed}.json"), "w") as f:
        json.dump(run, f)


def _row(text, first_cell):
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    return rows


def test_summary_tables(tmp_path, experiment):
    """Means, sample sds, accuracy at chosen epochs and paired t, against values worked out by hand."""
    epochs = 12
    set_final = {0: 0.80, 1: 0.82, 2: 0.84}
    static_final = {0: 0.83, 1: 0.84, 2: 0.88}  # paired differences +0.03, +0.02, +0.04
    for seed in range(3):
        ramp = [0.1 * (e + 1) / epochs for e in range(epochs - 1)]
        _write_run(tmp_path, "set_masked", seed, ramp + [set_final[seed]], 1.0 + seed)
        _write_run(tmp_path, "static_masked", seed, ramp + [static_final[seed]], 2.0)
    _write_run(tmp_path, "dense_lr0.001", 1, [0.5] * epochs, 0.5)  # one seed only: sd 0, one pair
    args = argparse.Namespace(tag="t", train_samples=20, test_samples=10, epochs=epochs, seeds=3, jobs=2)
    text = experiment.summarise(str(tmp_path), args)
    assert (tmp_path / "summary.md").read_text() == text

    # final accuracy: mean 0.82, sample sd 0.02; last-10 mean over epochs 3..12; best = final; time mean 2.0
    (row,) = [r for r in _row(text, "set_masked") if "±" in r and r.count("|") == 7]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3" and cells[2] == "0.8200 ± 0.0200"
    assert cells[4] == "0.8200" and cells[5] == "2.000"
    # a configuration with no run is listed with dashes
    assert any(r.startswith("| set_block16 | 0 | – |") for r in text.splitlines())

    # chosen epochs: 1, 5, 10 and the last (12); epoch 1 of every run is 0.1/12
    header = [line for line in text.splitlines() if line.startswith("| configuration | 1 |")]
    assert header == ["| configuration | 1 | 5 | 10 | 12 |"]
    chosen = [r for r in _row(text, "static_masked") if r.count("|") == 6]
    assert chosen == [f"| static_masked | {0.1 / 12:.4f} | {0.5 / 12:.4f} | {1.0 / 12:.4f} | 0.8500 |"]

    # paired differences against set_masked: mean 0.03, sd 0.01, t = 0.03 / (0.01 / sqrt 3)
    paired = [r for r in _row(text, "static_masked") if r.count("|") == 5]
    assert paired == [f"| static_masked | 3 | +0.0300 ± 0.0100 | {0.03 / (0.01 / math.sqrt(3)):+.2f} |"]
    dense = [r for r in _row(text, "dense_lr0.001") if r.count("|") == 5]
    assert dense == ["| dense_lr0.001 | 1 | -0.3200 ± 0.0000 | +nan |"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
