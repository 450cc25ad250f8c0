"""Checkpoints: atomic save (noprop.atomic: temp file + fsync + rename), safe and validated load.

An interrupted save never leaves a truncated checkpoint behind: the previous file stays intact
until the new one is completely on disk. Loading uses `torch.load(weights_only=True)`, which
rebuilds only tensors and plain containers and runs no code from the file; every checkpoint noprop
writes loads that way. A file that needs full unpickling (one written by other code) is refused
unless the caller says the file is trusted (`trusted=True`, `--trust-checkpoint`).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from noprop.atomic import write_atomically
from noprop.messages import first_line

FORMAT = "noprop-checkpoint-v1"
TRUST_FLAG = "--trust-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or not a noprop checkpoint; the message says which."""


def save(state: dict, path: str | os.PathLike) -> Path:
    """Write `state` (plus a format tag) to `path` atomically; returns the path. A write that fails
    (disk full, a file-size limit, a read-only folder) raises CheckpointError and leaves the
    previous checkpoint as it was."""
    try:
        return write_atomically(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise CheckpointError(f"could not write checkpoint {path} ({reason}); the previous checkpoint there, if "
                              "any, is intact") from None


def load(path: str | os.PathLike, map_location="cpu", trusted: bool = False) -> dict:
    """Read a checkpoint written by `save`, or raise CheckpointError saying what is wrong.

    trusted=True unpickles in full (weights_only=False), which can run code stored in the file:
    only for files from a source you trust that hold more than tensors and plain containers."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory, not a file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if trusted or wanted is None:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})") from None
        raise CheckpointError(f"checkpoint {path} asks to rebuild {wanted.group(1)}, more than tensors and plain "
                              f"containers, and loading it could run code stored in the file; if you trust where "
                              f"it came from, pass {TRUST_FLAG} (trusted=True in Python)") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a noprop checkpoint (expected format {FORMAT!r})")
    return state
