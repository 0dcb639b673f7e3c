"""What this installation can run, and why not."""
from __future__ import annotations

from . import backends


def info() -> dict:
    """``{backend: {"available": bool, "reason": str, "devices": [...], "ops": [...]}}``.

    ``reason`` is empty when the backend is available. ``ops`` lists the ops it implements.
    For the cuda backend, ``compiled_archs`` lists the GPU architectures ``_C`` was built for.
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


def format_info() -> str:
    """:func:`info` as readable lines, with the device and library versions first."""
    import platform

    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    for lib in ("numba", "triton", "numpy"):
        try:
            lines[0] += f", {lib} {__import__(lib).__version__}"
        except ImportError:
            lines[0] += f", {lib} missing"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"cpu: {platform.processor() or platform.machine()}; gpu: {gpu}")
    for name, entry in info().items():
        state = "available" if entry["available"] else f"unavailable: {entry['reason']}"
        extra = f"; built for {', '.join(entry['compiled_archs']) or 'nothing'}" if "compiled_archs" in entry else ""
        lines.append(f"  {name:7s} [{', '.join(entry['devices'])}] ops={', '.join(entry['ops']) or '-'}: {state}{extra}")
    return "\n".join(lines)
