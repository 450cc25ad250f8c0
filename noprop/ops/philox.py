"""Counter-based Gaussian noise, bit-compatible with Triton's `tl.randn(seed, offset)`.

Every backend draws ε for element `offset` of an op's noise tensor from the same function of
(seed, offset): Philox-4x32 with 10 rounds keyed by the 64-bit seed, counter (offset_lo,
offset_hi, 0, 0), then Box-Muller on the first two outputs. The eager reference (this file),
the Triton kernels (`tl.randn`) and the CUDA kernels (`kernels/cuda/philox.cuh`) therefore agree on
the noise, so backends are interchangeable mid-training and the backward regenerates exactly the
forward's ε instead of storing it.

This is written with int64 torch ops: a 32x32-bit high product is split in 16-bit halves so
nothing overflows int64.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_INT_TO_UNIT = 4.6566127342e-10  # (2**23 - 1) / 2**23 * 2**-31, as in Triton


def _umulhi(const: int, x: torch.Tensor) -> torch.Tensor:
    """High 32 bits of const * x for const, x < 2**32 (x int64 tensor)."""
    hi, lo = const >> 16, const & 0xFFFF
    return (x * hi + ((x * lo) >> 16)) >> 16


def philox_uint32x2(seed: torch.Tensor, offsets: torch.Tensor):
    """First two Philox-4x32-10 outputs for counters `offsets` (int64), as int64 in [0, 2**32)."""
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    for _ in range(10):
        n0 = _umulhi(_ROUND_B, c2) ^ c1 ^ k0
        n2 = _umulhi(_ROUND_A, c0) ^ c3 ^ k1
        c1 = (c2 * _ROUND_B) & _M32
        c3 = (c0 * _ROUND_A) & _M32
        c0, c2 = n0, n2
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1


def _to_unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Reinterpret as int32, fold negatives with bitwise not, scale into [0, 1).
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, ~signed, signed)
    return folded.to(dtype) * _INT_TO_UNIT


def philox_randn(seed: torch.Tensor, shape, device=None, dtype=torch.float32, start: int = 0) -> torch.Tensor:
    """Standard normal noise of `shape`, element i (row-major) drawn with counter start + i.

    seed: int64 tensor with one element. dtype float32 reproduces Triton's float32 arithmetic;
    float64 gives the same draws with less rounding (the float64 reference).
    """
    device = seed.device if device is None else device
    n = math.prod(shape)
    offsets = torch.arange(start, start + n, device=device, dtype=torch.int64)
    i1, i2 = philox_uint32x2(seed.to(device), offsets)
    u1 = _to_unit(i1, dtype).clamp_min(1.0e-7)
    u2 = _to_unit(i2, dtype)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return (r * torch.cos(2 * math.pi * u2)).reshape(shape)


def new_seed(device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh int64 seed tensor [1] drawn from torch's generator (so torch.manual_seed governs it).

    Drawn on `device`, so a CUDA graph that captures this call draws a new seed on every replay.
    """
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)
