"""`noprop::local_loss`: every block's denoising loss in one launch.

loss[k] = mean_b weight[k(, b)] · ‖softmax(logits[k, b]) · W − W[y_b]‖²  (sum over the d dims)
The backward recomputes the residual softmax·W − W[y] instead of keeping a [K, B, d] tensor alive
between forward and backward; only the inputs are saved.
"""
from __future__ import annotations

import torch
from torch import Tensor

from noprop import dispatch
from . import checks


def _check(logits, W, y, weight):
    checks.floating("logits", logits, 3)
    checks.floating("W", W, 2)
    checks.same_device(logits=logits, W=W, y=y, weight=weight)
    K, B, m = logits.shape
    if B == 0:
        raise ValueError("logits has an empty batch dimension (B = 0)")
    if W.shape[0] != m:
        raise ValueError(f"logits has m = {m} classes but W has {W.shape[0]} rows (W must be [m, d])")
    if y.shape != (B,):
        raise ValueError(f"labels y must have shape [B] = [{B}] to match logits [K, B, m], got {tuple(y.shape)}")
    checks.labels(y, m)
    checks.coefficient("weight", weight, K, B)


@torch.library.custom_op("noprop::local_loss", mutates_args=())
def _local_loss(logits: Tensor, W: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    _check(logits, W, y, weight)
    return dispatch.implementation("local_loss", logits.device)(logits, W, y, weight)


def _loss_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@_local_loss.register_fake
def _(logits, W, y, weight):
    _check(logits, W, y, weight)  # also runs when any input is on meta
    return logits.new_empty((logits.shape[0],), dtype=_loss_dtype(logits, W, weight))


@torch.library.custom_op("noprop::local_loss_backward", mutates_args=())
def _local_loss_backward(grad_loss: Tensor, logits: Tensor, W: Tensor, y: Tensor,
                         weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad_loss = grad_loss.contiguous()
    return dispatch.implementation("local_loss_backward", logits.device)(grad_loss, logits, W, y, weight)


@_local_loss_backward.register_fake
def _(grad_loss, logits, W, y, weight):
    return torch.empty_like(logits), torch.empty_like(W), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_loss):
    logits, W, y, weight = ctx.saved_tensors
    dlogits, dW, dweight = torch.ops.noprop.local_loss_backward(grad_loss, logits, W, y, weight)
    need = ctx.needs_input_grad
    return (dlogits if need[0] else None, dW if need[1] else None, None, dweight if need[3] else None)


_local_loss.register_autograd(_backward, setup_context=_setup_context)


def local_loss(logits: Tensor, W: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """Per-block weighted denoising loss.

    logits: [K, B, m]; W: [m, d]; y: [B]; weight: [K] or [K, B]. Returns loss: [K] (float32, or
    float64 for float64 inputs). Differentiable in logits, W and weight.
    """
    return torch.ops.noprop.local_loss(logits, W, y, weight)
