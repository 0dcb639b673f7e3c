"""Backend registry and dispatch: by device, then by backend.

Each backend is a module exposing ``availability() -> (bool, reason)``, ``SUPPORTED_DTYPES`` and
the op functions it implements (``linear_forward``, ``linear_grad_input``, ``linear_grad_weight``, ``masked_adam_``), and
optionally ``BLOCK_SIZES`` (the matmul block sizes it serves; all of them when absent) and
``linear_backward`` (both gradients of the forward in one call, used by eager backward passes). The
dispatcher collects, for a requested (backend, op, device, dtype), every reason the backend cannot
run it; ``"auto"`` takes the first backend in the device's preference order whose list is empty,
and an explicit request with a non-empty list raises ``RuntimeError`` listing the reasons.

The custom ops take no backend argument: their CPU and CUDA kernels call :func:`choose` when they
run (the innermost :func:`use` block, else ``$SET_KERNELS_BACKEND``, else auto), so compiled and
exported graphs record none. Availability is cached; :func:`clear_cache` forgets it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

import torch

from .._checks import check_choice

BACKENDS = ("triton", "cuda", "numba", "torch")
_MODULES = {
    "triton": "set_kernels.backends.triton",
    "cuda": "set_kernels.backends.cuda",
    "numba": "set_kernels.backends.numba",
    "torch": "set_kernels.backends.torch_ref",
}
# Devices each backend can serve; "torch" serves any device torch does. A backend module's own
# ``DEVICES`` attribute wins (triton runs CPU tensors only under TRITON_INTERPRET=1, for tests).
_DEVICES = {"triton": ("cuda",), "cuda": ("cuda",), "numba": ("cpu",), "torch": None}
# "auto" preference per device type, fastest first.
AUTO_ORDER = {"cpu": ("numba", "torch"), "cuda": ("triton", "cuda", "torch")}
OPS = ("linear_forward", "linear_grad_input", "linear_grad_weight", "masked_adam_")
ENV_VAR = "SET_KERNELS_BACKEND"

_loaded: dict[str, object] = {}


def load(name: str):
    """The backend module, or None when it is not part of this installation."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            if not callable(getattr(mod, "availability", None)):  # e.g. an empty namespace folder
                raise ImportError(f"{_MODULES[name]} defines no availability()")
            _loaded[name] = mod
        except ImportError as exc:  # a backend missing from this build
            _loaded[name] = exc
    mod = _loaded[name]
    return None if isinstance(mod, ImportError) else mod


