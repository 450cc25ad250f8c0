"""Dropout whose masks can be keyed by (training step, block), so that block-parallel training is
reproducible.

torch's nn.Dropout draws from the process-wide generator. When several threads train blocks at once
(engine execution `threads`), they take numbers from it in whatever order the threads happen to run,
so two runs with the same seed would differ. NoProp-DT instead keys each block's masks on CPU: inside
`keyed_masks(key)`, every `Dropout` of this module draws from a generator seeded with `key`, which
the model derives from the step's noise seed and the block index. A block's masks then depend on
neither the thread that runs it nor on which other blocks train in the same step (chunked, lean,
threads and loop steps give the same update). Outside that context (the backprop baselines, CUDA,
stacked `vmap` execution) it is exactly nn.Dropout.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

_local = threading.local()
_MASK64 = (1 << 64) - 1


def block_key(seed: int, block: int) -> int:
    """A 63-bit generator seed for block `block` (1-based) of the step whose noise seed is `seed`
    (a splitmix64 finaliser over both, so neighbouring seeds and blocks give unrelated streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@contextlib.contextmanager
def keyed_masks(key: int | None):
    """Within this context, on this thread, `Dropout` layers on CPU tensors draw their masks from a
    generator seeded with `key` (None: from torch's global generator, as nn.Dropout does)."""
    previous = getattr(_local, "generator", None)
    _local.generator = None if key is None else torch.Generator().manual_seed(key)
    try:
        yield
    finally:
        _local.generator = previous


class Dropout(nn.Dropout):
    """nn.Dropout that draws from the thread's keyed generator when one is set (see module doc).
    Same arguments, state dict and scaling (kept elements are multiplied by 1 / (1 − p))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        generator = getattr(_local, "generator", None)
        if generator is None or not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return x * 0
        # the arithmetic of torch's own CPU dropout: a scaled mask, then one multiply
        scaled_mask = torch.empty_like(x).bernoulli_(1 - self.p, generator=generator).div_(1 - self.p)
        return x.mul_(scaled_mask) if self.inplace else x * scaled_mask
