"""Triton kernel for `noprop::denoise_step` (inference, paper Eq. 3):

z_next[b, j] = a · (act(logits[b]) · W)[j] + b · z_prev[b, j] + sqrt_c · ε[b, j],
act = softmax (SOFTMAX; DT/CT) or the identity (FM's Euler step: a = h, b = 1, sqrt_c = 0),
ε[b, j] = lane j % 4 of tl.randn4x(seed, b·⌈d/4⌉ + j // 4) (int64 counter, one Philox call per four
columns: `_noise.randn_tile`, the eager reference's draws); sqrt_c = 0 skips the noise.

Memory traffic per output element (elt = bytes of z_prev's dtype): reads elt (z_prev), writes elt
(z_next); the logits (B·m) are read once per row block, W (m·d) stays in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import dot_tiles, on_device
from ._noise import randn_tile


@triton.jit
def _denoise_step(logits_ptr, W_ptr, z_ptr, out_ptr, seed_ptr, a, b, sqrt_c, B, m, d,
                  BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SOFTMAX: tl.constexpr):
    # One program: BLOCK_B rows; the softmax is computed once and reused for every d-tile.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cls = tl.arange(0, BLOCK_M).to(tl.int64)
    cls_ok = cls < m
    x = tl.load(logits_ptr + rows[:, None] * m + cls[None, :], mask=row_ok[:, None] & cls_ok[None, :],
                other=0.0).to(tl.float32)
    if SOFTMAX:
        x = tl.where(cls_ok[None, :], x, float("-inf"))  # padded rows load zeros: finite, never NaN
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
    else:
        p = x  # padded classes loaded as 0: they add nothing to p · W
    seed = tl.load(seed_ptr)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        col_ok = cols < d
        mask = row_ok[:, None] & col_ok[None, :]
        Wt = tl.load(W_ptr + cls[:, None] * d + cols[None, :], mask=cls_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
        offs = rows[:, None] * d + cols[None, :]
        zp = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # The noise is drawn before the dot: drawn after it, ptxas (sm_90, bf16, m = 100) kept 32
        # registers and spilled 6.5 KB; this order compiles without spills (fp32, bf16; m = 10, 100; d = 784).
        if sqrt_c != 0.0:
            eps = randn_tile(seed, rows, d, d0, BLOCK_B, BLOCK_D)  # BLOCK_D % 4 == 0
        else:
            eps = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        z = a * tl.dot(p, Wt, input_precision="ieee") + b * zp
        if sqrt_c != 0.0:
            z += sqrt_c * eps
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


def denoise_step(logits, W, z_prev, a: float, b: float, sqrt_c: float, seed, softmax: bool = True):
    """logits: [B, m]; W: [m, d]; z_prev: [B, d]; seed: int64 [1] -> z_next: [B, d] like z_prev."""
    B, m = logits.shape
    d = W.shape[1]
    block_b, block_m, block_d, warps = dot_tiles(B, m, d)
    out = torch.empty_like(z_prev)
    with on_device(z_prev):
        _denoise_step[(triton.cdiv(B, block_b),)](logits, W, z_prev, out, seed, float(a), float(b), float(sqrt_c),
                                                  B, m, d, BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_D=block_d,
                                                  SOFTMAX=bool(softmax), num_warps=warps)
    return out
