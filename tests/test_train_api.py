"""``set_kernels.train`` from Python: ``TrainConfig`` (its checks, the flags made from it, its
documentation) and ``run(config)``, which gives the CLI's ``--json`` result."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from set_kernels import cli, train
from set_kernels.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = {"time_s", "eval_time_s", "time_per_epoch_s", "total_time_s", "peak_rss_mb"}
TINY = ["--data", "synthetic", "--epochs", "2", "--train-samples", "200", "--test-samples", "100",
        "--hidden", "48,32", "--batch", "25", "--mode", "set", "--layer", "sparse", "--prune", "set",
        "--zeta", "0.4", "--seed", "3", "--threads", "1"]


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(argv)


def without_timings(result: dict) -> dict:
    out = {"config": {k: v for k, v in result["config"].items() if k != "json"},
           "history": [{k: v for k, v in row.items() if k not in TIMINGS} for row in result["history"]],
           "final": {k: v for k, v in result["final"].items() if k not in TIMINGS}}
    return json.loads(json.dumps(out))  # tuples -> lists, as in the file


def test_run_from_python_equals_the_cli_json(tmp_path, capsys):
    """The same flags through the console entry point and as a TrainConfig give the same result:
    every accuracy, loss, live count and configuration entry, timings apart."""
    path = tmp_path / "cli.json"
    proc = subprocess.run([sys.executable, "-m", "set_kernels", "train", *TINY, "--json", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = TrainConfig(data="synthetic", epochs=2, train_samples=200, test_samples=100, hidden=[48, 32], batch=25,
                         mode="set", layer="sparse", prune="set", zeta=0.4, seed=3, threads=1)
    result = train.run(config)
    assert result["history"][0]["evolved"] is True  # the run exercised SET
    assert without_timings(result) == without_timings(json.loads(path.read_text()))
    assert proc.stdout.strip().splitlines()[-1].startswith("final: test_acc=")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("final: test_acc=")


def test_run_returns_the_documented_keys_and_writes_json(tmp_path):
    lines = []
    path = tmp_path / "r.json"
    result = train.run(TrainConfig(data="synthetic", epochs=1, train_samples=120, test_samples=60, hidden=(32,),
                                   mode="static", optimizer="adam", threads=1, json=str(path)), log=lines.append)
    tables = documented_tables()
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(result) == list(tables["`result` key"])
    assert set(result["config"]) == set(fields) | set(tables["`config` key (besides the fields)"])
    assert list(result["history"][0]) == list(tables["`history` key"])
    assert list(result["final"]) == list(tables["`final` key"])
    assert result["config"]["lr"] == 1e-3 and result["config"]["sizes"] == [784, 32, 10]
    assert result["config"]["hidden"] == (32,) and result["config"]["data"] == "synthetic"
    assert result["history"][0]["evolved"] is False and 0.0 <= result["final"]["test_acc"] <= 1.0
    assert len(lines) == 2 and "test_acc=" in lines[-1] and "time_per_epoch=" in lines[-1]
    assert json.loads(path.read_text())["final"]["test_acc"] == result["final"]["test_acc"]


def test_run_wants_a_config():
    with pytest.raises(TypeError, match="config"):
        train.run(parse(["--epochs", "1"]))


def test_representative_command_line_parses_to_the_config():
    argv = ["--data", "fashion-mnist", "--data-dir", "/d", "--epochs", "7", "--train-samples", "300",
            "--test-samples", "200", "--seed", "5", "--mode", "static", "--layer", "block", "--hidden", "100,50",
            "--batch", "32", "--block-size", "64", "--epsilon", "20", "--zeta", "0.1", "--optimizer", "adam",
            "--lr", "0.002", "--json", "out.json", "--init", "dense-fan-in", "--threads", "3", "--prune", "set"]
    expected = TrainConfig(data="fashion-mnist", data_dir="/d", epochs=7, train_samples=300, test_samples=200,
                           seed=5, mode="static", layer="block", hidden=(100, 50), batch=32, block_size=64,
                           epsilon=20.0, zeta=0.1, optimizer="adam", lr=0.002, json="out.json",
                           init="dense-fan-in", threads=3, prune="set")
    assert TrainConfig.from_args(parse(argv)) == expected
    assert TrainConfig.from_args(parse([])) == TrainConfig()
    assert TrainConfig() == TrainConfig(epochs=400, train_samples=2000, test_samples=1000, mode="set",
                                        layer="masked", hidden=(1000, 1000, 1000), batch=40, epsilon=13.0,
                                        zeta=0.3, optimizer="sgd", init="sparse-fan-in", prune="magnitude")
    # every field has its flag, and every flag is a field
    assert list(vars(parse([]))) == [f.name for f in dataclasses.fields(TrainConfig)]


@pytest.mark.parametrize("field,value", [
    ("data", "mnist"), ("mode", "sparse"), ("layer", "dense"), ("block_size", 8), ("optimizer", "rmsprop"),
    ("init", "xavier"), ("prune", "random"), ("epochs", 0), ("epochs", 2.0), ("epochs", True),
    ("train_samples", 0), ("train_samples", 60001), ("test_samples", 10001), ("seed", "0"), ("batch", 0),
    ("threads", 0), ("hidden", (10, 0)), ("hidden", "64,64"), ("hidden", (10.0,)), ("epsilon", 0),
    ("epsilon", math.inf), ("epsilon", "13"), ("zeta", -0.1), ("zeta", 1.01), ("zeta", math.nan), ("lr", 0.0),
    ("lr", -1e-3), ("lr", math.nan),
])
def test_bad_config_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        TrainConfig(**{field: value})
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag}: "):  # the CLI's message names the flag
        TrainConfig.from_args(argparse.Namespace(**{**dataclasses.asdict(TrainConfig()), field: value}))


def test_good_edge_values_are_accepted():
    c = TrainConfig(hidden=[5], zeta=0.0, lr=1, epochs=1, train_samples=60000, test_samples=10000, threads=None)
    assert c.hidden == (5,) and c.lr == 1
    assert TrainConfig(zeta=1, hidden=()).hidden == ()


@pytest.mark.parametrize("argv", [["--epochs", "x"], ["--block-size", "1"], ["--optimizer", "Adam"],
                                  ["--epochs", "0"], ["--hidden", "8,-1"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *argv])
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


# ------------------------------------------------------------------------------ docs/api.md
def documented_tables() -> dict[str, dict[str, list[str]]]:
    """``{header's first cell: {first cell (backticks off): other cells}}`` of each table of the
    Training section of docs/api.md."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = re.search(r"^## Training: `set_kernels\.train`\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "docs/api.md has no Training section"
    tables, current = {}, None
    for line in section.group(1).splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if current is None:
            current = tables.setdefault(cells[0], {})
        elif not set(cells[0]) <= set("- "):
            current[cells[0].strip("`")] = cells[1:]
    return tables


def test_docs_document_every_field_with_its_type_and_default():
    table = documented_tables()["field"]
    fields = dataclasses.fields(TrainConfig)
    assert list(table) == [f.name for f in fields]
    for f in fields:
        type_, default, meaning = table[f.name]
        assert type_ == f"`{f.type}`", (f.name, type_, f.type)
        value = ast.literal_eval(default.strip("`"))
        assert value == f.default and type(value) is type(f.default), (f.name, default, f.default)
        assert meaning, f.name


def test_docs_table_parser_sees_a_wrong_default(tmp_path, monkeypatch):
    """The doc check can fail: a changed default in the table is caught."""
    fake = tmp_path / "docs"
    fake.mkdir()
    text = (ROOT / "docs" / "api.md").read_text()
    assert "| `epochs` | `int` | `400` |" in text
    (fake / "api.md").write_text(text.replace("| `epochs` | `int` | `400` |", "| `epochs` | `int` | `40` |"))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError):
        test_docs_document_every_field_with_its_type_and_default()


