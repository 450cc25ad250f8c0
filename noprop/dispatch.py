"""Backend choice for NoProp's fused ops: the one place that branches on backend.

`NOPROP_BACKEND=auto|triton|cuda|eager` (or `use_backend(...)` in code) picks the backend per call:
- `auto` takes the first backend that can run on the tensors' device (CUDA tensors: triton, then
  the CUDA extension; CPU tensors: eager) and falls back to eager;
- an explicit choice that cannot run raises `BackendUnavailable` with the reason.
The choice looks at the device and at the dtypes of the call's tensors: the Triton kernels compute in
float32, so float64 calls (gradcheck, references) go to eager under `auto` and raise under `triton`.
Availability is probed lazily on first use, never at import, so `import noprop` works on machines
without a GPU, a Triton driver or the CUDA extension.
The op calls are launch-bound, so the choice is made once per (device, dtypes, requested backend,
TRITON_INTERPRET on CPU) and remembered: a later call with the same key costs one cache lookup.
`forget_choices()` drops what was remembered (a late `noprop.kernels.cuda.load()` calls it).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading

import torch

BACKENDS = ("triton", "cuda", "eager")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "eager"), "cpu": ("eager",)}


class _Override(threading.local):
    name = None  # a class default: a thread that never set it reads None without a caught AttributeError


_override = _Override()
# dtypes the Triton kernels do not run, with the reason. The CUDA extension's own table lives beside
# its kernels (noprop.kernels.cuda.UNSUPPORTED_DTYPES; importing that module loads no library).
_TRITON_UNSUPPORTED_DTYPES = {
    torch.float64: "the Triton kernels compute in float32; float64 inputs run on the eager reference",
}


def _unsupported_dtypes(backend: str) -> dict:
    if backend == "cuda":
        return _cuda_extension().UNSUPPORTED_DTYPES
    return _TRITON_UNSUPPORTED_DTYPES if backend == "triton" else {}


@functools.cache
def _cuda_extension():
    """noprop.kernels.cuda, imported on first need (it loads no library), and told to make dispatch
    choose again if its `load()` makes the extension available later."""
    import noprop.kernels.cuda as cuda
    cuda.LOAD_LISTENERS.append(forget_choices)
    return cuda


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


def requested_backend() -> str:
    return _normalized(_override.name or os.environ.get("NOPROP_BACKEND", "auto"))


@functools.lru_cache(maxsize=64)
def _normalized(raw: str) -> str:
    name = raw.strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"NOPROP_BACKEND={name!r} is not one of auto, {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed code with backend `name` (auto, triton, cuda or eager) for this thread."""
    previous = _override.name
    _override.name = name
    try:
        requested_backend()  # validate now, not at the first op call
        yield
    finally:
        _override.name = previous


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
        return None
    except Exception as exc:  # ImportError, or a broken driver raising at import
        return f"triton is not importable ({type(exc).__name__}: {exc})"


def triton_interpreted() -> bool:
    """Whether TRITON_INTERPRET is on (read the way Triton reads it, so "1", "true", "on" all count)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # a Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_reason(device: torch.device) -> str | None:
    err = _triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None
    if device.type == "cpu":
        if not triton_interpreted():
            return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing noprop"
        kernels = sys.modules.get("noprop.kernels.triton")
        if kernels is not None and not getattr(kernels, "INTERPRETED", True):
            return ("noprop.kernels.triton was imported before TRITON_INTERPRET=1 was set, so its kernels are "
                    "compiled for a GPU: set it before importing noprop")
        return None
    return f"Triton has no support for {device.type} tensors here"


def why_unavailable(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None if `backend` can run on `device` (and inputs of `dtype`, when given), else a sentence saying why not."""
    device = torch.device(device)
    if backend == "eager":
        return None
    if backend == "triton":
        reason = _triton_reason(device)
    elif backend == "cuda":
        if device.type != "cuda":
            reason = f"the CUDA extension runs on CUDA tensors only, got {device.type} tensors"
        else:
            reason = _cuda_extension().load_error()
    else:
        raise ValueError(f"unknown backend {backend!r}")
    if reason is None and dtype is not None:
        reason = _unsupported_dtypes(backend).get(dtype)
    return reason


def _why_not(backend: str, device: torch.device, dtypes) -> str | None:
    reason = why_unavailable(backend, device)
    for dt in dtypes:
        reason = reason or why_unavailable(backend, device, dt)
    return reason


def backend_name(device: torch.device, dtypes=()) -> str:
    """The backend that will run an op on `device` (with input `dtypes`) under the current request."""
    return _choose(requested_backend(), torch.device(device), dtypes)


def _choose(want: str, device: torch.device, dtypes) -> str:
    if want != "auto":
        reason = _why_not(want, device, dtypes)
        if reason:
            raise BackendUnavailable(f"NOPROP_BACKEND={want} cannot run on {device}: {reason}")
        return want
    for name in _AUTO_ORDER.get(device.type, ("eager",)):
        if _why_not(name, device, dtypes) is None:
            return name
    return "eager"


_MODULES = {"eager": "noprop.ops.eager", "triton": "noprop.kernels.triton", "cuda": "noprop.kernels.cuda"}


def backend_module(backend: str):
    """The module holding `backend`'s op functions (importing it compiles and loads nothing)."""
    return importlib.import_module(_MODULES[backend])


@functools.lru_cache(maxsize=None)
def _chosen_module(device: torch.device, dtypes: tuple, want: str, interpreted: bool):
    """The module of the backend chosen for this key (a BackendUnavailable is raised, not cached).
    The module rather than the op's function: the function is read from it per call, one attribute
    lookup, so a function replaced on the module (a test's spy) is what runs."""
    floating = sorted({dt for dt in dtypes if dt is not None and dt.is_floating_point}, key=str)
    return backend_module(_choose(want, device, floating))


def forget_choices() -> None:
    """Choose again on the next call: for when availability changed in this process (a backend
    was built or loaded after ops had run)."""
    _chosen_module.cache_clear()


def _runner(op: str, device: torch.device):
    def run(*args):
        # The key: dtypes of every argument (None for non-tensors), the request, and on CPU, where
        # Triton runs only in its interpreter, whether TRITON_INTERPRET is on.
        module = _chosen_module(device, tuple([getattr(a, "dtype", None) for a in args]), requested_backend(),
                                device.type == "cpu" and triton_interpreted())
        if torch.is_autocast_enabled(device.type):
            # The kernels pick their own arithmetic (fp32 accumulation for fp16/bf16/fp32 inputs). Under
            # a bf16 autocast region the torch ops inside a backend (the eager code, the CUDA extension's
            # dW GEMM) would be re-cast to bf16 and mix dtypes, so a backend runs with autocast off.
            with torch.autocast(device.type, enabled=False):
                return getattr(module, op)(*args)
        return getattr(module, op)(*args)

    run.__name__ = run.__qualname__ = op
    return run


_runners: dict = {}


def implementation(op: str, device: torch.device):
    """The function running `op` (e.g. 'local_loss_backward') on `device`: on every call it takes
    the backend chosen for the device, the dtypes of the tensors it gets (float64 -> eager, see
    above) and the current request; a requested backend that cannot run raises BackendUnavailable."""
    try:
        return _runners[op, device]
    except KeyError:
        return _runners.setdefault((op, device), _runner(op, torch.device(device)))
