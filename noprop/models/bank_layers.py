"""Layers that run T structurally identical layers (one per block of a block bank) as one.

Layout: the activations of T blocks on a batch of B samples are one tensor whose first dimension
is B*T, sample-major: row b*T + t is sample b in block t. Why sample-major: [B*T, C, H, W] is, as
memory, [B, T*C, H, W], which is exactly the input of one grouped convolution (groups = T), and
[B*T, C] is [B, T*C], which one BatchNorm over T*C channels normalises per (block, channel) over
the batch, as T separate BatchNorms would. Both need no copy. The block's own forward code
(concatenation along dim 1, residual adds, reshapes that keep dim 0) runs unchanged on that
tensor: it sees an ordinary batch of B*T samples. An input that all blocks share (the image x)
stays [B, ...]: the first convolution of the bank reads it once, as one ordinary convolution with
T*O output channels, and its output is already in the layout above.

Reshapes, not views: on contiguous tensors they cost nothing, and an input in another memory
format (channels_last from --precision) is then copied rather than refused.

Parameters are stacked, [T, ...] (a [T, O, C, kh, kw] conv weight, a [T, O, K] Linear weight).
Gradients of both inputs come from autograd through ordinary torch ops.

The 3x3 convolutions over T blocks have three implementations (`CONV_IMPLS`):
- grouped: one convolution with groups = T (shared input: one ordinary convolution);
- gemm: unfold (im2col) and one batched matrix multiply over T (`torch.baddbmm`), the form that
  maps onto tensor cores;
- loop: one convolution per block. On the 2-core development CPU separate convolutions were
  measured 2-3x faster than one grouped convolution over the blocks (docs/design.md §12);
- triton: Triton implicit-GEMM kernels with the block index on the grid (noprop.kernels.triton.
  bank_conv), forward and both gradients, fp32 accumulation. They cover stride 1 and dilation 1 in
  float32/float16/bfloat16 (the DT block's convolutions); any other call runs grouped. They run on
  CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (the tests).
`conv_impl(device)` picks: NOPROP_BANK_CONV=grouped|gemm|loop|triton when set, else grouped on CUDA
(what stacking already ran on the H100) and loop elsewhere. Whether triton beats grouped or gemm
on a GPU is not measured yet (bench/gpu_check.sh's bench-bank-conv compares them).
Under autocast the triton impl casts x, weight and bias to autocast's dtype first, as autocast
does for F.conv2d (autocast does not touch custom ops).
Linear layers are one `baddbmm` over T (a shared input: one ordinary matmul with T*O outputs).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

CONV_IMPLS = ("grouped", "gemm", "loop", "triton")
CONV_WHY = {"grouped": "one grouped convolution over the blocks",
            "gemm": "unfold + one batched matrix multiply over the blocks",
            "loop": "one convolution per block (on 2 CPU cores separate convolutions beat one grouped, "
                    "docs/design.md §12)",
            "triton": "Triton implicit-GEMM kernels with the block on the grid (not yet measured on a GPU)"}


def conv_impl(device) -> str:
    """The bank convolution to use on `device`: NOPROP_BANK_CONV if set (not 'auto'), else grouped on
    CUDA and loop elsewhere. Read at each call, so a benchmark can switch it between configurations."""
    name = os.environ.get("NOPROP_BANK_CONV", "auto").strip().lower() or "auto"
    if name == "auto":
        return "grouped" if torch.device(device).type == "cuda" else "loop"
    if name not in CONV_IMPLS:
        raise ValueError(f"NOPROP_BANK_CONV must be auto or one of {', '.join(CONV_IMPLS)}, got {name!r}")
    if name == "triton":
        check_triton(device)
    return name


def why_not_triton(device) -> str | None:
    """None if the Triton bank convolution can run on `device`, else why not (one line)."""
    from noprop import dispatch

    device = torch.device(device)
    reason = dispatch.why_unavailable("triton", device)
    if reason is None:
        from noprop.kernels.triton import bank_conv  # imports Triton, compiles nothing
        reason = bank_conv.device_reason(device)
    return f"NOPROP_BANK_CONV=triton cannot run on {device}: {reason}" if reason else None


def check_triton(device) -> None:
    """ValueError saying `why_not_triton(device)`, if anything."""
    reason = why_not_triton(device)
    if reason:
        raise ValueError(reason)


def _triton_conv2d(x, weight, bias, T, shared, stride, padding, dilation) -> torch.Tensor | None:
    """The Triton kernels' result, or None for a call they do not cover (the caller runs grouped)."""
    check_triton(x.device)
    from noprop.kernels.triton import bank_conv

    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if bank_conv.unsupported(x, weight, bias, T, shared, stride, padding, dilation):
        return None
    return bank_conv.conv2d(x, weight, bias, T, shared, stride, padding, dilation)


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, T: int, shared: bool,
           impl: str, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """T convolutions at once. x: [B, C, H, W] read by every block (shared) or [B*T, C, H, W]
    (sample-major, see the module docstring); weight [T, O, C, kh, kw]; bias [T, O] or None.
    Returns [B*T, O, H', W']."""
    _, O, C, kh, kw = weight.shape
    B = x.shape[0] if shared else x.shape[0] // T
    H, W = x.shape[-2:]
    Ho, Wo = (_out_size(H, kh, stride[0], padding[0], dilation[0]), _out_size(W, kw, stride[1], padding[1], dilation[1]))
    if impl == "triton":
        out = _triton_conv2d(x, weight, bias, T, shared, stride, padding, dilation)
        if out is not None:
            return out
        impl = "grouped"
    if impl == "loop":
        # unbind, not weight[t]: its backward is one stack of the T gradients, where T selects would
        # each write a zero-filled [T, ...] gradient
        ws = weight.unbind(0)
        bs = bias.unbind(0) if bias is not None else [None] * T
        xs = None if shared else x.reshape(B, T, C, H, W)
        outs = [F.conv2d(x if shared else xs[:, t], ws[t], bs[t], stride, padding, dilation) for t in range(T)]
        return torch.stack(outs, 1).reshape(B * T, O, Ho, Wo)
    if impl == "grouped":
        flat_b = None if bias is None else bias.reshape(T * O)
        if shared:
            out = F.conv2d(x, weight.reshape(T * O, C, kh, kw), flat_b, stride, padding, dilation)
        else:
            out = F.conv2d(x.reshape(B, T * C, H, W), weight.reshape(T * O, C, kh, kw), flat_b, stride, padding,
                           dilation, groups=T)
        return out.reshape(B * T, O, Ho, Wo)
    if impl != "gemm":
        raise ValueError(f"bank convolution impl must be one of {CONV_IMPLS}, got {impl!r}")
    K, L = C * kh * kw, Ho * Wo
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B or B*T, K, L]
    w = weight.reshape(T, O, K)
    if shared:  # every block reads the same columns: one [T*O, K] x [K, B*L] product
        out = torch.matmul(w.reshape(T * O, K), cols)  # [B, T*O, L]
        if bias is not None:
            out = out + bias.reshape(1, T * O, 1)
        return out.reshape(B * T, O, Ho, Wo)
    cols = cols.reshape(B, T, K, L).permute(1, 2, 0, 3).reshape(T, K, B * L)  # block-major for the batched GEMM
    start = bias.reshape(T, O, 1) if bias is not None else cols.new_zeros(())
    out = torch.baddbmm(start, w, cols)  # [T, O, B*L]
    return out.reshape(T, O, B, L).permute(2, 0, 1, 3).reshape(B * T, O, Ho, Wo)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, T: int, shared: bool) -> torch.Tensor:
    """T Linear layers at once. x: [B, K] (shared) or [B*T, K]; weight [T, O, K]; bias [T, O] or None.
    Returns [B*T, O]."""
    _, O, K = weight.shape
    if shared:
        return F.linear(x, weight.reshape(T * O, K), None if bias is None else bias.reshape(T * O)).reshape(-1, O)
    B = x.shape[0] // T
    start = bias.unsqueeze(1) if bias is not None else x.new_zeros(())
    out = torch.baddbmm(start, x.reshape(B, T, K).transpose(0, 1), weight.transpose(1, 2))  # [T, B, O]
    return out.transpose(0, 1).reshape(B * T, O)


