"""Named ranges for the stages of a training step, and the device sync that timing needs.

The training code marks its stages with `stage(name)`:
  noprop.noise          noise_inject: z_0..z_T for the minibatch (models/dt.py)
  noprop.block_forward  the blocks' forward (DT), or the whole forward + loss of a baseline
  noprop.local_loss     local_loss + CE(head(z_T)) + KL (models/dt.py)
  noprop.backward       the backward pass (training/step.py)
  noprop.optimizer      the AdamW step(s) (training/step.py)
`stage` is a no-op (a nullcontext) unless the torch profiler is running or NVTX ranges were switched
on (`enable_nvtx()`, `noprop profile --nvtx`, or NOPROP_NVTX=1), so ordinary training pays one cheap
check per stage. With NVTX on and a CUDA build, each stage is also a `torch.cuda.nvtx.range`, so
Nsight Systems can filter on the same names. This module sits on the ground floor: models and the
training step import it, and `noprop profile` reads the ranges it leaves in a trace.
"""
from __future__ import annotations

import contextlib
import os

import torch

STAGES = ("noprop.noise", "noprop.block_forward", "noprop.local_loss", "noprop.backward", "noprop.optimizer")
_nvtx = os.environ.get("NOPROP_NVTX", "0").strip().lower() in ("1", "true", "on", "yes")
# Set while a profiler that records every thread runs (kineto's profile_all_threads): it profiles
# through global callbacks, which torch.autograd._profiler_enabled() (per thread) does not report.
_all_threads_profiler = False


def enable_nvtx(on: bool = True) -> None:
    """Emit torch.cuda.nvtx ranges for the stages too (for Nsight), on CUDA builds."""
    global _nvtx
    _nvtx = bool(on)


@contextlib.contextmanager
def all_threads_profiler():
    """Mark the enclosed code as profiled on every thread, so the block threads' stages are recorded."""
    global _all_threads_profiler
    _all_threads_profiler = True
    try:
        yield
    finally:
        _all_threads_profiler = False


def _profiler_on() -> bool:
    if _all_threads_profiler:
        return True
    try:
        return torch.autograd._profiler_enabled()
    except AttributeError:  # a torch without this probe: always record (record_function is cheap)
        return True


@contextlib.contextmanager
def _both(name: str):
    with torch.profiler.record_function(name):
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()


def stage(name: str):
    """Context manager marking one NoProp stage (see the module docstring)."""
    if torch.compiler.is_compiling():  # under torch.compile the compiled graph is what gets profiled
        return contextlib.nullcontext()
    if _nvtx and torch.version.cuda is not None:
        return _both(name)
    if _profiler_on():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU, whose ops return when done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
