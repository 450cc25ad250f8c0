"""Triton kernels for `noprop::local_loss` and its backward.

loss[k] = (1/B) Σ_b w[k(, b)] · ‖p[k, b] · W − W[y_b] + offset[b]‖²  (sum over d),
p = softmax(logits[k, b]) (SOFTMAX) or logits[k, b] itself (FM's velocity); offset optional.

The residual r = p·W − W[y] ([K, B, d]) is never written to memory: each program computes its
rows' softmax once (the whole class row is one tile) and walks d in BLOCK_D tiles, forming r tile
by tile with tl.dot. The backward recomputes r the same way instead of saving it.

Memory traffic (elt = bytes of the logits' dtype; W is m·d and stays in L2):
  forward   reads K·B·m·elt (logits) + K·B·4 (weights) [with an offset: + K·B·d·4, the fp32
            target W[y] − offset re-read per block, formed once by the launcher], writes K·nb·4.
  backward  rows kernel: reads K·B·m·elt, writes K·B·m·elt (dlogits) + K·B·4 (dweight rows);
            dW kernel: reads K·B·m·elt again per d-tile (n_dtiles ≈ d/32 re-reads of the small
            logits, not of anything [K, B, d]) and writes S·m·d·4 split partials of dW.
Everything is accumulated in float32; tl.dot runs in ieee fp32 (tf32 would cost ~1e-3 relative).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import dot_tiles, on_device

_DW_PROGRAMS = 256  # aim for ~2 waves of programs on a GPU in the dW kernel (d-tiles x splits)
_DW_PARTIAL_ELEMENTS = 1 << 23  # cap on the fp32 split partials of dW (32 MiB)


@triton.jit
def _activation_rows(logits_ptr, k, rows, row_ok, cls, cls_ok, B, m, SOFTMAX: tl.constexpr):
    """p [BLOCK_B, BLOCK_M] = softmax(logits[k, rows, :]) (or the logits) in fp32; 0 in padded
    classes, finite in padded rows (they load zeros, so no -inf - -inf = NaN)."""
    x = tl.load(logits_ptr + (k * B + rows)[:, None] * m + cls[None, :],
                mask=row_ok[:, None] & cls_ok[None, :], other=0.0).to(tl.float32)
    if SOFTMAX:
        x = tl.where(cls_ok[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        x = e / tl.sum(e, axis=1)[:, None]
    return x


@triton.jit
def _residual_tile(p, W_ptr, off_ptr, lab, rows, row_ok, cls, cls_ok, d0, d,
                   BLOCK_D: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """(r [BLOCK_B, BLOCK_D], W tile [BLOCK_M, BLOCK_D]) for columns d0 .. d0 + BLOCK_D."""
    cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    col_ok = cols < d
    Wt = tl.load(W_ptr + cls[:, None] * d + cols[None, :], mask=cls_ok[:, None] & col_ok[None, :],
                 other=0.0).to(tl.float32)
    if HAS_OFFSET:  # the launcher's per-sample target W[y] − offset (fp32 [B, d])
        target = tl.load(off_ptr + rows[:, None] * d + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                         other=0.0)
    else:
        target = tl.load(W_ptr + lab[:, None] * d + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                         other=0.0).to(tl.float32)
    return tl.dot(p, Wt, input_precision="ieee") - target, Wt


@triton.jit
def _labels(y_ptr, rows, row_ok, m):
    lab = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return tl.minimum(tl.maximum(lab, 0), m - 1)  # the op checked labels; never read out of bounds anyway


@triton.jit
def _local_loss_fwd(logits_ptr, W_ptr, y_ptr, w_ptr, off_ptr, part_ptr, B, m, d, w_sk, w_sb, NB,
                    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    SOFTMAX: tl.constexpr, HAS_OFFSET: tl.constexpr):
    # Program (k, row block): part[k, block] = Σ_rows w·‖r‖².
    k = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cls = tl.arange(0, BLOCK_M).to(tl.int64)
    cls_ok = cls < m
    p = _activation_rows(logits_ptr, k, rows, row_ok, cls, cls_ok, B, m, SOFTMAX)
    lab = _labels(y_ptr, rows, row_ok, m)
    rr = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        r, Wt = _residual_tile(p, W_ptr, off_ptr, lab, rows, row_ok, cls, cls_ok, d0, d, BLOCK_D, HAS_OFFSET)
        rr += tl.sum(r * r, axis=1)
    w = tl.load(w_ptr + k * w_sk + rows * w_sb, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(part_ptr + k * NB + pid_b, tl.sum(tl.where(row_ok, w * rr, 0.0), axis=0))


@triton.jit
def _local_loss_bwd_rows(gl_ptr, logits_ptr, W_ptr, y_ptr, w_ptr, off_ptr, dlogits_ptr, dw_ptr,
                         B, m, d, w_sk, w_sb,
                         BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         SOFTMAX: tl.constexpr, HAS_OFFSET: tl.constexpr):
    # Program (k, row block): dlogits rows (dL/dp = coef · r·Wᵀ, through the softmax's backward
    # when SOFTMAX) and the per-row dweight = grad · ‖r‖² / B.
    k = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cls = tl.arange(0, BLOCK_M).to(tl.int64)
    cls_ok = cls < m
    p = _activation_rows(logits_ptr, k, rows, row_ok, cls, cls_ok, B, m, SOFTMAX)
    lab = _labels(y_ptr, rows, row_ok, m)
    rr = tl.zeros((BLOCK_B,), dtype=tl.float32)
    rwt = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)  # r · Wᵀ, accumulated over d-tiles
    for d0 in range(0, d, BLOCK_D):
        r, Wt = _residual_tile(p, W_ptr, off_ptr, lab, rows, row_ok, cls, cls_ok, d0, d, BLOCK_D, HAS_OFFSET)
        rr += tl.sum(r * r, axis=1)
        rwt += tl.dot(r, tl.trans(Wt), input_precision="ieee")
    g = tl.load(gl_ptr + k).to(tl.float32)
    w = tl.load(w_ptr + k * w_sk + rows * w_sb, mask=row_ok, other=0.0).to(tl.float32)
    coef = (2.0 / B) * g * w
    gp = coef[:, None] * rwt
    if SOFTMAX:
        dl = p * (gp - tl.sum(gp * p, axis=1)[:, None])
    else:
        dl = gp
    tl.store(dlogits_ptr + (k * B + rows)[:, None] * m + cls[None, :], dl.to(dlogits_ptr.dtype.element_ty),
             mask=row_ok[:, None] & cls_ok[None, :])
    tl.store(dw_ptr + k * B + rows, g * rr / B, mask=row_ok)


@triton.jit
def _local_loss_bwd_dW(gl_ptr, logits_ptr, W_ptr, y_ptr, w_ptr, off_ptr, part_ptr,
                       K, B, m, d, w_sk, w_sb, NB, CHUNKS,
                       BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       SOFTMAX: tl.constexpr, HAS_OFFSET: tl.constexpr):
    # Program (d-tile, split): part[split, :, tile] = Σ over its CHUNKS (k, row block) pairs of
    # (p − onehot(y))ᵀ · (coef · r)   — dW = Σ_kb p⊗gr − scatter_y(gr), one matmul, no atomics.
    pid_d = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)  # the (k, row block) loop runs in int32: K·NB is small; offsets below are int64
    d0 = pid_d * BLOCK_D
    cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    cls = tl.arange(0, BLOCK_M).to(tl.int64)
    cls_ok = cls < m
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = split * CHUNKS
    end = tl.minimum(start + CHUNKS, K * NB)
    for it in range(start, end):
        k = it // NB
        rows = (it % NB) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        row_ok = rows < B
        p = _activation_rows(logits_ptr, k, rows, row_ok, cls, cls_ok, B, m, SOFTMAX)
        lab = _labels(y_ptr, rows, row_ok, m)
        r, Wt = _residual_tile(p, W_ptr, off_ptr, lab, rows, row_ok, cls, cls_ok, d0, d, BLOCK_D, HAS_OFFSET)
        g = tl.load(gl_ptr + k).to(tl.float32)
        w = tl.load(w_ptr + k * w_sk + rows * w_sb, mask=row_ok, other=0.0).to(tl.float32)
        gr = tl.where(row_ok, (2.0 / B) * g * w, 0.0)[:, None] * r
        q = p - (lab[:, None] == cls[None, :]).to(tl.float32)
        acc += tl.dot(tl.trans(q), gr, input_precision="ieee")
    tl.store(part_ptr + (split * BLOCK_M + cls)[:, None] * d + cols[None, :], acc,
             mask=(cols < d)[None, :] & (cls < BLOCK_M)[:, None])


def _strides(weight: torch.Tensor, B: int) -> tuple[int, int]:
    return (1, 0) if weight.ndim == 1 else (B, 1)


def _variant(logits, W, y, offset, softmax: bool) -> dict:
    """The target pointer and the constexpr flags. With an offset the kernels read the per-sample
    target W[y] − offset, formed here in fp32 ([B, d], one small gather), instead of gathering W[y]
    and adding the offset tile by tile: two loads into the residual made ptxas spill kilobytes at
    m = 100 (sm_90, Triton 3.8; see compile_check). Without one, logits stand in, never read."""
    if offset is None:
        target = logits
    else:  # labels clamped like the kernels' own (unchecked while tracing or capturing)
        target = (W.float()[y.clamp(0, W.shape[0] - 1)] - offset.float()).contiguous()
    return dict(off=target, flags=dict(SOFTMAX=bool(softmax), HAS_OFFSET=offset is not None))


def local_loss(logits, W, y, weight, offset=None, softmax: bool = True):
    """logits: [K, B, m]; W: [m, d]; y: [B]; weight: [K] or [K, B]; offset: [B, d] or None
    -> loss: [K] float32."""
    K, B, m = logits.shape
    d = W.shape[1]
    block_b, block_m, block_d, warps = dot_tiles(B, m, d)
    nb = triton.cdiv(B, block_b)
    part = torch.empty((K, nb), dtype=torch.float32, device=logits.device)
    v = _variant(logits, W, y, offset, softmax)
    with on_device(logits):
        _local_loss_fwd[(K, nb)](logits, W, y, weight, v["off"], part, B, m, d, *_strides(weight, B), nb,
                                 BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, **v["flags"])
    return part.sum(1) / B


def local_loss_backward(grad_loss, logits, W, y, weight, offset=None, softmax: bool = True):
    """grad_loss: [K] -> (dlogits [K, B, m] like logits, dW [m, d] like W, dweight like weight)."""
    K, B, m = logits.shape
    d = W.shape[1]
    dev = logits.device
    block_b, block_m, block_d, warps = dot_tiles(B, m, d)
    nb = triton.cdiv(B, block_b)
    n_dtiles = triton.cdiv(d, block_d)
    chunks_total = K * nb
    splits = max(1, min(chunks_total, triton.cdiv(_DW_PROGRAMS, n_dtiles),
                        _DW_PARTIAL_ELEMENTS // (block_m * d)))
    chunks = triton.cdiv(chunks_total, splits)
    splits = triton.cdiv(chunks_total, chunks)
    dlogits = torch.empty_like(logits)
    dw_rows = torch.empty((K, B), dtype=torch.float32, device=dev)
    part = torch.empty((splits, block_m, d), dtype=torch.float32, device=dev)
    strides = _strides(weight, B)
    v = _variant(logits, W, y, offset, softmax)
    with on_device(logits):
        _local_loss_bwd_rows[(K, nb)](grad_loss, logits, W, y, weight, v["off"], dlogits, dw_rows, B, m, d,
                                      *strides, BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_D=block_d,
                                      num_warps=warps, **v["flags"])
        _local_loss_bwd_dW[(n_dtiles, splits)](grad_loss, logits, W, y, weight, v["off"], part, K, B, m, d,
                                               *strides, nb, chunks, BLOCK_B=block_b, BLOCK_M=block_m,
                                               BLOCK_D=block_d, num_warps=warps, **v["flags"])
    dW = part.sum(0)[:m].to(W.dtype)  # split partials summed in a fixed order: deterministic
    dweight = dw_rows.sum(1) if weight.ndim == 1 else dw_rows
    return dlogits, dW, dweight.to(weight.dtype)
