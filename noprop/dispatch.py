"""Backend choice for NoProp's fused ops: the one place that branches on backend.

`NOPROP_BACKEND=auto|triton|cuda|eager` (or `use_backend(...)` in code) picks the backend per call:
- `auto` takes the first backend that can run on the tensors' device (CUDA tensors: triton, then
  the CUDA extension; CPU tensors: eager) and falls back to eager;
- an explicit choice that cannot run raises `BackendUnavailable` with the reason.
Availability is probed lazily on first use, never at import, so `import noprop` works on machines
without a GPU, a Triton driver or the CUDA extension.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

import torch

BACKENDS = ("triton", "cuda", "eager")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "eager"), "cpu": ("eager",)}
_override = threading.local()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


def requested_backend() -> str:
    name = getattr(_override, "name", None) or os.environ.get("NOPROP_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"NOPROP_BACKEND={name!r} is not one of auto, {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed code with backend `name` (auto, triton, cuda or eager) for this thread."""
    previous = getattr(_override, "name", None)
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
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on `device`, else a sentence saying why not."""
    device = torch.device(device)
    if backend == "eager":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpreted():
                return None
            return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing noprop"
        return f"Triton has no support for {device.type} tensors here"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension runs on CUDA tensors only, got {device.type} tensors"
        from noprop.kernels.cuda import load_error
        return load_error()
    raise ValueError(f"unknown backend {backend!r}")


def backend_name(device: torch.device) -> str:
    """The backend that will run an op on `device` under the current request."""
    device = torch.device(device)
    want = requested_backend()
    if want != "auto":
        reason = why_unavailable(want, device)
        if reason:
            raise BackendUnavailable(f"NOPROP_BACKEND={want} cannot run on {device}: {reason}")
        return want
    for name in _AUTO_ORDER.get(device.type, ("eager",)):
        if why_unavailable(name, device) is None:
            return name
    return "eager"


_MODULES = {"eager": "noprop.ops.eager", "triton": "noprop.kernels.triton", "cuda": "noprop.kernels.cuda"}


def implementation(op: str, device: torch.device):
    """The function implementing `op` (e.g. 'local_loss_backward') on `device` right now."""
    module = importlib.import_module(_MODULES[backend_name(device)])
    return getattr(module, op)
