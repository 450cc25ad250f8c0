"""`noprop::noise_inject`: sample every block's input z ~ q(z_t | y) in one launch.

z[k, b] = sqrt_abar[k] · W[y_b] + sqrt_one_minus_abar[k] · ε[k, b]
(coefficients [K] per block, or [K, B] per sample for continuous time).
ε comes from a counter-based generator keyed by `seed`, so it is never stored: the backward
regenerates it (needed only for the coefficient gradient; dW needs no ε at all).
"""
from __future__ import annotations

import torch
from torch import Tensor

from noprop import dispatch
from . import checks
from .philox import new_seed


def _check(W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    checks.floating("W", W, 2)
    device = checks.same_device(W=W, y=y, sqrt_abar=sqrt_abar, sqrt_one_minus_abar=sqrt_one_minus_abar)
    checks.labels(y, W.shape[0])
    K = checks.coefficient("sqrt_abar", sqrt_abar, None, y.shape[0])
    checks.coefficient("sqrt_one_minus_abar", sqrt_one_minus_abar, K, y.shape[0])
    checks.seed(seed, device)
    return K


@torch.library.custom_op("noprop::noise_inject", mutates_args=())
def _noise_inject(W: Tensor, y: Tensor, sqrt_abar: Tensor, sqrt_one_minus_abar: Tensor, seed: Tensor) -> Tensor:
    _check(W, y, sqrt_abar, sqrt_one_minus_abar, seed)
    return dispatch.implementation("noise_inject", W.device)(W, y, sqrt_abar, sqrt_one_minus_abar, seed)


@_noise_inject.register_fake
def _(W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    _check(W, y, sqrt_abar, sqrt_one_minus_abar, seed)  # also runs when any input is on meta
    return W.new_empty((sqrt_abar.shape[0], y.shape[0], W.shape[1]))


@torch.library.custom_op("noprop::noise_inject_backward", mutates_args=())
def _noise_inject_backward(grad_z: Tensor, W: Tensor, y: Tensor, sqrt_abar: Tensor,
                           sqrt_one_minus_abar: Tensor, seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad_z = grad_z.contiguous()
    return dispatch.implementation("noise_inject_backward", W.device)(
        grad_z, W, y, sqrt_abar, sqrt_one_minus_abar, seed)


@_noise_inject_backward.register_fake
def _(grad_z, W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    return torch.empty_like(W), torch.empty_like(sqrt_abar), torch.empty_like(sqrt_one_minus_abar)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.backend = dispatch.requested_backend()


def _backward(ctx, grad_z):
    W, y, sa, s1m, seed = ctx.saved_tensors
    with dispatch.use_backend(ctx.backend):  # autograd's thread does not see the forward's request
        dW, d_sa, d_s1m = torch.ops.noprop.noise_inject_backward(grad_z, W, y, sa, s1m, seed)
    need = ctx.needs_input_grad
    return (dW if need[0] else None, None, d_sa if need[2] else None, d_s1m if need[3] else None, None)


_noise_inject.register_autograd(_backward, setup_context=_setup_context)


def noise_inject(W: Tensor, y: Tensor, sqrt_abar: Tensor, sqrt_one_minus_abar: Tensor,
                 seed: Tensor | None = None, return_eps: bool = False):
    """Noised embeddings for K blocks at once.

    W: [m, d] class embeddings; y: [B] labels; sqrt_abar, sqrt_one_minus_abar: [K] or [K, B];
    seed: int64 [1] (drawn from torch's generator when None). Returns z: [K, B, d] in W's dtype,
    and with return_eps=True also ε: [K, B, d] (regenerated from the same seed, for tests).
    """
    if seed is None:
        seed = new_seed(W.device)
    z = torch.ops.noprop.noise_inject(W, y, sqrt_abar, sqrt_one_minus_abar, seed)
    if not return_eps:
        return z
    # ε alone is the same op with zero signal and unit noise: the same counters, the same draws.
    eps = torch.ops.noprop.noise_inject(torch.zeros_like(W), y, torch.zeros_like(sqrt_abar),
                                        torch.ones_like(sqrt_one_minus_abar), seed)
    return z, eps