def availability(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on this machine at all, and why not."""
    mod = load(name)
    if mod is None:
        return False, f"the {name} backend is not part of this build ({_loaded[name]})"
    return mod.availability()


def unsupported_reasons(name: str, op: str, device: torch.device, dtype: torch.dtype,
                        block_size: int | None = None) -> list[str]:
    """Every reason backend ``name`` cannot run ``op`` on (device, dtype[, block_size]); empty when it can.

    Cached per (backend, op, device type, dtype, block size): availability does not change while
    a process runs. :func:`clear_cache` forgets it (tests that patch a backend call it).
    """
    return list(_reasons(name, op, torch.device(device).type, dtype, block_size))


@functools.lru_cache(maxsize=None)
def _reasons(name: str, op: str, device_type: str, dtype: torch.dtype, block_size) -> tuple:
    device = torch.device(device_type)
    ok, why = availability(name)
    if not ok:
        return [why]
    reasons = []
    mod = load(name)
    if not callable(getattr(mod, op, None)):
        reasons.append(f"it does not implement {op} yet")
    # A backend module may declare its devices itself (triton: cuda, or cpu when interpreting).
    devices = getattr(mod, "DEVICES", _DEVICES[name])
    if devices is not None and device.type not in devices:
        reasons.append(f"it runs on {', '.join(devices)} tensors, not {device.type}")
    if dtype not in mod.SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in mod.SUPPORTED_DTYPES)
        reasons.append(f"it supports dtypes {names}, not {str(dtype).replace('torch.', '')}")
    sizes = getattr(mod, "BLOCK_SIZES", None)
    if block_size is not None and sizes is not None and block_size not in sizes:
        reasons.append(f"it supports block sizes {', '.join(map(str, sizes))}, not {block_size}"
                       + (" (element sparsity)" if block_size == 1 else ""))
    return tuple(reasons)


def clear_cache() -> None:
    """Forget the cached availability of every backend (after patching or installing one)."""
    _reasons.cache_clear()
    _resolve_cached.cache_clear()
    _resolve_auto.cache_clear()


_selected = threading.local()


@contextlib.contextmanager
def use(backend):
    """Run the ops called inside the block with ``backend`` (a name, or None/"auto").

    This is how the backend is chosen at run time, also inside ``torch.compile``d or
    ``torch.export``ed graphs, which record no backend: their ops pick one when they run. It
    wins over ``$SET_KERNELS_BACKEND``; an op's or layer's own ``backend=`` wins over it in eager
    calls (the public ops enter this context with it). Per thread; blocks nest.
    """
    if backend is not None:
        check_choice("backend", backend, BACKENDS + ("auto",))
    previous = getattr(_selected, "name", None)
    _selected.name = backend
    try:
        yield
    finally:
        _selected.name = previous


def selected() -> str | None:
    """The backend chosen by the innermost :func:`use` block of this thread, or None."""
    return getattr(_selected, "name", None)


def choose(op: str, device: torch.device, dtype: torch.dtype, block_size: int | None = None) -> str:
    """The backend an op runs with now: :func:`use`, else ``$SET_KERNELS_BACKEND``, else auto.

    Called by the ops' device kernels on every call; cached, so it costs a dict lookup.
    """
    return _resolve_auto(selected(), os.environ.get(ENV_VAR, ""), op, device.type, dtype, block_size)


def resolve_named(backend: str, op: str, device: torch.device, dtype: torch.dtype, block_size: int | None = None) -> str:
    """:func:`resolve` for a backend named explicitly (neither None nor "auto"), cached: a named
    backend does not depend on :func:`use` or ``$SET_KERNELS_BACKEND``."""
    if not isinstance(backend, str):
        return resolve(backend, op, device, dtype, block_size)  # raises, naming the argument
    return _resolve_cached(backend, op, device.type, dtype, block_size)


@functools.lru_cache(maxsize=None)
def _resolve_cached(backend, op, device_type, dtype, block_size) -> str:
    return resolve(backend, op, torch.device(device_type), dtype, block_size)


@functools.lru_cache(maxsize=None)
def _resolve_auto(selected_name, env, op, device_type, dtype, block_size) -> str:
    # resolve(None) reads the use() block and $SET_KERNELS_BACKEND itself (both are in the key),
    # so that its errors name where the choice came from
    return resolve(None, op, torch.device(device_type), dtype, block_size)


def resolve(backend, op: str, device: torch.device, dtype: torch.dtype, block_size: int | None = None) -> str:
    """Pick the backend name for ``op`` on (device, dtype), for a matmul also on ``block_size``.

    ``backend`` is None/"auto" (then the :func:`use` block, or else ``$SET_KERNELS_BACKEND``,
    decides when set and not "auto") or a name in :data:`BACKENDS`. Raises ValueError for an
    unknown name and RuntimeError, with every reason, when the requested backend cannot run the op.
    """
    source = "backend"
    if backend is None or backend == "auto":
        ctx = selected()
        env = os.environ.get(ENV_VAR, "").strip()
        if ctx is not None and ctx != "auto":
            backend, source = ctx, "set_kernels.backends.use"
        elif env and env != "auto":
            backend, source = env, f"${ENV_VAR}"
    if backend is None or backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if not unsupported_reasons(name, op, device, dtype, block_size):
                return name
        raise RuntimeError(f"no backend can run {op} on {device.type} {dtype}: "
                           + _all_reasons(op, device, dtype, block_size))
    check_choice(source, backend, BACKENDS + ("auto",))
    reasons = unsupported_reasons(backend, op, device, dtype, block_size)
    if reasons:
        raise RuntimeError(
            f"{source}={backend!r} cannot run {op} on {device.type} {dtype}: " + "; ".join(reasons)
        )
    return backend


def _all_reasons(op, device, dtype, block_size=None) -> str:
    return "; ".join(f"{n}: {', '.join(unsupported_reasons(n, op, device, dtype, block_size))}" for n in BACKENDS)


def get(name: str):
    """The loaded module of an available backend (after :func:`resolve`)."""
    mod = load(name)
    if mod is None:
        raise RuntimeError(availability(name)[1])
    return mod
from ._precision import fp32_precision, set_fp32_precision  # noqa: E402,F401  (fp32 matmul precision of the GPU backends)
