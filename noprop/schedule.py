"""Noise schedules for NoProp.

Index direction (paper, method doc §1): t = 0 is pure noise, t = T is (nearly) clean, so
ᾱ_0 < ᾱ_1 < ... < ᾱ_T and SNR(t) = ᾱ_t / (1 - ᾱ_t) increases with t. This is the reverse of DDPM.

Clipping rule of the DT cosine schedule (the paper gives none): the cosine curve
f(t) = cos²(π/2 · (1 - t/T + s) / (1 + s)) / cos²(π/2 · s / (1 + s)), s = 0.008, has f(T) = 1
and f(0) ≈ 0. SNR(T) is infinite at ᾱ_T = 1, so we SCALE rather than clamp:
ᾱ_t = ᾱ_max · f(t) with ᾱ_max = 0.999 by default. Scaling keeps ᾱ strictly increasing for any T
(a clamp would flatten the top of the curve when T is large) and caps SNR(T) at ᾱ_max/(1-ᾱ_max).
ᾱ_0 is then ~1e-33: z_0 is pure noise, SNR(0) ≈ 0, and the KL term is ≈ 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DTSchedule", "cosine_alpha_bar"]


def cosine_alpha_bar(T: int, max_alpha_bar: float = 0.999, offset: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 0..T (float64, shape [T+1]), strictly increasing, ᾱ_T = max_alpha_bar."""
    if T < 1:
        raise ValueError(f"the number of blocks T must be >= 1, got {T}")
    if not 0.0 < max_alpha_bar < 1.0:
        raise ValueError(f"max_alpha_bar must lie in (0, 1) so that SNR(T) is finite, got {max_alpha_bar}")
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(math.pi / 2 * (1 - t / T + offset) / (1 + offset)) ** 2
    f = f / math.cos(math.pi / 2 * offset / (1 + offset)) ** 2
    return (max_alpha_bar * f).clamp_min(0.0)


@dataclass(frozen=True)
class DTSchedule:
    """Everything NoProp-DT derives from ᾱ: SNRs, per-block loss weights, inference coefficients.

    All tensors are float64 on the CPU; index t runs over 0..T unless noted.
    """

    alpha_bar: torch.Tensor  # [T+1]

    @classmethod
    def cosine(cls, T: int = 10, max_alpha_bar: float = 0.999) -> "DTSchedule":
        return cls(cosine_alpha_bar(T, max_alpha_bar))

    def __post_init__(self):
        ab = self.alpha_bar
        if ab.ndim != 1 or ab.numel() < 2:
            raise ValueError("alpha_bar must be a 1-D tensor with T+1 >= 2 entries")
        if not bool((ab[1:] > ab[:-1]).all()):
            raise ValueError("alpha_bar must be strictly increasing in t (t = 0 is noise, t = T is clean)")
        if not bool(((ab >= 0) & (ab < 1)).all()):
            raise ValueError("alpha_bar must lie in [0, 1)")

    @property
    def T(self) -> int:
        return self.alpha_bar.numel() - 1

    @property
    def snr(self) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t), [T+1]."""
        return self.alpha_bar / (1 - self.alpha_bar)

    @property
    def alpha(self) -> torch.Tensor:
        """α_{t-1} = ᾱ_{t-1} / ᾱ_t for t = 1..T, [T] (entry i is α_i)."""
        return self.alpha_bar[:-1] / self.alpha_bar[1:]

    def block_loss_weights(self, eta: float = 0.1) -> torch.Tensor:
        """(T/2) · η · (SNR(t) - SNR(t-1)) for blocks t = 1..T, [T]. All positive."""
        return self.T / 2 * eta * (self.snr[1:] - self.snr[:-1])

    def inference_coefficients(self):
        """(a_t, b_t, c_t) for t = 1..T (paper Eq. 3), each [T]; entry i is step t = i + 1.

        z_t = a_t · û_t + b_t · z_{t-1} + √c_t · ε with
        a_t = √ᾱ_t (1 - α_{t-1}) / (1 - ᾱ_{t-1}), b_t = √α_{t-1} (1 - ᾱ_t) / (1 - ᾱ_{t-1}),
        c_t = (1 - ᾱ_t)(1 - α_{t-1}) / (1 - ᾱ_{t-1}).
        """
        ab_t, ab_prev, a_prev = self.alpha_bar[1:], self.alpha_bar[:-1], self.alpha
        a = ab_t.sqrt() * (1 - a_prev) / (1 - ab_prev)
        b = a_prev.sqrt() * (1 - ab_t) / (1 - ab_prev)
        c = (1 - ab_t) * (1 - a_prev) / (1 - ab_prev)
        return a, b, c

    def kl_prior(self, u_y: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of KL(q(z_0|y) ‖ N(0, I)) = ½[ᾱ_0‖u_y‖² − d·ᾱ_0 − d·log(1−ᾱ_0)].

        u_y: [B, d] -> scalar. Differentiable in u_y (learned embeddings).
        """
        ab0 = float(self.alpha_bar[0])
        d = u_y.shape[-1]
        sq = u_y.float().pow(2).sum(-1)
        return 0.5 * (ab0 * sq - d * ab0 - d * math.log1p(-ab0)).mean()
