"""Input checks shared by the models: wrong image shapes get a message, not a conv error."""
from __future__ import annotations

import torch


def check_images(x: torch.Tensor, input_shape: tuple[int, ...] | None) -> None:
    """Raise ValueError unless x is a non-empty batch [B, *input_shape] (when the shape is known)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("the batch is empty: images need shape [B, ...] with B >= 1")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        want = ", ".join(map(str, input_shape))
        raise ValueError(f"this model expects images of shape [B, {want}] (channels, height, width), "
                         f"got {list(x.shape)}")


def check_runs(runs: int) -> None:
    """Raise ValueError unless runs (stochastic inference chains averaged per image) is >= 1.

    The message names both spellings: `runs=` of predict / predict_proba / training.evaluate, and
    --eval-runs of `noprop train` / `noprop eval`, which passes it on."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs} (the number of stochastic inference chains averaged per "
                         "image: runs= in Python, --eval-runs on the command line)")
