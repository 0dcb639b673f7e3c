"""``set-kernels selftest``: it runs, passes on the CPU backends, and FAILs a wrong backend.

Also the pieces the GPU session relies on: the `gpu` marker selection and the per-test time
limit of tests/conftest.py, and ``benchmarks/gpu_session.sh --dry-run``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRITON_INTERPRETED, require_backend
from set_kernels import backends, cli, selftest

ROOT = Path(__file__).resolve().parents[1]


def run_selftest(capsys, tmp_path, *args) -> tuple[int, str, dict]:
    """``set-kernels selftest *args`` in this process: (exit status, stdout, the JSON report)."""
    report = tmp_path / "selftest.json"
    status = cli.main(["selftest", *args, "--json", str(report)])
    out = capsys.readouterr().out
    return status, out, json.loads(report.read_text()) if report.exists() else {}


def rows(doc: dict, **match) -> list[dict]:
    return [r for r in doc["results"] if all(r[k] == v for k, v in match.items())]


# ------------------------------------------------------------------------------ it passes
@pytest.mark.parametrize("name", ["numba", "torch"])
def test_selftest_passes_on_a_cpu_backend(name, capsys, tmp_path):
    require_backend(name)
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", name, "--device", "cpu")
    assert status == 0, out
    checked = rows(doc, backend=name, status="PASS")
    ops = {(r["op"], r["dtype"], r["block"]) for r in checked}
    dtypes = ("fp32", "fp64") if name == "numba" else ("fp32", "fp16", "bf16", "fp64")
    for dtype in dtypes:
        for b in map(str, selftest.BLOCK_SIZES):  # element sparsity (b = 1) included
            for op in selftest.MATMUL_OPS:
                assert (op, dtype, b) in ops, (op, dtype, b)
        for op in selftest.ADAM_OPS:
            assert (op, dtype, "-") in ops, (op, dtype)
    assert not rows(doc, status="FAIL")
    for r in checked:  # every passing row carries its error and bound
        assert 0 <= r["error"] <= r["bound"], r
    if name == "numba":  # no fp16/bf16 there: reported as skipped, with the dispatcher's reason
        skipped = rows(doc, backend="numba", dtype="bf16", status="skip")
        assert skipped and all("not bfloat16" in r["note"] for r in skipped)
        assert re.search(r"numba\s+cpu\s+all\s+bf16\s+all .*skip \(it supports dtypes", out), out
    header = out.splitlines()[1].split()
    assert header[:5] == ["backend", "device", "op", "dtype", "block"], header
    assert re.search(rf"^{name}\s+cpu\s+fwd\s+fp32\s+1\s+\S+\s+1\.00e-04\s+PASS$", out, re.M), out
    assert doc["counts"]["FAIL"] == 0 and doc["counts"]["PASS"] == len(checked)


@pytest.mark.slow
def test_selftest_passes_on_interpreted_triton(capsys, tmp_path):
    """CI runs triton in its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""
    if not TRITON_INTERPRETED:
        pytest.skip("triton is not interpreting here (a GPU machine checks it compiled: gpu_session.sh)")
    require_backend("triton")
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", "triton", "--device", "cpu")
    assert status == 0, out
    passed = rows(doc, backend="triton", status="PASS")
    assert {r["block"] for r in passed} >= {"1", "16", "128", "-"}
    assert {r["dtype"] for r in passed} == {"fp32", "fp16", "bf16"}
    assert {r["op"] for r in passed} == set(selftest.MATMUL_OPS) | set(selftest.ADAM_OPS)
    assert rows(doc, backend="triton", dtype="fp64", status="skip")