@pytest.mark.parametrize("layer", ["sparse", "dense"])
def test_epoch_loss_and_accuracy_equal_a_step_by_step_reading(layer):
    """``_epoch`` reads the batches' losses and logits once, after the last step: its train loss
    and accuracy must equal what reading them after every step gives (the same model, data and
    order, a short last batch), exactly."""
    import torch

    mode = "set" if layer == "sparse" else "dense"
    config = TrainConfig(data="synthetic", epochs=2, train_samples=110, test_samples=10, hidden=(40, 24), batch=25,
                         mode=mode, layer="sparse", seed=4, threads=1)
    _, _, (x, y, _, _) = train._load_data(config)
    sizes = train.model_sizes(config.hidden)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(9))
    results = []
    for reference in (False, True):
        model, opt, evo, _ = train._build(config, sizes, -(-len(x) // config.batch))
        if not reference:
            got = train._epoch(model, opt, evo, x, y, config.batch, order, lambda: 0.0)
            results.append((got["train_loss"], got["train_acc"]))
            continue
        loss_sum, correct = 0.0, 0
        for s in range(0, len(x), config.batch):
            idx = order[s:s + config.batch]
            logits = model(x[idx])
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == y[idx]).sum())
        results.append((loss_sum / len(x), correct / len(x)))
    assert len(x) % config.batch != 0
    assert results[0] == results[1]
    assert 0 < results[0][1] < 1
