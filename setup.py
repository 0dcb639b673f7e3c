"""Build script for set-kernels.

Project metadata lives in pyproject.toml; this file only decides whether to
build the CUDA extension ``set_kernels._C`` and drives CMake to build it
(CMakeLists.txt is the one build definition).

* The extension is built when ``nvcc`` is found: ``$CUDA_HOME/bin`` (or
  ``$CUDA_PATH/bin``) if set, else ``PATH``, else ``/usr/local/cuda/bin``.
* ``SET_KERNELS_BUILD_CUDA=0`` installs pure Python (no extension), as does a
  machine without nvcc; ``SET_KERNELS_BUILD_CUDA=1`` makes a missing nvcc an
  error instead.
* ``SET_KERNELS_CUDA_ARCHS`` overrides the GPU architectures (default
  ``80;90``; e.g. ``90a`` or ``80;86``, commas also accepted).
* ``SET_KERNELS_BUILD_TYPE`` overrides the CMake build type (default Release).
* ``CMAKE_BUILD_PARALLEL_LEVEL`` / ``MAX_JOBS`` set the number of build jobs
  (default: all available CPUs).  ``CMAKE_ARGS`` adds raw CMake arguments.

Works with ``pip install --no-build-isolation [-e] .``: the extension is
written where setuptools' ``get_ext_fullpath`` says, and setuptools copies it
into ``set_kernels/`` for editable installs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
EXT_NAME = "set_kernels._C"
MIN_CMAKE = (3, 24)
DEFAULT_ARCHS = "80;90"


def _log(msg: str) -> None:
    print(f"set_kernels setup: {msg}", file=sys.stderr, flush=True)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_nvcc() -> str | None:
    """Path of nvcc, or None: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and _is_executable(Path(home) / "bin" / "nvcc"):
            return str(Path(home) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if _is_executable(default) else None


def cuda_build_setting() -> str:
    """'0' (never), '1' (required) or 'auto' from SET_KERNELS_BUILD_CUDA."""
    value = os.environ.get("SET_KERNELS_BUILD_CUDA", "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return "0"
    if value in ("1", "true", "on", "yes"):
        return "1"
    return "auto"


def _tool_version(exe: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in match.groups() if x is not None) if match else None


def _script_dirs() -> list[Path]:
    """Directories where this interpreter's environment puts executables."""
    dirs = [Path(sys.executable).parent]
    try:
        import sysconfig

        dirs.append(Path(sysconfig.get_path("scripts")))
    except Exception:  # pragma: no cover - defensive
        pass
    return dirs


def find_cmake() -> str:
    """A CMake >= 3.24: the pip `cmake` package first, then the environment, then PATH."""
    candidates: list[str] = []
    try:
        import cmake  # the PyPI package, a build requirement

        candidates.append(str(Path(cmake.CMAKE_BIN_DIR) / "cmake"))
    except Exception:
        pass
    candidates += [str(d / "cmake") for d in _script_dirs()]
    which = shutil.which("cmake")
    if which:
        candidates.append(which)
    seen = set()
    for cand in candidates:
        if cand in seen or not _is_executable(Path(cand)):
            continue
        seen.add(cand)
        version = _tool_version(cand)
        if version is not None and version >= MIN_CMAKE:
            return cand
        _log(f"ignoring {cand} (version {version}, need >= {'.'.join(map(str, MIN_CMAKE))})")
    raise RuntimeError(
        "set_kernels: building the CUDA extension needs CMake >= 3.24 "
        "(`pip install cmake`), or set SET_KERNELS_BUILD_CUDA=0 for a pure-Python install"
    )


def find_ninja() -> str | None:
    candidates: list[str] = []
    try:
        import ninja  # the PyPI package, a build requirement

        candidates.append(str(Path(ninja.BIN_DIR) / "ninja"))
    except Exception:
        pass
    candidates += [str(d / "ninja") for d in _script_dirs()]
    which = shutil.which("ninja")
    if which:
        candidates.append(which)
    for cand in candidates:
        if _is_executable(Path(cand)) and _tool_version(cand) is not None:
            return cand
    return None


def cuda_archs() -> str:
    raw = os.environ.get("SET_KERNELS_CUDA_ARCHS", "").strip()
    archs = [a.strip() for a in re.split(r"[;,\s]+", raw) if a.strip()]
    return ";".join(archs) if archs else DEFAULT_ARCHS


def build_jobs(parallel: object) -> int | None:
    """Number of parallel jobs; None lets CMAKE_BUILD_PARALLEL_LEVEL decide."""
    if os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL"):
        return None
    max_jobs = os.environ.get("MAX_JOBS", "").strip()
    if max_jobs.isdigit() and int(max_jobs) > 0:
        return int(max_jobs)
    if isinstance(parallel, int) and not isinstance(parallel, bool) and parallel > 0:
        return parallel
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class CMakeExtension(Extension):
    """An extension whose sources are built by CMake, not by setuptools."""

    def __init__(self, name: str, nvcc: str) -> None:
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    def _cmake_build_dir(self) -> Path:
        """A persistent CMake build folder, so that rebuilds are incremental.

        Editable installs build in a fresh temporary folder each time; the CMake tree goes to
        ``build/cmake.<platform>-<python>`` in the source tree instead (``$SET_KERNELS_BUILD_DIR``
        overrides), or under setuptools' build_temp if the source tree is not writable.
        """
        override = os.environ.get("SET_KERNELS_BUILD_DIR")
        if override:
            return Path(override).resolve()
        import sysconfig

        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        persistent = ROOT / "build" / f"cmake.{tag}"
        try:
            persistent.mkdir(parents=True, exist_ok=True)
            return persistent
        except OSError:
            return Path(self.build_temp).resolve() / "cmake"

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        ext_dir = ext_path.parent
        ext_dir.mkdir(parents=True, exist_ok=True)
        module = ext.name.rsplit(".", 1)[-1]
        suffix = ext_path.name[len(module):]  # e.g. ".cpython-311-x86_64-linux-gnu.so"

        cmake = find_cmake()
        ninja = find_ninja()
        build_type = os.environ.get("SET_KERNELS_BUILD_TYPE") or ("Debug" if self.debug else "Release")
        build_dir = self._cmake_build_dir()

        try:
            import pybind11

            pybind11_dir = pybind11.get_cmake_dir()
        except Exception as exc:  # CMakeLists.txt falls back to `python -m pybind11`
            _log(f"pybind11 not importable ({exc}); CMake will look for it")
            pybind11_dir = None

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs()}",
            f"-DSET_KERNELS_OUTPUT_DIR={ext_dir}",
            f"-DSET_KERNELS_EXT_SUFFIX={suffix}",
        ]
        if pybind11_dir:
            args.append(f"-Dpybind11_DIR={pybind11_dir}")
        generator = None
        if ninja:
            generator = "Ninja"
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        # A CMake cache made by another CMake, generator, compiler or Python cannot be reused.
        # (Output folder, suffix, archs and build type may change: CMake reconfigures for those.)
        fingerprint = {"cmake": cmake, "generator": generator, "nvcc": ext.nvcc,
                       "python": sys.executable, "cmake_args": os.environ.get("CMAKE_ARGS", "")}
        stamp = build_dir / "set_kernels_build.json"
        if (build_dir / "CMakeCache.txt").exists():
            try:
                previous = json.loads(stamp.read_text())
            except (OSError, ValueError):
                previous = None
            if previous != fingerprint:
                _log(f"build configuration changed, starting a clean CMake build in {build_dir}")
                shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        jobs = build_jobs(self.parallel)
        build_cmd = [cmake, "--build", str(build_dir), "--config", build_type, "--parallel"]
        if jobs is not None:
            build_cmd.append(str(jobs))

        _log(f"nvcc={ext.nvcc} cmake={cmake} generator={generator or 'default'} "
             f"archs={cuda_archs()} jobs={jobs or os.environ.get('CMAKE_BUILD_PARALLEL_LEVEL')}")
        try:
            subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
            stamp.write_text(json.dumps(fingerprint))
            subprocess.run(build_cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(
                f"set_kernels: CMake build of {EXT_NAME} failed ({exc}). "
                "Set SET_KERNELS_BUILD_CUDA=0 to install without the CUDA extension."
            ) from exc
        if not ext_path.exists():
            raise RuntimeError(f"set_kernels: CMake finished but {ext_path} was not produced")


class BuildPy(build_py):
    """Drops a stale `_C` binary left by an earlier build when CUDA is not built.

    The copy in build/lib would otherwise end up in a pure-Python wheel; the one in the source
    tree (from an earlier editable install) is removed only by an editable install.
    """

    def run(self) -> None:
        super().run()
        if not BUILD_CUDA:
            folders = [Path(self.build_lib) / "set_kernels"]
            if getattr(self, "editable_mode", False):
                folders.append(ROOT / "set_kernels")
            for folder in folders:
                for stale in folder.glob("_C.*"):
                    if stale.suffix in (".so", ".pyd"):
                        _log(f"removing stale extension {stale} (CUDA build disabled)")
                        stale.unlink()


class SDist(sdist):
    """Ships the CMake/CUDA/binding sources, so that a wheel can be built from the sdist."""

    EXTRA = ("CMakeLists.txt", "setup.py", "csrc/*.cu", "csrc/*.cuh", "csrc/*.h", "csrc/README.md",
             "python/README.md", "python/src/*.cc", "python/src/*.h")

    def make_release_tree(self, base_dir, files) -> None:
        extra = [p.relative_to(ROOT).as_posix() for pattern in self.EXTRA
                 for p in sorted(ROOT.glob(pattern)) if p.is_file()]
        super().make_release_tree(base_dir, list(dict.fromkeys([*files, *extra])))


def _decide() -> tuple[bool, str | None]:
    setting = cuda_build_setting()
    if setting == "0":
        _log("SET_KERNELS_BUILD_CUDA=0: installing pure Python (no set_kernels._C)")
        return False, None
    nvcc = find_nvcc()
    if nvcc is None:
        if setting == "1":
            raise RuntimeError(
                "set_kernels: SET_KERNELS_BUILD_CUDA=1 but nvcc was not found "
                "(looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin)"
            )
        _log("nvcc not found: installing pure Python (no set_kernels._C)")
        return False, None
    return True, nvcc


BUILD_CUDA, NVCC = _decide()

setup(
    ext_modules=[CMakeExtension(EXT_NAME, NVCC)] if BUILD_CUDA else [],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy, "sdist": SDist},
    zip_safe=False,
)
