"""The numba backend's compile cache: a per-user folder, no change to the process, nothing next to the package.

* The kernels are cached under ``set_kernels.backends.numba.cache_dir()`` (``$XDG_CACHE_HOME`` or
  ``~/.cache``, then ``set_kernels/numba``), not next to the package (``site-packages`` once
  installed), and loading the backend changes neither ``os.environ`` nor ``numba.config.CACHE_DIR``.
* A user's own ``$NUMBA_CACHE_DIR`` wins.
* Only this backend's files are redirected: other numba code keeps numba's own locations.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import set_kernels

PACKAGE = Path(set_kernels.__file__).resolve().parent

PROBE = r"""
import json, os, sys
import set_kernels, torch
from set_kernels.backends import numba as nb
before = dict(os.environ)
bsmm, adam, numba = nb._load()[:3]
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
p = torch.randn(100)
if sys.argv[1] == "run":  # compile (or load) one kernel, so that its cache is written
    set_kernels.ops.masked_adam_([p], [torch.randn(100)], [torch.zeros(100)], [torch.zeros(100)], [None], step=1,
                                 lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, backend="numba")

@numba.njit(cache=True)
def other(x):  # numba code outside set_kernels: numba's own locators
    return x + 1

paths = {name: getattr(mod, attr)._cache._cache_path for name, mod, attr in
         (("adam", adam, "masked_adam_"), ("bsmm", bsmm, "linear_forward"))}
print(json.dumps({"changed_env": changed, "numba_cache_dir": numba.config.CACHE_DIR, "paths": paths,
                  "cache_dir": nb.cache_dir(), "other": type(other._cache._impl.locator).__name__}))
"""


def _probe(tmp_path, run, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    full.update(env)
    (tmp_path / "other").mkdir(exist_ok=True)
    script = tmp_path / "other" / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script), "run" if run else "paths"], capture_output=True, text=True,
                         env=full, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cache_files(folder: Path):
    return sorted(p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc"))


def test_kernels_cache_in_the_per_user_folder_and_leave_the_process_alone(tmp_path):
    xdg = tmp_path / "xdg"
    before = _cache_files(PACKAGE)
    res = _probe(tmp_path, True, XDG_CACHE_HOME=str(xdg))
    assert res["changed_env"] == []  # no NUMBA_CACHE_DIR (or anything else) set for the process
    assert res["numba_cache_dir"] == ""  # numba's global setting untouched
    assert res["cache_dir"] == str(xdg / "set_kernels" / "numba")
    for name, path in res["paths"].items():
        assert Path(path).is_relative_to(xdg / "set_kernels" / "numba"), (name, path)
    written = _cache_files(xdg)
    assert any(p.name.startswith("adam.masked_adam_") for p in written), written  # the run was cached there
    assert _cache_files(PACKAGE) == before  # and nothing was written next to the package
    assert res["other"] != "SetKernelsCacheLocator"  # other numba code is not redirected


def test_a_users_numba_cache_dir_wins(tmp_path):
    mine = tmp_path / "numba-cache"
    res = _probe(tmp_path, False, XDG_CACHE_HOME=str(tmp_path / "xdg"), NUMBA_CACHE_DIR=str(mine))
    assert res["numba_cache_dir"] == str(mine)
    for name, path in res["paths"].items():
        assert Path(path).is_relative_to(mine), (name, path)
    assert not (tmp_path / "xdg" / "set_kernels").exists()


def test_this_process_uses_the_per_user_folder():
    from set_kernels.backends import numba as nb

    ok, why = nb.availability()
    if not ok:
        pytest.fail(f"numba is a required CPU backend: {why}")
    adam = nb._load()[1]
    path = Path(adam.masked_adam_._cache._cache_path)
    root = Path(os.environ["NUMBA_CACHE_DIR"]) if os.environ.get("NUMBA_CACHE_DIR") else Path(nb.cache_dir())
    assert path.is_relative_to(root)
    assert not path.is_relative_to(PACKAGE)


STAMP_PROBE = r"""
import json
from set_kernels.backends import numba as nb
spmm = nb._load()[3]
loc = spmm._spmm_t._cache._impl.locator
print(json.dumps({"locator": type(loc).__name__, "stamp": [part.hex() for part in loc.get_source_stamp()]}))
"""


def test_cached_kernels_are_stamped_with_the_helpers_compiled_into_them(tmp_path):
    """numba stamps a cached kernel with a digest of its own file. The element kernels of spmm.py
    also compile the intrinsics of simd.py and the hash of dropout.py: their digests must be part
    of the stamp, so that an edit of those files alone (a checkout, an upgrade) recompiles the
    kernels instead of loading the ones compiled from the old text."""
    import hashlib

    script = tmp_path / "stamp.py"
    script.write_text(STAMP_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["locator"] == "SetKernelsCacheLocator"
    folder = PACKAGE / "backends" / "numba"
    want = [hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("spmm.py", "simd.py", "dropout.py")]
    assert res["stamp"] == want
