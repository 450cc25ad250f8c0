"""`noprop::local_loss`: every block's denoising loss in one launch.

loss[k] = mean_b weight[k(, b)] · ‖act(logits[k, b]) · W − (W[y_b] − offset_b)‖²  (sum over the d dims)
act = softmax (DT, CT: the denoiser predicts a mixture of class embeddings) or the identity
(softmax=False; FM: the network's output logits·W is a velocity). offset [B, d] shifts the target
(FM's target u_y − z_0 is offset = z_0); None means 0.
The backward recomputes the residual instead of keeping a [K, B, d] tensor alive between forward
and backward; only the inputs are saved.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from noprop import dispatch
from . import checks, eager


def _check(logits, W, y, weight, offset):
    checks.floating("logits", logits, 3)
    checks.floating("W", W, 2)
    checks.same_device(logits=logits, W=W, y=y, weight=weight,
                       **({} if offset is None else {"offset": offset}))
    K, B, m = logits.shape
    if B == 0:
        raise ValueError("logits has an empty batch dimension (B = 0)")
    if W.shape[0] != m:
        raise ValueError(f"logits has m = {m} classes but W has {W.shape[0]} rows (W must be [m, d])")
    if y.shape != (B,):
        raise ValueError(f"labels y must have shape [B] = [{B}] to match logits [K, B, m], got {tuple(y.shape)}")
    checks.labels(y, m)
    checks.coefficient("weight", weight, K, B)
    if offset is not None:
        checks.floating("offset", offset, 2)
        if offset.shape != (B, W.shape[1]):
            raise ValueError(f"offset must have shape [B, d] = [{B}, {W.shape[1]}], got {tuple(offset.shape)}")


@torch.library.custom_op("noprop::local_loss", mutates_args=())
def _local_loss(logits: Tensor, W: Tensor, y: Tensor, weight: Tensor, offset: Optional[Tensor] = None,
                softmax: bool = True) -> Tensor:
    _check(logits, W, y, weight, offset)
    return dispatch.implementation("local_loss", logits.device)(logits, W, y, weight, offset, softmax)


@_local_loss.register_fake
def _(logits, W, y, weight, offset=None, softmax=True):
    _check(logits, W, y, weight, offset)  # also runs when any input is on meta
    return logits.new_empty((logits.shape[0],), dtype=eager.compute_dtype(logits, W, weight, offset))


@torch.library.custom_op("noprop::local_loss_backward", mutates_args=())
def _local_loss_backward(grad_loss: Tensor, logits: Tensor, W: Tensor, y: Tensor, weight: Tensor,
                         offset: Optional[Tensor] = None, softmax: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    grad_loss = grad_loss.contiguous()
    return dispatch.implementation("local_loss_backward", logits.device)(grad_loss, logits, W, y, weight,
                                                                         offset, softmax)


@_local_loss_backward.register_fake
def _(grad_loss, logits, W, y, weight, offset=None, softmax=True):
    return torch.empty_like(logits), torch.empty_like(W), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    logits, W, y, weight, offset, softmax = inputs
    ctx.softmax = softmax
    ctx.has_offset = offset is not None
    ctx.backend = dispatch.requested_backend()  # see _backward
    ctx.save_for_backward(logits, W, y, weight, *(() if offset is None else (offset,)))


def _backward(ctx, grad_loss):
    logits, W, y, weight, *rest = ctx.saved_tensors
    offset = rest[0] if ctx.has_offset else None
    # The backend request is per thread, and autograd runs CUDA backwards on its own threads: the
    # backward follows the request that was active when the forward ran. (Under torch.compile this
    # block only runs while tracing; a compiled backward uses NOPROP_BACKEND / auto.)
    with dispatch.use_backend(ctx.backend):
        dlogits, dW, dweight = torch.ops.noprop.local_loss_backward(grad_loss, logits, W, y, weight, offset,
                                                                    ctx.softmax)
    need = ctx.needs_input_grad
    doffset = None
    if ctx.has_offset and need[4]:
        # Rare (FM's offset z_0 is noise, so no kernel computes this): plain torch ops, traceable.
        doffset = eager.local_loss_offset_grad(grad_loss, logits, W, y, weight, offset, ctx.softmax)
    return (dlogits if need[0] else None, dW if need[1] else None, None, dweight if need[3] else None,
            doffset, None)


_local_loss.register_autograd(_backward, setup_context=_setup_context)


def local_loss(logits: Tensor, W: Tensor, y: Tensor, weight: Tensor, offset: Tensor | None = None,
               softmax: bool = True) -> Tensor:
    """Per-block weighted denoising loss.

    logits: [K, B, m]; W: [m, d]; y: [B]; weight: [K] or [K, B]; offset: [B, d] or None.
    loss[k] = mean_b weight[k(, b)] · ‖act(logits[k, b]) · W − (W[y_b] − offset_b)‖² with act =
    softmax, or the identity when softmax=False. Returns loss: [K] (float32, or float64 for float64
    inputs). Differentiable in logits, W, weight and offset.
    """
    return torch.ops.noprop.local_loss(logits, W, y, weight, offset, bool(softmax))
