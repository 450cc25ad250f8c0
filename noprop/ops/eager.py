"""Eager PyTorch references of NoProp's fused ops: the CPU kernels and the fallback everywhere.

Each function here is also the float64 reference: called on float64 inputs it computes in float64
(noise included, see `philox.py`). For fp16/bf16/fp32 inputs it computes in float32, as the fused
kernels do. Shapes: K blocks, B samples, m classes, d embedding dims.
"""
from __future__ import annotations

import torch

from .philox import philox_randn


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any (non-None) input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(coef: torch.Tensor, K: int, B: int, dtype) -> torch.Tensor:
    """Coefficient [K] or [K, B] -> [K, B, 1] in `dtype`."""
    c = coef.to(dtype)
    return (c[:, None] if c.ndim == 1 else c).expand(K, B)[..., None]


def noise(seed: torch.Tensor, K: int, B: int, d: int, dtype, device) -> torch.Tensor:
    """ε [K, B, d]: element (k, b, j) is lane j % 4 of Philox counter (k·B + b)·Q + j // 4, Q = ⌈d/4⌉."""
    return philox_randn(seed, (K, B, d), device=device, dtype=dtype)


def noise_inject(W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    """z [K, B, d] = sqrt_abar[k] · W[y_b] + sqrt_one_minus_abar[k] · ε[k, b]."""
    K, B, d = sqrt_abar.shape[0], y.shape[0], W.shape[1]
    ct = compute_dtype(W, sqrt_abar, sqrt_one_minus_abar)
    u = W.to(ct)[y]  # [B, d]
    eps = noise(seed, K, B, d, ct, W.device)
    z = _per_sample(sqrt_abar, K, B, ct) * u + _per_sample(sqrt_one_minus_abar, K, B, ct) * eps
    return z.to(W.dtype)


def noise_inject_backward(grad_z, W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    """Gradients (dW [m, d], d_sqrt_abar, d_sqrt_one_minus_abar) of noise_inject. ε is regenerated."""
    K, B, d = grad_z.shape
    ct = compute_dtype(grad_z, W, sqrt_abar)
    g = grad_z.to(ct)
    u = W.to(ct)[y]
    sa = _per_sample(sqrt_abar, K, B, ct)
    dW = torch.zeros(W.shape, dtype=ct, device=W.device).index_add_(0, y, (g * sa).sum(0))
    d_sa = (g * u).sum(-1)  # [K, B]
    d_s1m = (g * noise(seed, K, B, d, ct, W.device)).sum(-1)
    if sqrt_abar.ndim == 1:
        d_sa = d_sa.sum(1)
    if sqrt_one_minus_abar.ndim == 1:
        d_s1m = d_s1m.sum(1)
    return dW.to(W.dtype), d_sa.to(sqrt_abar.dtype), d_s1m.to(sqrt_one_minus_abar.dtype)


def _activation(logits, ct, softmax: bool):
    """softmax(logits) (the DT/CT denoiser's class probabilities) or the raw logits (FM's velocity)."""
    x = logits.to(ct)
    return torch.softmax(x, dim=-1) if softmax else x


def _residual(logits, W, y, ct, offset, softmax):
    """(p [K, B, m], W in ct, r [K, B, d] = p · W − (W[y] − offset))."""
    p = _activation(logits, ct, softmax)
    Wc = W.to(ct)
    r = p @ Wc - Wc[y]
    if offset is not None:
        r = r + offset.to(ct)
    return p, Wc, r


def _weights(weight, K, B, ct):
    return _per_sample(weight, K, B, ct)[..., 0]  # [K, B]


def local_loss(logits, W, y, weight, offset=None, softmax: bool = True):
    """loss [K] = mean_b weight[k(,b)] · ‖act(logits[k, b]) · W − (W[y_b] − offset_b)‖² (sum over d).

    act = softmax (default) or identity; offset [B, d] (None = 0) shifts the target, e.g. FM's
    velocity target u_y − z_0 is offset = z_0 with softmax=False.
    """
    K, B, _ = logits.shape
    ct = compute_dtype(logits, W, weight, offset)
    _, _, r = _residual(logits, W, y, ct, offset, softmax)
    loss = (_weights(weight, K, B, ct) * r.pow(2).sum(-1)).mean(1)
    return loss.to(ct)


def local_loss_backward(grad_loss, logits, W, y, weight, offset=None, softmax: bool = True):
    """(dlogits [K, B, m], dW [m, d], dweight like weight) of local_loss; r is recomputed here.

    The offset's own gradient is `local_loss_offset_grad` (rarely needed: FM's z_0 is noise)."""
    K, B, _ = logits.shape
    ct = compute_dtype(logits, W, weight, offset)
    p, Wc, r = _residual(logits, W, y, ct, offset, softmax)
    w = _weights(weight, K, B, ct)
    coef = (2.0 / B) * grad_loss.to(ct)[:, None] * w  # [K, B]
    gp = coef[..., None] * (r @ Wc.T)  # dL/dp: [K, B, m]
    dlogits = p * (gp - (gp * p).sum(-1, keepdim=True)) if softmax else gp
    gr = coef[..., None] * r  # dL/d(pW): [K, B, d]
    dW = torch.einsum("kbm,kbd->md", p, gr)
    dW = dW.index_add_(0, y, -gr.sum(0))
    dweight = grad_loss.to(ct)[:, None] * r.pow(2).sum(-1) / B  # [K, B]
    if weight.ndim == 1:
        dweight = dweight.sum(1)
    return dlogits.to(logits.dtype), dW.to(W.dtype), dweight.to(weight.dtype)


def local_loss_offset_grad(grad_loss, logits, W, y, weight, offset, softmax: bool = True):
    """d loss / d offset [B, d] = Σ_k (2/B) · grad_loss[k] · weight[k(,b)] · r[k, b] (offset's dtype)."""
    K, B, _ = logits.shape
    ct = compute_dtype(logits, W, weight, offset)
    _, _, r = _residual(logits, W, y, ct, offset, softmax)
    coef = (2.0 / B) * grad_loss.to(ct)[:, None] * _weights(weight, K, B, ct)
    return (coef[..., None] * r).sum(0).to(offset.dtype)


def denoise_step(logits, W, z_prev, a: float, b: float, sqrt_c: float, seed, softmax: bool = True):
    """z_next [B, d] = a · act(logits) · W + b · z_prev + sqrt_c · ε (ε: row b of the noise stream).

    act = softmax (DT/CT's Eq. 3 step) or identity (FM's Euler step z + h·v: a = h, b = 1, sqrt_c = 0).
    """
    B, d = z_prev.shape
    ct = compute_dtype(logits, W, z_prev)
    u_hat = _activation(logits, ct, softmax) @ W.to(ct)
    z = a * u_hat + b * z_prev.to(ct)
    if sqrt_c != 0.0:
        z = z + sqrt_c * noise(seed, 1, B, d, ct, z_prev.device)[0]
    return z.to(z_prev.dtype)
