"""`noprop profile`: torch.profiler over a few training steps, with NoProp's stages as named ranges.

The training code marks its stages with `stage(name)`:
  noprop.noise          noise_inject: z_0..z_T for the minibatch (models/dt.py)
  noprop.block_forward  the blocks' forward (DT), or the whole forward + loss of a baseline
  noprop.local_loss     local_loss + CE(head(z_T)) + KL (models/dt.py)
  noprop.backward       loss.backward() (training.py)
  noprop.optimizer      the AdamW step(s) (training.py)
`stage` is a no-op (a nullcontext) unless the torch profiler is running or NVTX ranges were switched
on (`enable_nvtx()`, `noprop profile --nvtx`, or NOPROP_NVTX=1), so ordinary training pays nothing
but one cheap check per stage. With NVTX on and a CUDA build, each stage is also a
`torch.cuda.nvtx.range`, so Nsight Systems can filter on the same names.

Output: a Chrome trace (DIR/trace.json, open in chrome://tracing or ui.perfetto.dev), a per-op table
(time and memory, key_averages with profile_memory=True) and a per-stage table on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch

STAGES = ("noprop.noise", "noprop.block_forward", "noprop.local_loss", "noprop.backward", "noprop.optimizer")
_nvtx = os.environ.get("NOPROP_NVTX", "0").strip().lower() in ("1", "true", "on", "yes")


def enable_nvtx(on: bool = True) -> None:
    """Emit torch.cuda.nvtx ranges for the stages too (for Nsight), on CUDA builds."""
    global _nvtx
    _nvtx = bool(on)


def _profiler_on() -> bool:
    try:
        return torch.autograd._profiler_enabled()
    except AttributeError:  # very old or very new torch: always record (record_function is cheap)
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
    if _nvtx and torch.version.cuda is not None:
        return _both(name)
    if _profiler_on():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
