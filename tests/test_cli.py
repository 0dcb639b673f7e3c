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
