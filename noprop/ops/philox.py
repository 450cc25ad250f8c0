"""Counter-based Gaussian noise, bit-compatible with Triton's `tl.randn4x(seed, offset)`.

Every backend draws an op's noise tensor from the same function of (seed, position). The tensor is
viewed as rows x d (its last dimension is d, the rows are all the other dimensions, row-major) and
each row is cut into Q = ceil(d / 4) quads of four columns (the last one padded). Element (r, j)
is output lane j % 4 of the Philox counter r·Q + j // 4:

  Philox-4x32 with 10 rounds, key (seed_lo32, seed_hi32), counter (c_lo32, c_hi32, 0, 0) gives four
  uint32 x0..x3; each is bit-cast to int32, negatives folded with ~x and scaled by 4.6566127342e-10
  into u0..u3 in [0, 1); Box-Muller on the pairs (u0, u1) and (u2, u3), u0 and u2 clamped to >= 1e-7:
    lane 0 = r01·cos(2π·u1), lane 1 = r01·sin(2π·u1), r01 = sqrt(-2·log(max(u0, 1e-7)))
    lane 2 = r23·cos(2π·u3), lane 3 = r23·sin(2π·u3), r23 = sqrt(-2·log(max(u2, 1e-7)))

which is exactly Triton's `randn4x` (outputs n1..n4 = lanes 0..3). One Philox call thus serves four
neighbouring elements of a row. The eager reference (this file), the Triton kernels (`tl.randn4x`)
and the CUDA kernels (`kernels/cuda/philox.cuh`) agree on the noise, so backends are interchangeable
mid-training and the backward regenerates exactly the forward's ε instead of storing it.

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
_TWO_PI = 6.283185307179586  # as in Triton's pair_uniform_to_normal
_MIN_UNIT = 1.0e-7  # Box-Muller's radius input is clamped to >= this (Triton's constant)


def _umulhi(const: int, x: torch.Tensor) -> torch.Tensor:
    """High 32 bits of const * x for const, x < 2**32 (x int64 tensor)."""
    hi, lo = const >> 16, const & 0xFFFF
    return (x * hi + ((x * lo) >> 16)) >> 16


def philox_uint32x4(seed: torch.Tensor, counters: torch.Tensor):
    """The four Philox-4x32-10 outputs for counters `counters` (int64), as int64 in [0, 2**32)."""
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = counters & _M32
    c1 = (counters >> 32) & _M32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    for _ in range(10):
        n0 = _umulhi(_ROUND_B, c2) ^ c1 ^ k0
        n2 = _umulhi(_ROUND_A, c0) ^ c3 ^ k1
        c1 = (c2 * _ROUND_B) & _M32
        c3 = (c0 * _ROUND_A) & _M32
        c0, c2 = n0, n2
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uint_to_unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint32 draws (int64 tensor) -> [0, 1) as Triton's uint_to_uniform_float."""
    # Reinterpret as int32, fold negatives with bitwise not, scale into [0, 1).
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, ~signed, signed)
    return folded.to(dtype) * _INT_TO_UNIT


def _box_muller(ua: torch.Tensor, ub: torch.Tensor):
    """Triton's pair_uniform_to_normal: (r·cos θ, r·sin θ), r = sqrt(-2·log(max(ua, 1e-7))), θ = 2π·ub."""
    ua = ua.clamp_min(_MIN_UNIT)
    th = _TWO_PI * ub
    r = torch.sqrt(-2.0 * torch.log(ua))
    return r * torch.cos(th), r * torch.sin(th)


def philox_randn4x(seed: torch.Tensor, counters: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Triton's randn4x(seed, counters): [*counters.shape, 4], lane l = Triton's output n{l+1}."""
    x0, x1, x2, x3 = philox_uint32x4(seed.to(counters.device), counters)
    n0, n1 = _box_muller(uint_to_unit(x0, dtype), uint_to_unit(x1, dtype))
    n2, n3 = _box_muller(uint_to_unit(x2, dtype), uint_to_unit(x3, dtype))
    return torch.stack((n0, n1, n2, n3), dim=-1)


def quads(d: int) -> int:
    """Philox counters per row of d columns: Q = ceil(d / 4)."""
    return (d + 3) // 4


def philox_randn(seed: torch.Tensor, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` (last dimension d, rows = the product of the others):
    element (r, j) is lane j % 4 of counter r·quads(d) + j // 4 (see the module docstring).

    seed: int64 tensor with one element. dtype float32 reproduces Triton's float32 arithmetic;
    float64 gives the same draws with less rounding (the float64 reference).
    """
    device = seed.device if device is None else device
    shape = tuple(shape)
    d = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if shape else 1
    q = quads(d)
    counters = torch.arange(rows * q, device=device, dtype=torch.int64)
    n = philox_randn4x(seed, counters, dtype).reshape(rows, 4 * q)[:, :d]
    return n.reshape(shape)


def new_seed(device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh int64 seed tensor [1] drawn from torch's generator (so torch.manual_seed governs it).

    Drawn on `device`, so a CUDA graph that captures this call draws a new seed on every replay.
    """
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)