def batch_norm(x: torch.Tensor, running_mean, running_var, weight, bias, T: int, training: bool,
               momentum: float, eps: float) -> torch.Tensor:
    """T BatchNorm1d layers at once on x [B*T, C]: statistics per block and channel over the batch,
    running statistics ([T, C], updated in place when training) and affine parameters [T, C]."""
    C = x.shape[1]
    flat = [None if v is None else v.reshape(T * C) for v in (running_mean, running_var, weight, bias)]
    out = F.batch_norm(x.reshape(-1, T * C), flat[0], flat[1], flat[2], flat[3], training, momentum, eps)
    return out.reshape(-1, C)


def dropout(x: torch.Tensor, p: float, training: bool, T: int, generators=None) -> torch.Tensor:
    """Dropout on x [B*T, ...]. With `generators` (one torch.Generator per block, on CPU), block t's
    mask is drawn from its own generator exactly as noprop.models.Dropout draws it for one block
    ([B, ...], the same calls in the same order), so a bank step reproduces the keyed masks of the
    per-block step. Without: one mask for the whole tensor from torch's generator."""
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    if generators is None or x.device.type != "cpu":
        return F.dropout(x, p, True)
    B = x.shape[0] // T
    masks = [torch.empty((B,) + tuple(x.shape[1:]), dtype=x.dtype).bernoulli_(1 - p, generator=g).div_(1 - p)
             for g in generators]
    return x * torch.stack(masks, 1).reshape(x.shape)