@pytest.mark.slow
def test_python_m_set_kernels_selftest():
    """The module entry point, in a fresh process (the quick grid on the torch backend)."""
    res = subprocess.run([sys.executable, "-m", "set_kernels", "selftest", "--backends", "torch", "--quick",
                          "--dtypes", "fp32,bf16"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max error" in res.stdout and " PASS" in res.stdout
    blocks = {line.split()[4] for line in res.stdout.splitlines() if line.startswith("torch ")}
    assert blocks == {"1", "32", "-"}, blocks
    assert re.search(r"selftest: \d+ passed, 0 failed, 0 skipped", res.stdout), res.stdout


# ------------------------------------------------------------------------- it can fail
def _plus_one(original):
    def wrong(*args, **kwargs):
        return original(*args, **kwargs) + 1
    return wrong


def test_wrong_forward_fails(monkeypatch, capsys, tmp_path):
    require_backend("numba")
    numba_backend = backends.load("numba")
    monkeypatch.setattr(numba_backend, "linear_forward", _plus_one(numba_backend.linear_forward))
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", "numba", "--quick", "--dtypes", "fp32")
    assert status == 1
    assert {r["status"] for r in rows(doc, op="fwd")} == {"FAIL"}
    assert {r["status"] for r in rows(doc, op="dX") + rows(doc, op="dW")} == {"PASS"}  # only what is wrong fails
    assert all(r["error"] > r["bound"] for r in rows(doc, op="fwd"))
    assert re.search(r"^numba\s+cpu\s+fwd\s+fp32\s+32\s.*FAIL$", out, re.M), out


def test_unwritten_output_element_fails(monkeypatch, capsys, tmp_path):
    """dX with its last token row never written: NaN-poisoned allocations make that a FAIL."""
    require_backend("numba")
    numba_backend = backends.load("numba")
    original = numba_backend.linear_grad_input

    def forgets_a_row(dy, *args, **kwargs):
        full = original(dy, *args, **kwargs)
        out = torch.empty_like(full)  # poisoned by the selftest
        out[:-1] = full[:-1]
        return out

    monkeypatch.setattr(numba_backend, "linear_grad_input", forgets_a_row)
    # the eager backward calls the backend's fused linear_backward when it has one: use the two ops
    monkeypatch.delattr(numba_backend, "linear_backward")
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", "numba", "--quick", "--dtypes", "fp64")
    assert status == 1
    failed = rows(doc, op="dX")
    assert failed and all(r["status"] == "FAIL" and "non-finite" in r["note"] for r in failed)
    assert torch.empty(3).numel() == 3  # torch.empty is itself again


def test_wrong_fused_backward_fails(monkeypatch, capsys, tmp_path):
    """The fused backward (what eager autograd calls at block size 1) is checked too."""
    require_backend("numba")
    numba_backend = backends.load("numba")
    original = numba_backend.linear_backward

    def wrong_dw(*args, **kwargs):
        dx, dv = original(*args, **kwargs)
        return dx, (None if dv is None else dv * 2)

    monkeypatch.setattr(numba_backend, "linear_backward", wrong_dw)
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", "numba", "--quick", "--dtypes", "fp32")
    assert status == 1
    assert any(r["status"] == "FAIL" for r in rows(doc, op="dW"))
    assert all(r["status"] == "PASS" for r in rows(doc, op="fwd") + rows(doc, op="dX"))


def test_crashing_backend_fails_with_the_error(monkeypatch, capsys, tmp_path):
    require_backend("numba")
    numba_backend = backends.load("numba")

    def crash(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(numba_backend, "linear_grad_weight", crash)
    monkeypatch.delattr(numba_backend, "linear_backward")  # as above: the two ops, not the fused call
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", "numba", "--quick", "--dtypes", "fp32")
    assert status == 1
    assert all(r["status"] == "FAIL" and "kernel exploded" in r["note"] for r in rows(doc, op="dW"))
    assert all(r["status"] == "PASS" for r in rows(doc, op="fwd"))


@pytest.mark.parametrize("how", ["lr", "mask"])
def test_wrong_adam_fails(how, monkeypatch, capsys, tmp_path):
    require_backend("numba")
    numba_backend = backends.load("numba")
    original = numba_backend.masked_adam_

    def wrong(params, grads, exp_avgs, exp_avg_sqs, masks, **kw):
        if how == "lr":
            kw["lr"] *= 1.1
        original(params, grads, exp_avgs, exp_avg_sqs, masks, **kw)
        if how == "mask":  # one masked entry left non-zero
            for p, mask in zip(params, masks):
                if mask is not None and not mask.all():
                    p.view(-1)[(~mask).view(-1).nonzero()[0]] = 1e-6
                    break

    monkeypatch.setattr(numba_backend, "masked_adam_", wrong)
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", "numba", "--quick", "--dtypes", "fp32")
    assert status == 1
    failed = rows(doc, op="adam") + rows(doc, op="adamw")
    assert failed and all(r["status"] == "FAIL" for r in failed)
    if how == "mask":
        assert all("masked entries of param are not exactly 0" in r["note"] for r in failed)


# ---------------------------------------------------------------- skips are not failures
def test_unsupported_block_size_is_a_skip_with_the_reason(monkeypatch, capsys, tmp_path):
    """As the cuda backend refuses b = 1: the row says skip and why, and the exit status is 0."""
    require_backend("numba")
    monkeypatch.setattr(backends.load("numba"), "BLOCK_SIZES", (16, 32, 64, 128), raising=False)
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", "numba", "--quick", "--dtypes", "fp32")
    assert status == 0, out
    skipped = rows(doc, block="1", status="skip")
    assert {r["op"] for r in skipped} == set(selftest.MATMUL_OPS)
    assert all("element sparsity" in r["note"] for r in skipped)
    assert rows(doc, block="32", status="PASS") and rows(doc, op="adam", status="PASS")
    assert re.search(r"numba\s+cpu\s+fwd,dX,dW\s+fp32\s+1\s.*skip \(it supports block sizes", out), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_unavailable_backend_is_reported_and_nothing_checked_fails(capsys, tmp_path):
    status, out, doc = run_selftest(capsys, tmp_path, "--backends", "cuda")
    assert status == 1
    assert "not checked: cuda:" in out
    assert doc["counts"]["PASS"] == 0 and "cuda" in doc["unchecked"]


@pytest.mark.parametrize("argv, needle", [
    (["--backends", "numba,nope"], "--backends"),
    (["--block-sizes", "24"], "--block-sizes"),
    (["--block-sizes", "x"], "--block-sizes"),
    (["--dtypes", "int8"], "--dtypes"),
])
def test_bad_arguments(argv, needle, capsys):
    assert cli.main(["selftest", *argv]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_cuda_without_gpu(capsys):
    assert cli.main(["selftest", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_poisoned_allocations_restore_torch_even_after_an_error():
    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)
    with pytest.raises(ZeroDivisionError):
        with selftest.poisoned_allocations():
            assert torch.isnan(torch.empty(4)).all() and torch.isnan(torch.ones(2).new_empty(3)).all()
            assert torch.empty(2, dtype=torch.int64).dtype == torch.int64  # integers are left alone
            1 / 0
    assert (torch.empty, torch.empty_like, torch.Tensor.new_empty) == originals


def test_triton_first_config_pins_every_autotuner_and_undoes_it():
    """On a GPU the selftest runs each Triton kernel with one config (no autotuning): check that the
    pinning reaches the backend's autotuners through this triton's API, and is undone on exit."""
    require_backend("triton")
    from triton.runtime.autotuner import Autotuner

    import importlib

    tuner = importlib.import_module("set_kernels.backends.triton.linear_forward")._forward_kernel
    assert isinstance(tuner, Autotuner)
    before = dict(tuner.cache)
    multi = [tuner.configs[0], tuner.configs[0]]
    with selftest.triton_first_config() as pinned:
        assert pinned
        assert "prune_configs" in vars(tuner)
        tuner.configs, saved = multi, tuner.configs
        try:
            assert len(tuner.prune_configs({})) == 1
        finally:
            tuner.configs = saved
        tuner.cache[("selftest-probe",)] = tuner.configs[0]  # a choice made while pinned
    assert "prune_configs" not in vars(tuner)
    assert tuner.cache == before


def test_reference_is_independent_of_to_dense():
    """The selftest's dense W comes from the CSR alone; cross-check it with the package's to_dense."""
    import set_kernels as sk

    for b in (1, 16):
        layout = sk.BlockSparseLayout.random(2 * b + 5, 3 * b + 1, b, 0.5, generator=torch.Generator().manual_seed(b))
        values = torch.randn(layout.nnz_blocks, b, b, dtype=torch.float64)
        assert torch.equal(selftest._dense64(values, layout), sk.ops.to_dense(values, layout))
        assert torch.equal(selftest._blocks64(sk.ops.to_dense(values, layout), layout),
                           sk.ops.from_dense(sk.ops.to_dense(values, layout), layout))


# --------------------------------------------------------------- the GPU session's pieces
@pytest.mark.slow
def test_gpu_marker_selects_the_gpu_tests():
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          "tests/test_cuda_backend.py", "tests/test_build.py", "tests/test_set.py"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = res.stdout.splitlines()
    assert any("test_gpu_ops_match_float64_reference" in i for i in ids)
    assert any("test_gpu_runs_on_the_current_stream" in i for i in ids)
    assert any("test_block_update_on_cuda_has_no_host_sync" in i for i in ids)  # marked by name
    assert not any("test_binding_rejects_bad_arguments" in i for i in ids)
    assert not any("test_info_says_cuda_unavailable_and_why" in i for i in ids)  # uses no_gpu
    assert not any("test_pure_python_wheel" in i for i in ids)  # its file marks its GPU tests itself


SLEEPER = "tests/test_selftest.py::test_per_test_time_limit_probe"


def test_per_test_time_limit_probe():
    """Sleeps only when run by the next test (then $SET_KERNELS_TEST_TIMEOUT must stop it)."""
    if os.environ.get("SET_KERNELS_SELFTEST_PROBE") != "1":
        pytest.skip("a probe for test_per_test_time_limit")
    import time

    time.sleep(60)


@pytest.mark.slow
def test_per_test_time_limit():
    env = dict(os.environ, SET_KERNELS_TEST_TIMEOUT="1.5", SET_KERNELS_SELFTEST_PROBE="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SLEEPER], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "ran past SET_KERNELS_TEST_TIMEOUT=1.5 s" in res.stdout, res.stdout
    assert "1 failed" in res.stdout


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path):
    out_dir = tmp_path / "session"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run", str(out_dir)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    steps = re.findall(r"^step (\S+) +budget +(\d+) s: (.*)$", text, re.M)
    names = [s[0] for s in steps]
    for want in ("build", "selftest", "sanitizer", "bench", "summary"):
        assert any(want in n for n in names), (want, names)
    tests = [i for i, n in enumerate(names) if "tests" in n]
    assert tests and names.index("1-build") < names.index("2-selftest") < min(tests), names
    assert names[tests[0]] == "3a-tests-cuda", "the hand-written CUDA kernels' tests go first"
    total = sum(int(s[1]) for s in steps)
    assert total <= 540, f"the steps' budgets add up to {total} s, over 9 minutes"
    assert re.search(r"^total budget +(\d+) s", text, re.M)
    assert "-m gpu" in text and "compute-sanitizer" in text and "--tool racecheck" in text
    assert "selftest" in text and "bench --device cuda" in text
    assert str(out_dir) in text
    assert not out_dir.exists(), "a dry run writes nothing"
