"""The package as a user installs it: declared dependencies, extras, and commands that need an extra.

* Every third-party module imported anywhere in ``set_kernels`` is declared in ``pyproject.toml``:
  as a plain dependency, or, for the optional features, in the extra that the feature's message
  names (``matplotlib``: ``bench``; ``triton``: ``triton``).
* ``set-kernels bench`` without matplotlib stops before any timing, exit status 2, with a message
  that names ``set-kernels[bench]``; nothing is written.
* The fresh-wheel test: the wheel, installed into a new virtual environment that sees nothing but
  torch (reused, with its own requirements) and the wheel's declared dependencies, runs
  ``set-kernels info``, ``set-kernels train --epochs 1`` on a small synthetic subset, refuses
  ``set-kernels bench`` until the ``bench`` extra's packages are there, then runs
  ``set-kernels bench --quick`` on one op. Nothing is downloaded: the dependencies are the ones
  already installed here, made visible one distribution at a time (``pip install --no-index``
  then fails if the wheel declares something that is not among them).
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from set_kernels import cli
from set_kernels.bench import report

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "set_kernels"
# Optional features: the module, and the extra that brings it.
OPTIONAL = {"matplotlib": "bench", "triton": "triton"}


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _req_name(spec: str) -> str:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return canonicalize_name(Requirement(spec).name)


def _third_party_imports() -> dict[str, set[str]]:
    """``{top-level module: {files importing it}}`` over every module of the package (AST, all branches)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "set_kernels":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared():
    project = _pyproject()["project"]
    plain = {_req_name(r) for r in project["dependencies"]}
    extras = {name: {_req_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    dists = md.packages_distributions()
    for module, files in sorted(_third_party_imports().items()):
        names = {_req_name(d) for d in dists.get(module, [module])}
        if module in OPTIONAL:
            extra = OPTIONAL[module]
            assert names & extras.get(extra, set()), f"{module} (imported by {sorted(files)}) is not in [{extra}]"
            assert not names & plain, f"{module} is optional: it belongs to an extra, not the plain dependencies"
        else:
            assert names & plain, f"{module} (imported by {sorted(files)}) is not a declared dependency"


def test_test_extra_brings_the_bench_extra():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert "set-kernels[bench]" in extras["test"]  # the tests run `set-kernels bench`, which plots


@pytest.fixture
def no_matplotlib(monkeypatch):
    """``import matplotlib`` (and of any submodule) raises ImportError, as where the [bench] extra
    is not installed. Modules already imported stay as they are, and the entry is restored after."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_bench_without_matplotlib_fails_at_once_naming_the_extra(no_matplotlib, monkeypatch, tmp_path, capsys):
    from set_kernels import bench

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran although its plot cannot be drawn")

    monkeypatch.setattr(bench, "run", must_not_run)
    out = tmp_path / "out"
    rc = cli.main(["bench", "--tiny", "--ops", "masked_adam_", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pip install 'set-kernels[bench]'" in err and "matplotlib" in err
    assert not out.exists()


def test_write_all_without_matplotlib_writes_nothing(no_matplotlib, tmp_path):
    with pytest.raises(report.MissingExtraError, match=r"set-kernels\[bench\]"):
        report.write_all({}, str(tmp_path / "out"), "tiny")
    assert not (tmp_path / "out").exists()
    assert issubclass(report.MissingExtraError, ImportError)


# ------------------------------------------------------------------------------------ the fresh wheel
def _closure(names) -> dict:
    """``{canonical name: Distribution}``: ``names`` and everything they require (markers evaluated,
    the requested extras' requirements included), from this environment."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict = {}
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in seen and not req.extras:
            continue
        dist = seen.get(key) or md.distribution(req.name)
        seen[key] = dist
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {""} | set(req.extras)):
                todo.append(sub)
    return seen


def _expose(dists: dict, folder: Path) -> None:
    """Symlink the top-level files and folders of ``dists`` (packages and their .dist-info) into ``folder``."""
    folder.mkdir(exist_ok=True)
    for dist in dists.values():
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}
        tops = {t for t in tops if not t.endswith(".pth")}
        for top in tops:
            src = Path(dist.locate_file(top))
            dst = folder / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)


def _wheel_requirements(wheel: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _run(cmd, env, cwd, timeout=600):
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    return out, time.perf_counter() - t0


def test_fresh_wheel_with_declared_dependencies_only(tmp_path):
    pytest.importorskip("packaging")
    work = tmp_path / "work"
    work.mkdir()
    # 1. The wheel (pure Python: no CUDA extension needed for this test), built from a copy of the
    #    sources, so that the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "CMakeLists.txt", "csrc", "python", "set_kernels"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    build_env = {**os.environ, "SET_KERNELS_BUILD_CUDA": "0"}
    out, _ = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                   str(tmp_path / "dist"), str(src)], build_env, work)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("set_kernels-*.whl"))
    from packaging.requirements import Requirement

    declared = [r for r in _wheel_requirements(wheel) if not (Requirement(r).marker and "extra" in str(
        Requirement(r).marker))]
    assert {Requirement(r).name for r in declared} >= {"torch", "numpy", "numba", "tqdm"}

    # 2. A new venv (no pip of its own, no system packages) that sees torch and the declared
    #    dependencies only, through one .pth folder of symlinks.
    venv = tmp_path / "venv"
    out, _ = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], dict(os.environ), work)
    assert out.returncode == 0, out.stderr[-3000:]
    vpy = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(vpy), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    deps = tmp_path / "deps"
    _expose(_closure(["torch"] + declared), deps)
    (site / "set_kernels_test_deps.pth").write_text(str(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "NUMBA_CACHE_DIR")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONNOUSERSITE="1")
    pip = [sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-index", "-q"]
    out, _ = _run(pip + [str(wheel)], env, work)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    probe = subprocess.run([str(vpy), "-c", "import matplotlib"], capture_output=True, env=env, cwd=work)
    assert probe.returncode != 0, "matplotlib is visible in the fresh venv: the test would prove nothing"
    exe = str(venv / "bin" / "set-kernels")

    # 3. The commands.
    out, _ = _run([exe, "info"], env, work)
    assert out.returncode == 0 and "numba" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    out, _ = _run([exe, "train", "--epochs", "1", "--data", "synthetic", "--train-samples", "200",
                   "--test-samples", "100", "--hidden", "64,64", "--optimizer", "adam", "--threads", "2"], env, work)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "test_acc=" in out.stdout.strip().splitlines()[-1]
    bench = [exe, "bench", "--quick", "--device", "cpu", "--ops", "masked_adam_", "--features", "1024",
             "--densities", "0.25", "1", "--repeats", "2", "--no-progress", "--out", str(tmp_path / "bench")]
    out, secs = _run(bench, env, work)
    assert out.returncode == 2 and "pip install 'set-kernels[bench]'" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "bench").exists() and secs < 120

    # 4. With the [bench] extra's packages visible, `pip install wheel[bench]` is satisfied offline
    #    and the benchmark runs.
    _expose(_closure(["matplotlib>=3.5"]), deps)
    out, _ = _run(pip + [f"{wheel}[bench]"], env, work)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    out, _ = _run(bench, env, work)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["quick.json", "quick.md", "quick.png"]
    # The numba kernels were cached in the per-user folder, not in the installed package.
    installed = site / "set_kernels"
    assert not [p for p in installed.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert [p for p in (tmp_path / "cache").rglob("*.nbi")]
