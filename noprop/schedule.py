"""Noise schedules for NoProp.

Index direction (paper; docs/method.md §3): t = 0 is pure noise, t = T is (nearly) clean, so
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

__all__ = ["CTSchedule", "DTSchedule", "cosine_alpha_bar"]


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
        # A plain float, so the KL term traces under torch.compile without a data-dependent read.
        object.__setattr__(self, "_alpha_bar_0", float(ab[0]))

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
        ab0 = self._alpha_bar_0
        d = u_y.shape[-1]
        sq = u_y.float().pow(2).sum(-1)
        return 0.5 * (ab0 * sq - d * ab0 - d * math.log1p(-ab0)).mean()


# --- NoProp-CT: learnable monotone schedule ------------------------------------------------------

class CTSchedule(torch.nn.Module):
    """Learnable continuous-time schedule of NoProp-CT (docs/method.md §10), t ∈ [0, 1].

    SNR(t) = exp(−γ(t)),  γ(t) = γ_0 + (γ_1 − γ_0)·(1 − γ̄(t)),  ᾱ(t) = sigmoid(−γ(t)),
    γ̄(t) = (g(t) − g(0)) / (g(1) − g(0)) with g a two-layer network with positive weights:

        g(t) = s·t + Σ_j v_j · sigmoid(w_j·t + b_j),   s, v_j, w_j = softplus(raw) > 0.

    Choices the paper leaves open (documented here, tested in tests/test_continuous.py):
    - Direction: γ̄ increases from 0 to 1, so γ falls from γ_1 at t = 0 to γ_0 at t = 1 and SNR
      rises with t (t = 0 is noise, t = 1 is clean, as in NoProp-DT).
    - Ordering: γ_1 = γ_0 + softplus(gap) > γ_0 always, so the schedule stays strictly monotone
      whatever training does to the endpoints. Both endpoints are trainable.
    - Endpoint init: γ_0 = −3, γ_1 = +3, i.e. ᾱ(1) = 0.953 and ᾱ(0) = 0.047 (SNR from 0.05 to 20).
      The loss weight SNR′(t) grows like SNR(t), so the SNR range sets how much the nearly clean
      end (where z alone tells the class) outweighs the noisy end (where the network must read x).
      Measured on MNIST-5k (docs/continuous.md): ±ln(999) (the DT cosine range, SNR′ spanning 1e6)
      stalls near 80% test accuracy; ±3 reaches ~93% after 16 epochs; ±2 makes z_1 too noisy for
      the head. With one-hot embeddings ±3 keeps the classes of z_1 ~ q(z_1|y) separable by over 3σ.
    - Network: `hidden` sigmoid units (default 16) plus a positive linear skip s·t. The skip keeps
      g′ > 0 even where every sigmoid saturates. Init s = 1, v_j ≈ 0.01, w_j = 8 with centres
      −b_j/w_j spread over [0, 1]: γ̄ starts close to t (log-SNR close to linear in t).
    - SNR′(t) in closed form: SNR′ = (γ_1 − γ_0)·γ̄′(t)·SNR(t) > 0, γ̄′ = g′(t)/(g(1) − g(0)); it is
      differentiable in every parameter (tests compare it with autograd).
    The schedule computes in t's dtype: float64 grids give float64 inference coefficients.
    """

    def __init__(self, gamma_0: float = -3.0, gamma_1: float = 3.0, hidden: int = 16):
        super().__init__()
        if not gamma_1 > gamma_0:
            raise ValueError(f"need gamma_1 > gamma_0 so that SNR increases with t, got {gamma_0}, {gamma_1}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        inv_softplus = lambda v: v + math.log(-math.expm1(-v))  # noqa: E731
        self.gamma_0 = torch.nn.Parameter(torch.tensor(float(gamma_0)))
        self._gap = torch.nn.Parameter(torch.tensor(inv_softplus(gamma_1 - gamma_0)))
        self._skip = torch.nn.Parameter(torch.tensor(inv_softplus(1.0)))
        self._w1 = torch.nn.Parameter(torch.full((hidden,), inv_softplus(8.0)))
        self.b1 = torch.nn.Parameter(-8.0 * torch.linspace(0.0, 1.0, hidden))
        self._w2 = torch.nn.Parameter(torch.full((hidden,), inv_softplus(0.01)))

    @property
    def gamma_1(self) -> torch.Tensor:
        return self.gamma_0 + torch.nn.functional.softplus(self._gap)

    @staticmethod
    def check_t(t: torch.Tensor) -> torch.Tensor:
        """Raise unless t is a floating tensor with values in [0, 1]; returns it."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"t must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.numel() and bool(((t < 0) | (t > 1) | ~torch.isfinite(t)).any()):
            raise ValueError(f"t must lie in [0, 1] (0 = noise, 1 = clean), got values in "
                             f"[{t.min().item():.4g}, {t.max().item():.4g}]")
        return t

    def _params(self, dtype):
        sp = torch.nn.functional.softplus
        return (self.gamma_0.to(dtype), self.gamma_1.to(dtype), sp(self._skip).to(dtype), sp(self._w1).to(dtype),
                self.b1.to(dtype), sp(self._w2).to(dtype))

    def _g(self, t, s, w1, b1, w2):
        return s * t + (w2 * torch.sigmoid(t[..., None] * w1 + b1)).sum(-1)

    def _terms(self, t: torch.Tensor):
        """(γ(t), γ̄′(t)·(γ_1 − γ_0) = −γ′(t)) for any t shape, unchecked (internal fast path)."""
        g0, g1, s, w1, b1, w2 = self._params(t.dtype)
        ends = self._g(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device), s, w1, b1, w2)
        span = ends[1] - ends[0]
        gbar = (self._g(t, s, w1, b1, w2) - ends[0]) / span
        sig = torch.sigmoid(t[..., None] * w1 + b1)
        dgbar = (s + (w2 * w1 * sig * (1 - sig)).sum(-1)) / span
        return g0 + (g1 - g0) * (1 - gbar), (g1 - g0) * dgbar

    def gamma_bar(self, t: torch.Tensor) -> torch.Tensor:
        """γ̄(t) ∈ [0, 1], increasing, γ̄(0) = 0, γ̄(1) = 1."""
        g0, g1 = self.gamma_0.to(t.dtype), self.gamma_1.to(t.dtype)
        return 1 - (self.gamma(t) - g0) / (g1 - g0)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """γ(t) = −log SNR(t), decreasing in t; same shape as t."""
        return self._terms(self.check_t(t))[0]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = exp(−γ(t)) = ᾱ / (1 − ᾱ), increasing in t."""
        return torch.exp(-self.gamma(t))

    def snr_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """SNR′(t) = −γ′(t)·SNR(t) > 0 (closed form, differentiable in the parameters)."""
        gam, neg_dgamma = self._terms(self.check_t(t))
        return neg_dgamma * torch.exp(-gam)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ(t) = sigmoid(−γ(t)) ∈ (0, 1), increasing in t."""
        return torch.sigmoid(-self.gamma(t))

    def coefficients(self, t: torch.Tensor):
        """(√ᾱ(t), √(1 − ᾱ(t)), SNR′(t)) in one pass, for the training step; t unchecked values.

        1 − ᾱ is computed as sigmoid(γ), not 1 − sigmoid(−γ), to keep its precision near t = 1.
        """
        gam, neg_dgamma = self._terms(t)
        return torch.sigmoid(-gam).sqrt(), torch.sigmoid(gam).sqrt(), neg_dgamma * torch.exp(-gam)

    def kl_prior(self, u_y: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of KL(q(z_0|y) ‖ N(0, I)) = ½[ᾱ_0‖u_y‖² − d·ᾱ_0 − d·log(1 − ᾱ_0)],
        ᾱ_0 = ᾱ(0) = sigmoid(−γ_1). u_y: [B, d] -> scalar, differentiable in u_y and γ_1."""
        gam1 = self.gamma_1.float()
        ab0 = torch.sigmoid(-gam1)
        log_1m = torch.nn.functional.logsigmoid(gam1)  # log(1 − ᾱ_0) = log sigmoid(γ_1)
        d = u_y.shape[-1]
        return 0.5 * (ab0 * u_y.float().pow(2).sum(-1) - d * ab0 - d * log_1m).mean()

    @torch.no_grad()
    def grid(self, steps: int) -> DTSchedule:
        """The schedule on the grid t_i = i/steps (i = 0..steps) as a DTSchedule (float64), whose
        `inference_coefficients()` are then exactly the DT formulas with ᾱ_{t−1}, ᾱ_t the grid
        neighbours."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"the number of inference steps must be an int >= 1, got {steps!r}")
        t = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=self.gamma_0.device)
        return DTSchedule(torch.sigmoid(-self._terms(t)[0]).cpu())
