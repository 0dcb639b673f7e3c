"""What this installation can run, and why not (``sk.info()``, ``set-kernels info``)."""
from __future__ import annotations

import importlib
import platform

from . import backends


def info() -> dict:
    """``{backend: {"available": bool, "reason": str, "devices": [...], "ops": [...]}}``.

    ``reason`` is empty when the backend is available. ``devices`` lists the device types the
    backend serves (``"any"``: every device torch supports). ``ops`` lists the kernels it
    implements. For the cuda backend, ``compiled_archs`` lists the GPU architectures ``_C`` was
    built for (empty when ``_C`` was not built).
    """
    out = {}
    for name in backends.BACKENDS:
        ok, why = backends.availability(name)
        mod = backends.load(name)
        entry = {
            "available": ok,
            "reason": why,
            "devices": list(backends._DEVICES[name] or ("any",)),
            "ops": [op for op in backends.OPS if mod is not None and callable(getattr(mod, op, None))],
        }
        if name == "cuda" and mod is not None:
            entry["compiled_archs"] = list(mod.compiled_archs())
        out[name] = entry
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _extension_line() -> str:
    """Whether ``set_kernels._C`` was built, where, and for which GPU architectures."""
    try:
        ext = importlib.import_module("set_kernels._C")
    except Exception as exc:  # ImportError, or OSError from a broken binary
        return f"_C: not built ({type(exc).__name__}: {exc}); pure-Python install (reinstall with nvcc on PATH)"
    archs = ", ".join(ext.compiled_archs()) or "no GPU architecture"
    return f"_C: built for {archs} ({getattr(ext, '__file__', '?')})"


def _auto_line(torch) -> str:
    """The backend "auto" picks per op on each device type of this machine (fp32)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parts = []
    for dev in devices:
        picks = []
        for op in backends.OPS:
            try:
                picks.append(f"{op}={backends.resolve(None, op, torch.device(dev), torch.float32)}")
            except RuntimeError:
                picks.append(f"{op}=none")
        parts.append(f"{dev}: {', '.join(picks)}")
    return "auto (float32) picks: " + "; ".join(parts)


def format_info() -> str:
    """:func:`info` as readable lines: devices and library versions first, then each backend."""
    import torch

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for lib in ("numba", "triton", "numpy"):
        try:
            versions.append(f"{lib} {importlib.import_module(lib).__version__}")
        except Exception:  # missing, or failing to import on this machine
            versions.append(f"{lib} missing")
    lines = [", ".join(versions), f"cpu: {cpu_model()} ({torch.get_num_threads()} torch threads)"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"gpu {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor}), torch CUDA {torch.version.cuda}")
    else:
        lines.append(f"gpu: none (torch.cuda.is_available() is False; torch built with CUDA {torch.version.cuda})")
    lines.append(_extension_line())
    lines.append("backends [devices they serve]:")
    for name, entry in info().items():
        state = "available" if entry["available"] else f"unavailable: {entry['reason']}"
        extra = f"; _C built for {', '.join(entry['compiled_archs']) or 'nothing'}" if "compiled_archs" in entry else ""
        lines.append(f"  {name:7s} [{', '.join(entry['devices'])}] ops={', '.join(entry['ops']) or '-'}: {state}{extra}")
    lines.append(_auto_line(torch))
    return "\n".join(lines)
