"""Checkpoints: atomic save (noprop.atomic: temp file + fsync + rename), validated load.

An interrupted save never leaves a truncated checkpoint behind: the previous file stays intact
until the new one is completely on disk.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from noprop.atomic import write_atomically

FORMAT = "noprop-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a noprop checkpoint; the message says which."""


def save(state: dict, path: str | os.PathLike) -> Path:
    """Write `state` (plus a format tag) to `path` atomically; returns the path."""
    return write_atomically(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by `save`, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory, not a file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a noprop checkpoint (expected format {FORMAT!r})")
    return state
