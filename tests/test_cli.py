"""The ``set-kernels`` command line: ``info`` and ``bench`` argument handling."""
import subprocess
import sys

import pytest
import torch

from set_kernels import backends, cli


def test_info_names_every_backend():
    out = subprocess.run([sys.executable, "-m", "set_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in backends.BACKENDS:
        assert f"  {name} " in out.stdout, f"backend {name!r} missing from:\n{out.stdout}"
    assert f"torch {torch.__version__}" in out.stdout
    assert "_C:" in out.stdout


def test_info_says_why_a_backend_is_unavailable(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for name in backends.BACKENDS:
        ok, why = backends.availability(name)
        line = next(line for line in text.splitlines() if line.startswith(f"  {name} "))
        assert ("available" in line) and ((why in line) if not ok else ("unavailable" not in line))


@pytest.mark.parametrize("argv, needle", [
    (["--backends", "numba", "nope"], "--backends"),
    (["--ops", "conv2d"], "ops"),
    (["--dtypes", "int8"], "dtypes"),
    (["--repeats", "0"], "repeats"),
])
def test_bench_rejects_bad_arguments(argv, needle, capsys, tmp_path):
    assert cli.main(["bench", "--tiny", "--out", str(tmp_path), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was measured or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_cuda_without_gpu_fails_clearly(capsys):
    assert cli.main(["bench", "--device", "cuda", "--tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_rejects_unknown_block_size():
    out = subprocess.run([sys.executable, "-m", "set_kernels", "bench", "--block-size", "24"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--block-size" in out.stderr


_REUSE = """
import resource, sys, torch
from set_kernels import cli
applied = cli.keep_freed_memory() if sys.argv[1] == "tuned" else False
a = torch.empty(40_000_000); a.fill_(1.0); del a  # 160 MB, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = torch.empty(30_000_000); b.fill_(2.0)  # 120 MB: fits the freed block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    """With ``keep_freed_memory`` (what ``set-kernels train`` applies to its own process) a freed
    160 MB block serves the next large tensor without faulting its pages in again; without it, a
    fresh mapping is faulted in (the test can tell the two apart). Run in subprocesses: the setting is process-wide."""
    faults = {}
    for mode in ("plain", "tuned"):
        out = subprocess.run([sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        applied, n = out.stdout.split()
        faults[mode] = (applied == "True", int(n))
    if not faults["tuned"][0]:
        pytest.skip("not glibc: keep_freed_memory() is a no-op here")
    assert faults["plain"][1] > 20_000, faults  # a fresh mapping: ~29,000 pages of 4 KiB
    assert faults["tuned"][1] < 2_000, faults


def test_train_command_applies_keep_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    from set_kernels import train

    monkeypatch.setattr(train, "run", lambda config: {})
    assert cli.main(["train", "--data", "synthetic", "--epochs", "1"]) == 0
    assert calls == [1]
