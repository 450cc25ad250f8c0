"""Triton kernels for `noprop::noise_inject` and its backward.

Forward, z[k, b, j] = sqrt_abar[k(, b)] · W[y_b, j] + sqrt_one_minus_abar[k(, b)] · ε[k, b, j],
with ε[k, b, j] = lane j % 4 of tl.randn4x(seed, (k·B + b)·Q + j // 4), Q = ⌈d/4⌉ (int64 counter; one
Philox call per four columns, `_noise.randn_tile`), exactly the eager reference's draws
(`noprop/ops/philox.py`). ε is never stored: the backward regenerates it from the seed.

Grid of the forward: (B tiles, d tiles, runs of k). A program handles its (b, j) tile for the
blocks k in [run·k_per_run, min(K, (run + 1)·k_per_run)), reusing the gathered W[y] tile across its
run. The host picks the runs (`_k_runs`): one run (the W[y] tile reused for all K) when the (b, j)
tiles alone make `_TARGET_PROGRAMS` programs, else K cut into enough runs to get near that many
(B·d small: B = 1, or B = 128 with d = 10, is one tile, and one program looping over all K left the
GPU idle). The analogue of the CUDA kernel's `k_per_thread_for`. k_per_run is a runtime argument:
no recompile per value. Each element's noise counter depends on (k, b, j) only, not on the runs.

Memory traffic per output element (elt = bytes of W's dtype, d >= a few):
  forward   reads ~elt / k_per_run (the gathered row W[y_b] is loaded once per tile and run and reused
            for the run's blocks; W is m·d, L2-resident), writes elt
                                                      -> K·B·d·elt bytes written (+ runs·B·d·elt read)
  backward  reads elt of grad_z, writes 4·B·d (the fp32 per-sample sum h = Σ_k sqrt_abar·grad_z,
            1/K of the grad_z traffic) and reads it back once for the per-class reduction into dW.
            Its grid stays (B tiles, d tiles) with all K in a program, so it has the forward's old
            shortage of programs at small B·d; splitting k there would need h reduced across runs
            (a [runs, B, d] partial summed in a fixed order, not atomics, to stay deterministic).
The per-class reduction is a one-hot matmul (deterministic, no atomics): dW = onehot(y)ᵀ · h.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_device, pow2
from ._noise import randn_tile

_TILE_ELEMENTS = 4096  # elements per program for the elementwise kernels: 16 per thread at 8 warps
_WARPS = 8  # 4 warps needed ~254 registers per thread for the backward's Philox + accumulators (sm_90)


@triton.jit
def _noise_inject_fwd(W_ptr, y_ptr, sa_ptr, s1m_ptr, seed_ptr, z_ptr,
                      K, B, d, m, sa_sk, sa_sb, s1m_sk, s1m_sb, K_PER_RUN,
                      BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program: a BLOCK_B x BLOCK_D tile of (b, j) for the blocks k of its run (axis 2), the
    # W[y] tile loaded once and reused for each. K_PER_RUN is runtime (not constexpr): no recompiles.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    j0 = tl.program_id(1).to(tl.int64) * BLOCK_D  # the tile's first column: a multiple of 4 (whole quads)
    cols = j0 + tl.arange(0, BLOCK_D).to(tl.int64)
    k0 = tl.program_id(2).to(tl.int64) * K_PER_RUN  # int64: k·B and k·sa_sk may pass 2**31
    k_end = tl.minimum(k0 + K_PER_RUN, K)  # the last run may be shorter
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < d)[None, :]
    lab = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    lab = tl.minimum(tl.maximum(lab, 0), m - 1)  # the op checked labels; never read out of bounds anyway
    u = tl.load(W_ptr + lab[:, None] * d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    for k in range(k0, k_end):
        sa = tl.load(sa_ptr + k * sa_sk + rows * sa_sb, mask=row_ok, other=0.0).to(tl.float32)
        s1m = tl.load(s1m_ptr + k * s1m_sk + rows * s1m_sb, mask=row_ok, other=0.0).to(tl.float32)
        offs = (rows + k * B)[:, None] * d + cols[None, :]  # int64: K·B·d may pass 2**31
        eps = randn_tile(seed, rows + k * B, d, j0, BLOCK_B, BLOCK_D)
        z = sa[:, None] * u + s1m[:, None] * eps
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_inject_bwd_rows(g_ptr, W_ptr, y_ptr, sa_ptr, seed_ptr, h_ptr, dsa_ptr, ds1m_ptr,
                           K, B, d, m, sa_sk, sa_sb,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # h[b, j] = Σ_k sa[k, b]·g[k, b, j] (fp32), and per d-tile partial row sums
    # dsa[tile, k, b] = Σ_j g·W[y_b], ds1m[tile, k, b] = Σ_j g·ε (ε regenerated from the seed).
    pid_d = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    j0 = pid_d * BLOCK_D
    cols = j0 + tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < d)[None, :]
    lab = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    lab = tl.minimum(tl.maximum(lab, 0), m - 1)
    u = tl.load(W_ptr + lab[:, None] * d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    h = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for k in range(K):
        offs = (rows + k * B)[:, None] * d + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sa = tl.load(sa_ptr + k * sa_sk + rows * sa_sb, mask=row_ok, other=0.0).to(tl.float32)
        h += sa[:, None] * g
        eps = randn_tile(seed, rows + k * B, d, j0, BLOCK_B, BLOCK_D)  # g is 0 where masked
        part = (pid_d * K + k) * B + rows
        tl.store(dsa_ptr + part, tl.sum(g * u, axis=1), mask=row_ok)
        tl.store(ds1m_ptr + part, tl.sum(g * eps, axis=1), mask=row_ok)
    tl.store(h_ptr + rows[:, None] * d + cols[None, :], h, mask=mask)


@triton.jit
def _sum_rows_by_label(h_ptr, y_ptr, dW_ptr, B, d, m,
                       BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # dW[c, j] = Σ_{b: y_b = c} h[b, j] as onehot[BLOCK_M, BLOCK_B] @ h[BLOCK_B, BLOCK_D], walking
    # the batch in a fixed order: deterministic. A label outside [0, m) matches no class.
    cls = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    col_ok = cols < d
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        row_ok = rows < B
        lab = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        onehot = (lab[None, :] == cls[:, None]).to(tl.float32)
        hb = tl.load(h_ptr + rows[:, None] * d + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(onehot, hb, input_precision="ieee")  # ieee: tf32 would round h to 10 bits
    tl.store(dW_ptr + cls[:, None] * d + cols[None, :], acc.to(dW_ptr.dtype.element_ty),
             mask=(cls < m)[:, None] & col_ok[None, :])


def _strides(coef: torch.Tensor, B: int) -> tuple[int, int]:
    """(stride over k, stride over b) of a [K] or [K, B] coefficient (contiguous, checked by the op)."""
    return (1, 0) if coef.ndim == 1 else (B, 1)


def _tiles(B: int, d: int) -> tuple[int, int]:
    block_d = pow2(d, lo=4, hi=256)  # whole quads: tiles start at multiples of 4 columns
    return pow2(B, hi=max(1, _TILE_ELEMENTS // block_d)), block_d


# Programs the forward aims for: 4 per SM on an H100 (132 SMs) at 8 warps = 2**17 threads, the CUDA
# kernel's target (`k_per_thread_for`). Tests lower it to split K at interpreter-sized shapes.
_TARGET_PROGRAMS = 512


def _k_runs(K: int, n_tiles: int, target: int | None = None) -> tuple[int, int]:
    """(k_per_run, runs) for the forward's third grid axis: as many runs (at most K) as bring the
    n_tiles (b, j) tiles up to `target` programs (default `_TARGET_PROGRAMS`), one run when the tiles
    alone reach it (the W[y] tile then serves all K blocks). runs = ⌈K / k_per_run⌉: none is empty."""
    target = _TARGET_PROGRAMS if target is None else target
    runs = max(1, min(K, triton.cdiv(target, max(1, n_tiles))))
    k_per_run = max(1, triton.cdiv(K, runs))
    return k_per_run, max(1, triton.cdiv(K, k_per_run))


def noise_inject(W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    """W: [m, d]; y: [B]; coefficients [K] or [K, B]; seed: int64 [1] -> z: [K, B, d] in W's dtype."""
    (m, d), B, K = W.shape, y.shape[0], sqrt_abar.shape[0]
    z = torch.empty((K, B, d), dtype=W.dtype, device=W.device)
    block_b, block_d = _tiles(B, d)
    tiles = (triton.cdiv(B, block_b), triton.cdiv(d, block_d))
    k_per_run, runs = _k_runs(K, tiles[0] * tiles[1])
    with on_device(W):
        _noise_inject_fwd[(*tiles, runs)](W, y, sqrt_abar, sqrt_one_minus_abar, seed, z, K, B, d, m,
                                          *_strides(sqrt_abar, B), *_strides(sqrt_one_minus_abar, B), k_per_run,
                                          BLOCK_B=block_b, BLOCK_D=block_d, num_warps=_WARPS)
    return z


