"""Triton implicit-GEMM convolution over the T blocks of a block bank (`bank_layers.conv2d`, impl "triton").

T convolutions with stride 1 and dilation 1 (any kernel size, any zero padding) run as implicit
GEMMs with the block index on the grid. No im2col tensor is written: each program gathers its tile
of the virtual column matrix from the input as it goes. Layouts as in noprop.models.bank_layers:
x is [B, C, H, W] read by every block (shared) or [B*T, C, H, W] sample-major (row b*T + t is
sample b of block t); any strides (channels_last too); weight [T, O, C, kh, kw], bias [T, O].
  forward  y[b*T+t, o, p] = bias[t, o] + sum_k col[b(,t), p, k] * w[t, o, k], k = (c, i, j):
           M = B*Ho*Wo rows (b, oh, ow), N = O, K = C*kh*kw; grid (M tiles, N tiles, T).
  dgrad    dx[b(,t), c, ih, iw] = sum_(o,i,j) dy[b*T+t, o, ih+ph-i, iw+pw-j] * w[t, o, c, i, j]:
           M = B*H*W, N = C, K = O*kh*kw; grid (M tiles, N tiles, T). A shared input's gradient also
           sums over the blocks: grid (M tiles, N tiles, 1), blocks walked in order in each program.
  wgrad    dw[t, o, k] = sum_r dy[r, o] * col[r, k] and db[t, o] = sum_r dy[r, o], r = (b, oh, ow):
           grid (O tiles, K tiles, T*S); split s reduces a fixed range of r into its own fp32
           partial and the launcher sums the S partials in split order: deterministic, no atomics.

Memory traffic (elt = bytes of the inputs' dtype; the weights are small and stay in L2):
  forward  writes B*T*O*Ho*Wo*elt. Reads the input once per N tile (O <= 64: once) and per block
           (a shared input: T reads of the same B*C*H*W*elt, from L2 after the first); the kh*kw
           taps of one element are neighbouring loads of one program (L1), not extra DRAM reads.
  dgrad    reads dy (B*T*O*Ho*Wo*elt) once per C tile, writes dx (x's size, in x's dtype).
  wgrad    reads dy once per K tile and the input once per O tile, writes S*T*O*C*kh*kw*4 bytes of
           partials (capped at 32 MiB) and S*T*O*4 of bias partials.
Accumulation is fp32. fp32 inputs multiply with input_precision="ieee" (no TF32: the float64 error
rule of the tests holds). fp16 and bf16 tiles go to tl.dot as they are, on tensor cores; their
products are exact in fp32. Under the interpreter bf16 tiles are upcast first (`_ieee_dot`): it
multiplies bf16 tiles wrongly, so the native bf16 dot is tested by the GPU tests only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from typing import Optional

from ._launch import on_device, pow2

_WGRAD_PROGRAMS = 264  # aim for ~2 waves of programs on a 132-SM GPU in the weight gradient
# Triton's interpreter (CPU tensors, the tests) runs programs one after another in Python, at a
# cost per program and op rather than per element: there the launchers take longer row tiles and
# aim at a few weight-gradient splits. Same kernels and masks, other tile constants.
_ROWS_INTERPRETED = 256
_WGRAD_PROGRAMS_INTERPRETED = 8
_WGRAD_PARTIAL_ELEMENTS = 1 << 23  # cap on the fp32 split partials of dw (32 MiB)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _mma(a, b, acc, F32: tl.constexpr):
    """acc + a @ b in fp32. F32: ieee fp32 products (fp32 tiles; bf16 under the interpreter, upcast
    first, see `_ieee_dot`); else the tiles go to tl.dot as they are (exact products in fp32)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _pixels(rows, n_pixels, width):
    """Row indices over (image, pixel) of images of n_pixels = height * width pixels -> (image, pixel,
    pixel row, pixel column)."""
    p = rows % n_pixels
    return rows // n_pixels, p, p // width, p % width


@triton.jit
def _tap(ks, KH: tl.constexpr, KW: tl.constexpr):
    """Column indices k = (channel, i, j) of a virtual column matrix -> (channel, kernel row i, kernel
    column j)."""
    return ks // (KH * KW), (ks % (KH * KW)) // KW, ks % KW


