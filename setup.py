"""Builds the CUDA extension ``set_kernels._C`` with CMake (the standard pybind11 + CMake pattern).

Metadata lives in pyproject.toml, the build definition in CMakeLists.txt.

* ``_C`` is built when ``nvcc`` is found ($CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin);
  without it the install is pure Python. ``SET_KERNELS_BUILD_CUDA=0`` skips the build,
  ``SET_KERNELS_BUILD_CUDA=1`` makes a missing nvcc an error.
* ``SET_KERNELS_CUDA_ARCHS`` chooses the GPU architectures (default ``80;90``).
* ``MAX_JOBS`` / ``CMAKE_BUILD_PARALLEL_LEVEL`` set the build jobs (default: all CPUs);
  ``CMAKE_ARGS`` adds CMake arguments. The CMake tree stays in ``build/cmake.<platform>-<python>``,
  so that rebuilds (editable ones too) are incremental.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    homes = [os.environ.get(var) for var in ("CUDA_HOME", "CUDA_PATH")]
    candidates = [Path(h, "bin", "nvcc") for h in homes if h] + [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((str(c) for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


class CMakeExtension(Extension):
    def __init__(self, name, nvcc):
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import cmake  # PyPI packages, declared in pyproject.toml [build-system]
        import ninja
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        archs = re.sub(r"[,\s]+", ";", os.environ.get("SET_KERNELS_CUDA_ARCHS", "").strip()) or "80;90"
        build_type = "Debug" if self.debug else "Release"
        build_dir = ROOT / "build" / f"cmake.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        exe = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        configure = [
            exe, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSET_KERNELS_OUTPUT_DIR={ext_path.parent}",
            f"-DSET_KERNELS_EXT_SUFFIX={ext_path.name[len('_C'):]}",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        build = [exe, "--build", str(build_dir), "--config", build_type]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build += ["--parallel", str(os.environ.get("MAX_JOBS") or self.parallel or os.cpu_count() or 1)]
        print(f"set_kernels setup: building _C with {ext.nvcc} for archs {archs}", file=sys.stderr)
        subprocess.run(configure, check=True)
        subprocess.run(build, check=True)


setting = os.environ.get("SET_KERNELS_BUILD_CUDA", "").strip().lower()
NVCC = None if setting in ("0", "false", "off", "no") else find_nvcc()
if NVCC is None:
    if setting in ("1", "true", "on", "yes"):
        raise RuntimeError("set_kernels: SET_KERNELS_BUILD_CUDA=1 but nvcc was not found")
    print("set_kernels setup: no nvcc or SET_KERNELS_BUILD_CUDA=0: pure Python, no _C", file=sys.stderr)

setup(
    ext_modules=[CMakeExtension("set_kernels._C", NVCC)] if NVCC else [],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