def noise_inject_backward(grad_z, W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    """grad_z: [K, B, d] -> (dW [m, d] like W, d_sqrt_abar like sqrt_abar, d_sqrt_one_minus_abar like it)."""
    K, B, d = grad_z.shape
    m = W.shape[0]
    dev = W.device
    block_b, block_d = _tiles(B, d)
    n_dtiles = triton.cdiv(d, block_d)
    h = torch.empty((B, d), dtype=torch.float32, device=dev)
    dsa = torch.empty((n_dtiles, K, B), dtype=torch.float32, device=dev)
    ds1m = torch.empty((n_dtiles, K, B), dtype=torch.float32, device=dev)
    dW = torch.empty_like(W)
    red_m, red_d = pow2(m, lo=16, hi=128), pow2(d, lo=16, hi=32)
    with on_device(W):
        _noise_inject_bwd_rows[(triton.cdiv(B, block_b), n_dtiles)](
            grad_z, W, y, sqrt_abar, seed, h, dsa, ds1m, K, B, d, m, *_strides(sqrt_abar, B),
            BLOCK_B=block_b, BLOCK_D=block_d, num_warps=_WARPS)
        _sum_rows_by_label[(triton.cdiv(m, red_m), triton.cdiv(d, red_d))](
            h, y, dW, B, d, m, BLOCK_M=red_m, BLOCK_B=32, BLOCK_D=red_d, num_warps=4 if red_m <= 32 else 8)
    # Partials over d-tiles (and over the batch for [K] coefficients) are summed in a fixed order.
    d_sa, d_s1m = dsa.sum(0), ds1m.sum(0)  # [K, B]
    if sqrt_abar.ndim == 1:
        d_sa = d_sa.sum(1)
    if sqrt_one_minus_abar.ndim == 1:
        d_s1m = d_s1m.sum(1)
    return dW, d_sa.to(sqrt_abar.dtype), d_s1m.to(sqrt_one_minus_abar.dtype)