@triton.jit
def _bank_conv_fwd(x_ptr, w_ptr, bias_ptr, y_ptr, B, C, H, W, O, Ho, Wo, PH, PW, T,
                   sx_b, sx_t, sx_c, sx_h, sx_w,
                   KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, F32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (row tile, output-channel tile, block t): y rows (b, oh, ow) x channels o.
    t = tl.program_id(2).to(tl.int64)
    L = Ho * Wo
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < B * L
    b, p, oh, ow = _pixels(rows, L, Wo)
    top = oh - PH  # the input row and column of tap (0, 0)
    left = ow - PW
    row_base = b * sx_b + t * sx_t + top * sx_h + left * sx_w
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < O
    KC = C * KH * KW
    w_cols = w_ptr + t * O * KC + cols.to(tl.int64) * KC  # weight rows [O, KC] of block t
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KC, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < KC
        c, i, j = _tap(ks, KH, KW)
        ih = top[:, None] + i[None, :]
        iw = left[:, None] + j[None, :]
        a_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + row_base[:, None] + (c.to(tl.int64) * sx_c + i * sx_h + j * sx_w)[None, :],
                    mask=a_ok, other=0.0)
        w = tl.load(w_cols[None, :] + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, w, acc, F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + t * O + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + ((b * T + t) * O * L + p)[:, None] + (cols.to(tl.int64) * L)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bank_conv_dgrad(dy_ptr, w_ptr, dx_ptr, B, C, H, W, O, Ho, Wo, PH, PW, NT,
                     sd_b, sd_t, sd_o, sd_h, sd_w, sdx_b, sdx_t,
                     KH: tl.constexpr, KW: tl.constexpr, F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (input-pixel tile, input-channel tile, block): dx rows (b, ih, iw) x channels c,
    # summed over blocks pid .. pid + NT (NT = T for a shared input, else 1).
    pid_t = tl.program_id(2).to(tl.int64)
    HW = H * W
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < B * HW
    b, q, ih, iw = _pixels(rows, HW, W)
    oh0 = ih + PH  # the output row and column that tap (0, 0) of this pixel feeds
    ow0 = iw + PW
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    KD = O * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for dt in range(0, NT):
        t = pid_t + dt
        row_base = b * sd_b + t * sd_t + oh0 * sd_h + ow0 * sd_w
        w_t = w_ptr + t * O * C * KH * KW
        for k0 in range(0, KD, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < KD
            o, i, j = _tap(ks, KH, KW)
            oh = oh0[:, None] - i[None, :]
            ow = ow0[:, None] - j[None, :]
            a_ok = row_ok[:, None] & k_ok[None, :] & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
            a = tl.load(dy_ptr + row_base[:, None] + (o.to(tl.int64) * sd_o - i * sd_h - j * sd_w)[None, :],
                        mask=a_ok, other=0.0)
            w = tl.load(w_t + (o * C * KH * KW + i * KW + j)[:, None] + (cols * KH * KW)[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _mma(a, w, acc, F32)
    dx = dx_ptr + (b * sdx_b + pid_t * sdx_t + q)[:, None] + (cols.to(tl.int64) * HW)[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bank_conv_wgrad(dy_ptr, x_ptr, dw_ptr, db_ptr, B, C, H, W, O, Ho, Wo, PH, PW, T, CHUNK,
                     sd_b, sd_t, sd_o, sd_h, sd_w, sx_b, sx_t, sx_c, sx_h, sx_w,
                     KH: tl.constexpr, KW: tl.constexpr, F32: tl.constexpr,
                     BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # Program (output-channel tile, column tile, (split, block)): the split's share of
    # dw[t, o, k] = dy^T . col over the output positions r = (b, oh, ow) in its fixed range.
    pid_ts = tl.program_id(2)
    t = (pid_ts % T).to(tl.int64)
    s = pid_ts // T
    os_ = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = os_ < O
    KC = C * KH * KW
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < KC
    c, i, j = _tap(ks, KH, KW)
    col_off = c.to(tl.int64) * sx_c + i * sx_h + j * sx_w
    L = Ho * Wo
    start = s.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, B * L)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        r_ok = rs < end
        b, _, oh, ow = _pixels(rs, L, Wo)
        g = tl.load(dy_ptr + (b * sd_b + t * sd_t + oh * sd_h + ow * sd_w)[None, :] + (os_.to(tl.int64) * sd_o)[:, None],
                    mask=o_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_O, BLOCK_R]
        ih = (oh - PH)[:, None] + i[None, :]
        iw = (ow - PW)[:, None] + j[None, :]
        x_ok = r_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xs = tl.load(x_ptr + (b * sx_b + t * sx_t + (oh - PH) * sx_h + (ow - PW) * sx_w)[:, None] + col_off[None, :],
                     mask=x_ok, other=0.0)  # [BLOCK_R, BLOCK_K]
        acc = _mma(g, xs, acc, F32)
        db += tl.sum(g.to(tl.float32), axis=1)  # the bias gradient rides along: dy is loaded anyway
    part = (s * T + t) * O + os_.to(tl.int64)
    tl.store(dw_ptr + (part * KC)[:, None] + ks[None, :], acc, mask=o_ok[:, None] & k_ok[None, :])
    tl.store(db_ptr + part, db, mask=o_ok & (tl.program_id(1) == 0))  # one column tile writes it


def _geometry(x: Tensor, weight: Tensor, T: int, shared: bool, padding) -> dict:
    _, O, C, KH, KW = weight.shape
    H, W = x.shape[-2:]
    return dict(B=x.shape[0] if shared else x.shape[0] // T, C=C, H=H, W=W, O=O, KH=KH, KW=KW,
                Ho=H + 2 * padding[0] - KH + 1, Wo=W + 2 * padding[1] - KW + 1)


def _batch_strides(t: Tensor, T: int, shared: bool) -> tuple:
    """(sample, block, channel, row, column) strides of a [B, ...] (shared) or [B*T, ...] tensor."""
    s = t.stride()
    return (s[0], 0, *s[1:]) if shared else (T * s[0], s[0], *s[1:])


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, T: int, shared: bool, padding) -> Tensor:
    g = _geometry(x, weight, T, shared, padding)
    weight = weight.contiguous()
    y = torch.empty((g["B"] * T, g["O"], g["Ho"], g["Wo"]), dtype=x.dtype, device=x.device)
    f32 = _ieee_dot(x.dtype)
    bm, bn, bk, warps = tiles(g["O"], g["C"] * g["KH"] * g["KW"], f32)
    grid = (triton.cdiv(g["B"] * g["Ho"] * g["Wo"], bm), triton.cdiv(g["O"], bn), T)
    with on_device(x):
        _bank_conv_fwd[grid](x, weight, weight if bias is None else bias.contiguous(), y, g["B"], g["C"], g["H"],
                             g["W"], g["O"], g["Ho"], g["Wo"], padding[0], padding[1], T,
                             *_batch_strides(x, T, shared), KH=g["KH"], KW=g["KW"], HAS_BIAS=bias is not None,
                             F32=f32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y


def input_grad(dy: Tensor, x: Tensor, weight: Tensor, T: int, shared: bool, padding) -> Tensor:
    """dx, contiguous, in x's shape and dtype."""
    g = _geometry(x, weight, T, shared, padding)
    weight = weight.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    chw = g["C"] * g["H"] * g["W"]
    blocks, nt, sdx = (1, T, (chw, 0)) if shared else (T, 1, (T * chw, chw))
    f32 = _ieee_dot(x.dtype)
    bm, bn, bk, warps = tiles(g["C"], g["O"] * g["KH"] * g["KW"], f32)
    grid = (triton.cdiv(g["B"] * g["H"] * g["W"], bm), triton.cdiv(g["C"], bn), blocks)
    with on_device(x):
        _bank_conv_dgrad[grid](dy, weight, dx, g["B"], g["C"], g["H"], g["W"], g["O"], g["Ho"], g["Wo"],
                               padding[0], padding[1], nt, *_batch_strides(dy, T, False), *sdx,
                               KH=g["KH"], KW=g["KW"], F32=f32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                               num_warps=warps)
    return dx


def interpreted() -> bool:
    return type(_bank_conv_fwd).__name__ == "InterpretedFunction"


def _ieee_dot(dtype: torch.dtype) -> bool:
    """Whether tiles of `dtype` multiply as ieee fp32 (fp32; bf16 under the interpreter, which
    multiplies bf16 tiles wrongly) rather than natively on tensor cores (fp16; bf16 on a GPU, with
    exact products accumulated in fp32, like fp16)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted())


def tiles(N: int, K: int, f32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the forward and input-gradient GEMMs (N columns, K
    reduced). The ieee fp32 dots (fp32, bf16) run on FMA units with their operands in registers:
    compiled for sm_90 (ptxas, Triton 3.8; compile_check), 64 x 64 x 16 tiles on 8 warps use <= 166
    registers (one T = B = 1 input-gradient specialization spills 8 bytes), where 4 warps or
    32-deep K tiles used 255 and spilled. fp16 takes 32-deep K tiles (<= 162 registers, no spills)."""
    rows = _ROWS_INTERPRETED if interpreted() else 64
    return rows, pow2(N, 16, 64), 16 if f32 else pow2(K, 16, 32), 8


def wgrad_tiles(O: int, KC: int, f32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_K, BLOCK_R, num_warps) of the weight gradient (BLOCK_R positions reduced per
    step). sm_90: fp32/bf16 64 x 32 x 16 on 8 warps <= 189 registers, no spills (32-deep R tiles
    spilled 0.5-7 KB); fp16 64 x 64 x 32 on 8 warps <= 187, no spills."""
    rows = _ROWS_INTERPRETED // 2 if interpreted() else 16 if f32 else 32
    return pow2(O, 16, 64), pow2(KC, 16, 32 if f32 else 64), rows, 8


def wgrad_splits(R: int, programs: int, partial: int, block_r: int, target: int) -> tuple[int, int]:
    """(splits, rows per split) of the weight gradient's reduction over R output positions: enough
    splits for `target` programs with `programs` programs per split, at most
    `_WGRAD_PARTIAL_ELEMENTS` of fp32 partials (`partial` elements per split). A function of the
    shapes only: same inputs, same summation order."""
    splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(R, block_r),
                        _WGRAD_PARTIAL_ELEMENTS // max(1, partial)))
    chunk = triton.cdiv(triton.cdiv(R, splits), block_r) * block_r
    return triton.cdiv(R, chunk), chunk


def weight_grad(dy: Tensor, x: Tensor, weight: Tensor, T: int, shared: bool, padding) -> tuple[Tensor, Tensor]:
    """(dw like weight, db [T, O] in weight's dtype)."""
    g = _geometry(x, weight, T, shared, padding)
    O, KC = g["O"], g["C"] * g["KH"] * g["KW"]
    f32 = _ieee_dot(x.dtype)
    bo, bk, br, warps = wgrad_tiles(O, KC, f32)
    tiles = (triton.cdiv(O, bo), triton.cdiv(KC, bk))
    target = _WGRAD_PROGRAMS_INTERPRETED if interpreted() else _WGRAD_PROGRAMS
    splits, chunk = wgrad_splits(g["B"] * g["Ho"] * g["Wo"], tiles[0] * tiles[1] * T, T * O * KC, br, target)
    dw = torch.empty((splits, T, O, KC), dtype=torch.float32, device=x.device)
    db = torch.empty((splits, T, O), dtype=torch.float32, device=x.device)
    with on_device(x):
        _bank_conv_wgrad[(*tiles, T * splits)](dy, x, dw, db, g["B"], g["C"], g["H"], g["W"], O, g["Ho"], g["Wo"],
                                               padding[0], padding[1], T, chunk, *_batch_strides(dy, T, False),
                                               *_batch_strides(x, T, shared), KH=g["KH"], KW=g["KW"],
                                               F32=f32, BLOCK_O=bo, BLOCK_K=bk, BLOCK_R=br, num_warps=warps)
    # the split partials summed by one torch reduction, whose order is fixed for fixed shapes
    return dw.sum(0).reshape(weight.shape).to(weight.dtype), db.sum(0).to(weight.dtype)


# Custom ops: opaque to torch.compile (their fake kernels give the shapes) and to autograd, whose
# formula is registered below; the backward runs only the gradients that are needed.
@torch.library.custom_op("noprop::bank_conv2d", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], T: int, shared: bool, padding: list[int]) -> Tensor:
    return forward(x, weight, bias, T, shared, padding)


@_conv_op.register_fake
def _(x, weight, bias, T, shared, padding):
    g = _geometry(x, weight, T, shared, padding)
    return x.new_empty((g["B"] * T, g["O"], g["Ho"], g["Wo"]))


@torch.library.custom_op("noprop::bank_conv2d_input_grad", mutates_args=())
def _input_grad_op(dy: Tensor, x: Tensor, weight: Tensor, T: int, shared: bool, padding: list[int]) -> Tensor:
    return input_grad(dy, x, weight, T, shared, padding)


@_input_grad_op.register_fake
def _(dy, x, weight, T, shared, padding):
    return x.new_empty(x.shape)


@torch.library.custom_op("noprop::bank_conv2d_weight_grad", mutates_args=())
def _weight_grad_op(dy: Tensor, x: Tensor, weight: Tensor, T: int, shared: bool,
                    padding: list[int]) -> tuple[Tensor, Tensor]:
    return weight_grad(dy, x, weight, T, shared, padding)


@_weight_grad_op.register_fake
def _(dy, x, weight, T, shared, padding):
    return weight.new_empty(weight.shape), weight.new_empty(weight.shape[:2])


def _setup_context(ctx, inputs, output):
    x, weight, bias, T, shared, padding = inputs
    ctx.conf = (T, shared, list(padding))
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = torch.ops.noprop.bank_conv2d_input_grad(dy, x, weight, *ctx.conf) if need[0] else None
    dw = db = None
    if need[1] or (ctx.has_bias and need[2]):
        dw, db = torch.ops.noprop.bank_conv2d_weight_grad(dy, x, weight, *ctx.conf)
    return dx, dw if need[1] else None, db if ctx.has_bias and need[2] else None, None, None, None


_conv_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported(x: Tensor, weight: Tensor, bias: Tensor | None, T: int, shared: bool, stride=(1, 1), padding=(0, 0),
                dilation=(1, 1)) -> str | None:
    """None if the kernels compute this convolution, else why not (callers run another impl then)."""
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return f"the Triton bank convolution runs stride 1 and dilation 1 only, got stride {tuple(stride)} " \
               f"and dilation {tuple(dilation)}"
    if x.ndim != 4 or weight.ndim != 5 or weight.shape[0] != T or x.shape[1] != weight.shape[2]:
        return f"the Triton bank convolution takes x [B(*T), C, H, W] and weight [T, O, C, kh, kw] with T = {T}, " \
               f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
    if not shared and x.shape[0] % T:
        return f"a per-block input has B*T rows; {x.shape[0]} rows is not a multiple of T = {T}"
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        return f"bias must be [T, O] = {list(weight.shape[:2])}, got {tuple(bias.shape)}"
    if min(padding) < 0 or any(n + 2 * p < k for n, p, k in zip(x.shape[-2:], padding, weight.shape[-2:])):
        return f"the Triton bank convolution needs padding >= 0 and a padded input of at least the kernel's " \
               f"size, got input {tuple(x.shape[-2:])}, padding {tuple(padding)}, kernel {tuple(weight.shape[-2:])}"
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(dtypes) != 1 or x.dtype not in DTYPES:
        return f"the Triton bank convolution runs x, weight and bias of one dtype among float32, float16 and " \
               f"bfloat16 (accumulating in float32), got {', '.join(sorted(str(d)[6:] for d in dtypes))}"
    if any(t is not None and t.device != x.device for t in (weight, bias)):
        return f"x, weight and bias must be on one device, got {', '.join(str(t.device) for t in (x, weight, bias) if t is not None)}"
    return None


def device_reason(device) -> str | None:
    """None if the kernels run on `device`, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not interpreted():
            return ("the Triton bank convolution needs a CUDA device (CPU tensors run only in Triton's "
                    "interpreter, TRITON_INTERPRET=1, which is for tests); unset NOPROP_BANK_CONV or pick "
                    "grouped, gemm or loop")
        return None
    return f"the Triton bank convolution runs on CUDA tensors, got {device.type} tensors"


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, T: int, shared: bool, stride=(1, 1), padding=(0, 0),
           dilation=(1, 1)) -> Tensor:
    """T convolutions at once (layouts: the module docstring); returns [B*T, O, H', W'] contiguous, in
    x's dtype. Differentiable in x, weight and bias. A configuration the kernels do not cover raises
    ValueError saying why (`unsupported`), so that a caller can run another impl."""
    reason = unsupported(x, weight, bias, T, shared, stride, padding, dilation) or device_reason(x.device)
    if reason:
        raise ValueError(reason)
    return torch.ops.noprop.bank_conv2d(x, weight, bias, int(T), bool(shared), [int(p) for p in padding])
