"""Devices (and CPU threads) a command is asked to run on: checked up front, so a missing GPU is one
clear sentence before any work starts, not a driver traceback from the middle of model.to(device)."""
from __future__ import annotations

import torch

from noprop.options import check_minimum


def usable_device(spec, flag: str = "--device") -> torch.device:
    """torch.device(spec) if this machine can run on it, else ValueError saying why.

    spec: "cpu", "cuda", "cuda:1", a torch.device, ... `flag` names the option in the message.
    """
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {spec!r} is not a device torch knows; use cpu or cuda[:N]") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None else
                   f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU or driver")
            raise ValueError(f"{flag} {spec}: no CUDA device visible to torch ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {spec}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():  # the eager backend runs there
        return device
    raise ValueError(f"{flag} {spec}: noprop runs on cpu and cuda (and mps where torch has it), and this machine "
                     f"offers no {device.type} device; use --device cpu")


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    """ValueError unless `threads` is None (torch's own count) or >= 1: the one check of --threads for
    every command (set_threads, and bench, which sets the count later, in each case's process)."""
    if threads is not None:
        check_minimum(flag, threads, 1)


def set_threads(threads: int | None, flag: str = "--threads") -> None:
    """torch.set_num_threads(threads) after check_threads; None keeps torch's own count."""
    check_threads(threads, flag)
    if threads is not None:
        torch.set_num_threads(threads)
