"""`noprop::denoise_step`: one label-free inference step z_{t-1} -> z_t (paper Eq. 3).

z_next = a · act(logits) · W + b · z_prev + sqrt_c · ε. Inference only (no autograd).
act = softmax (DT/CT) or the identity (softmax=False: FM's Euler step z + h·v with v = logits·W,
a = h, b = 1, sqrt_c = 0). sqrt_c = 0 gives the mean (noise-free) chain. ε[b, j] is lane j % 4
of Philox counter b·⌈d/4⌉ + j // 4 of `seed` (noprop/ops/philox.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from noprop import dispatch
from . import checks
from .philox import new_seed


def _check(logits, W, z_prev, seed):
    checks.floating("logits", logits, 2)
    checks.floating("W", W, 2)
    checks.floating("z_prev", z_prev, 2)
    device = checks.same_device(logits=logits, W=W, z_prev=z_prev)
    B, m = logits.shape
    if B == 0:
        raise ValueError("logits has an empty batch (B = 0)")
    if W.shape[0] != m:
        raise ValueError(f"logits has m = {m} classes but W has {W.shape[0]} rows (W must be [m, d])")
    if z_prev.shape != (B, W.shape[1]):
        raise ValueError(f"z_prev must have shape [B, d] = [{B}, {W.shape[1]}], got {tuple(z_prev.shape)}")
    checks.seed(seed, device)


@torch.library.custom_op("noprop::denoise_step", mutates_args=())
def _denoise_step(logits: Tensor, W: Tensor, z_prev: Tensor, a: float, b: float, sqrt_c: float,
                  seed: Tensor, softmax: bool = True) -> Tensor:
    _check(logits, W, z_prev, seed)
    return dispatch.implementation("denoise_step", z_prev.device)(logits, W, z_prev, a, b, sqrt_c, seed, softmax)


@_denoise_step.register_fake
def _(logits, W, z_prev, a, b, sqrt_c, seed, softmax=True):
    _check(logits, W, z_prev, seed)  # also runs when any input is on meta
    return torch.empty_like(z_prev)


def denoise_step(logits: Tensor, W: Tensor, z_prev: Tensor, a: float, b: float, sqrt_c: float,
                 seed: Tensor | None = None, softmax: bool = True) -> Tensor:
    """logits: [B, m]; W: [m, d]; z_prev: [B, d]; a, b, sqrt_c: floats; seed: int64 [1].

    Returns z_next: [B, d] in z_prev's dtype: a · act(logits) · W + b · z_prev + sqrt_c · ε, with
    act = softmax, or the identity when softmax=False.
    """
    if seed is None:
        seed = new_seed(z_prev.device)
    return torch.ops.noprop.denoise_step(logits, W, z_prev, float(a), float(b), float(sqrt_c), seed, bool(softmax))
