"""NoProp-CT and NoProp-FM (docs/method.md §10): one network û(z_t, x, t), per-sample t ~ U(0, 1).

Both models take any network `net` with forward(x [B, ...], z [B, d], t [B]) -> logits [B, m]
(the paper's is `CTBlock`). Training samples z_t from the label, never from a chain: inference is
the only place a chain runs, and inference never reads a label.

NoProp-CT (t = 0 noise, t = 1 clean; learnable `CTSchedule`):
    loss = CE(head(z_1), y) + KL(q(z_0|y) ‖ N(0, I)) + (η/2)·SNR′(t)·‖softmax(logits)·W − u_y‖²
    with z_t, z_1 ~ q(·|y) from `noise_inject` (per-sample coefficients, so the schedule's
    parameters get gradients through the noising and through the `local_loss` weights).
    Inference: the Eq. 3 update (`denoise_step`) on the grid t_i = i/N from z_0 ~ N(0, I).

NoProp-FM:
    z_t = t·u_y + (1 − t)·z_0 + σ·ε,  v = logits·W (no softmax),  loss = ‖v − (u_y − z_0)‖²
    (+ CE on z̃_1 = z_t + (1 − t)·v when W is learned). Inference: N Euler steps of dz/dt = v
    from z_0 ~ N(0, I); ŷ = the class whose embedding is nearest z_1. The same fused ops as CT:
    `noise_inject` (z_t and z_0 from one seed), `local_loss(softmax=False, offset=z_0)` and
    `denoise_step(softmax=False)` as the Euler step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from noprop.embeddings import ClassEmbedding
from noprop.models.inputs import check_images, check_runs
from noprop.ops import denoise_step, local_loss, new_seed, noise_inject
from noprop.schedule import CTSchedule


def _initial_z(B: int, W: torch.Tensor, z0: torch.Tensor | None, generator) -> torch.Tensor:
    """z_0 [B, d] of an inference chain: the given z0 (checked), else N(0, I) noise."""
    if z0 is None:
        return torch.randn(B, W.shape[1], device=W.device, generator=generator, dtype=W.dtype)
    if z0.shape != (B, W.shape[1]):
        raise ValueError(f"z0 must have shape [B, d] = [{B}, {W.shape[1]}], got {tuple(z0.shape)}")
    return z0.to(W.dtype).contiguous()


@dataclass
class ContinuousLosses:
    """Parts of the CT / FM objective for one minibatch (scalars)."""

    total: torch.Tensor
    local: torch.Tensor  # CT: (η/2)·SNR′(t)-weighted denoising loss; FM: flow-matching loss
    ce: torch.Tensor  # CT: CE(head(z_1)); FM: CE on z̃_1 (0 for a fixed embedding)
    kl: torch.Tensor  # CT: KL(q(z_0|y) ‖ N(0, I)); FM: 0


class _Continuous(nn.Module):
    """What CT and FM share: the network, W, input checks, the feature split, predict()."""

    def __init__(self, net: nn.Module, embedding: ClassEmbedding, input_shape=None, inference_steps: int = 1000):
        super().__init__()
        if not isinstance(net, nn.Module) or not any(True for _ in net.parameters()):
            raise ValueError(f"the network ({type(net).__name__}) must be an nn.Module with parameters")
        self.net, self.embedding = net, embedding
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.inference_steps = self._check_steps(inference_steps)

    @property
    def num_classes(self) -> int:
        return self.embedding.num_classes

    @staticmethod
    def _check_steps(steps) -> int:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"the number of inference steps must be an int >= 1, got {steps!r}")
        return steps

    def _check_batch(self, x, y):
        check_images(x, self.input_shape)
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
            raise ValueError(f"labels y must have shape [B] = [{x.shape[0]}], got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")

    def _logits(self, x, feats, z, t):
        """Network output for z [B, d] at times t [B], via the feature split when the net has one."""
        out = self.net.from_features(feats, z, t) if feats is not None else self.net(x, z, t)
        if not isinstance(out, torch.Tensor) or out.shape != (z.shape[0], self.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the network ({type(self.net).__name__}) must return logits of shape [B, m] = "
                             f"[{z.shape[0]}, {self.num_classes}], got {got}")
        return out

    def _features(self, x):
        has_split = hasattr(self.net, "features") and hasattr(self.net, "from_features")
        return self.net.features(x) if has_split else None

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar training objective on minibatch (x [B, ...], y [B])."""
        return self.losses(x, y).total

    def predict(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Predicted classes [B] (argmax of `predict_proba`)."""
        return self.predict_proba(x, **kwargs).argmax(dim=-1)

    def _prepare(self, x, steps, runs):
        check_runs(runs)
        check_images(x, self.input_shape)
        return self._check_steps(self.inference_steps if steps is None else steps)


class ScaledHead(nn.Linear):
    """Linear(d, m) computed as scale·(W′z + b′), W′ and b′ initialised at 1/scale of nn.Linear's
    init: the same function at init, but Adam-type optimizers (whose steps are about lr per
    parameter whatever the gradient's size) move its logits `scale` times faster. That is a head
    learning rate `scale`× the network's, without a separate optimizer group. z [B, d] -> [B, m]."""

    def __init__(self, d: int, m: int, scale: float = 1.0):
        super().__init__(d, m)
        if not scale > 0:
            raise ValueError(f"head scale must be > 0, got {scale}")
        self.scale = float(scale)
        with torch.no_grad():
            self.weight.div_(self.scale)
            self.bias.div_(self.scale)

    def forward(self, z):
        return self.scale * F.linear(z, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


class NoPropCT(_Continuous):
    """NoProp-CT: net (x, z, t) -> logits, W [m, d], head Linear(d, m), learnable `CTSchedule`.

    head_scale (default 10): the head is a `ScaledHead`, i.e. it learns `head_scale`× faster under
    Adam. The paper leaves the learning rates open; its runs take ~47k steps (MNIST, 100 epochs)
    where a 4k-image set gets ~30 per epoch, and at lr 1e-3 the linear readout of z_1 — not the
    network — then limits test accuracy for the first tens of epochs (measured: docs/continuous.md).
    NoProp-DT's parallel mode scales its head's learning rate by T = 10 for a similar reason.
    """

    def __init__(self, net: nn.Module, embedding: ClassEmbedding, schedule: CTSchedule | None = None,
                 eta: float = 1.0, input_shape=None, inference_steps: int = 1000, head_scale: float = 10.0):
        super().__init__(net, embedding, input_shape, inference_steps)
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        self.schedule = schedule if schedule is not None else CTSchedule()
        self.head = ScaledHead(embedding.dim, embedding.num_classes, head_scale)
        self.eta = eta

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> ContinuousLosses:
        """CE(head(z_1)) + KL + (η/2)·SNR′(t)·‖û(z_t, x, t) − u_y‖² (sum over d), per-sample t."""
        self._check_batch(x, y)
        W = self.embedding.weight
        B = x.shape[0]
        t = torch.rand(B, device=x.device)
        ends = torch.ones(1, device=x.device)
        sa, s1m, dsnr = self.schedule.coefficients(torch.cat([t, ends]))
        # Row 0: z_t for the network (per-sample t); row 1: z_1 for the head. One launch; the
        # coefficient gradients flow back into the schedule's parameters.
        sqrt_ab = torch.stack([sa[:B], sa[B:].expand(B)]).contiguous()
        sqrt_1m = torch.stack([s1m[:B], s1m[B:].expand(B)]).contiguous()
        z = noise_inject(W, y, sqrt_ab.to(W.dtype), sqrt_1m.to(W.dtype), new_seed(W.device))
        logits = self._logits(x, None, z[0], t)
        weight = (0.5 * self.eta * dsnr[:B])[None].contiguous()  # [1, B], differentiable
        local = local_loss(logits[None], W, y, weight.to(W.dtype))[0]
        ce = F.cross_entropy(self.head(z[1]), y)
        kl = self.schedule.kl_prior(W[y])
        return ContinuousLosses(local + ce + kl, local, ce, kl)

    @torch.no_grad()
    def chain(self, x: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
              mean_chain: bool = False, z0: torch.Tensor | None = None, keep=()):
        """Run the label-free Eq. 3 chain on the grid t_i = i/N: x [B, ...] -> z_1 [B, d].

        z_0 ~ N(0, I) unless given; step i (1..N) feeds z_{t_{i−1}} and t_{i−1} to the network and
        applies `denoise_step` with the DT a, b, c of ᾱ(t_{i−1}), ᾱ(t_i). `keep`: grid indices whose
        z to return too, as (z_1, {i: z_i}).
        """
        N = self._prepare(x, steps, 1)
        W = self.embedding.weight
        a, b, c = self.schedule.grid(N).inference_coefficients()
        a, b, sqrt_c = a.tolist(), b.tolist(), c.sqrt().tolist()
        feats = self._features(x)
        B = x.shape[0]
        z = _initial_z(B, W, z0, generator)
        kept = {0: z} if 0 in keep else {}
        for i in range(1, N + 1):
            t = torch.full((B,), (i - 1) / N, device=x.device)
            logits = self._logits(x, feats, z, t)
            seed = new_seed(x.device, generator)
            z = denoise_step(logits.contiguous(), W, z, a[i - 1], b[i - 1], 0.0 if mean_chain else sqrt_c[i - 1], seed)
            if i in keep:
                kept[i] = z
        return (z, kept) if keep else z

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, steps: int | None = None, runs: int = 1,
                      generator: torch.Generator | None = None, mean_chain: bool = False) -> torch.Tensor:
        """Class probabilities [B, m] = softmax(head(z_1)), averaged over `runs` chains.

        steps: grid size N (default `inference_steps`, 1000); mean_chain drops the noise (√c = 0).
        Never sees a label.
        """
        self._prepare(x, steps, runs)
        probs = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        for _ in range(runs):
            z = self.chain(x, steps, generator, mean_chain)
            probs += torch.softmax(self.head(z).float(), dim=-1)
        return probs / runs


class NoPropFM(_Continuous):
    """NoProp-FM: net (x, z, t) -> logits, velocity v = logits·W, W [m, d]; no head.

    sigma: std of the small extra noise on the path (the paper gives none). 0.01 by default: with
    u_y of norm ~1 (one-hot, orthonormal learned rows) it blurs the straight paths by ~1% and keeps
    z_t off an exactly degenerate set near t = 1. The velocity target u_y − z_0 is unchanged
    (constant-σ conditional flow matching).
    CE on z̃_1 (learned embeddings only) uses logits −‖z̃_1 − u_c‖²: the same rule as inference
    (nearest embedding), so it needs no extra head and directly keeps the class embeddings apart.
    """

    def __init__(self, net: nn.Module, embedding: ClassEmbedding, sigma: float = 0.01, input_shape=None,
                 inference_steps: int = 1000):
        super().__init__(net, embedding, input_shape, inference_steps)
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    @staticmethod
    def class_logits(z: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """−‖z − u_c‖² for every class: z [B, d], W [m, d] -> [B, m] (argmax = nearest embedding)."""
        return -(z.pow(2).sum(-1, keepdim=True) - 2 * z @ W.T + W.pow(2).sum(-1))

    def velocity(self, x, feats, z, t):
        """v(z_t, x, t) = logits·W [B, d] (feats: `net.features(x)` or None). Training and the Euler
        chain never form it: the fused ops take the logits (softmax=False) instead."""
        return self._logits(x, feats, z, t) @ self.embedding.weight

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> ContinuousLosses:
        """‖v(z_t, x, t) − (u_y − z_0)‖² (sum over d, mean over the batch) [+ CE on z̃_1]."""
        self._check_batch(x, y)
        W = self.embedding.weight
        B = x.shape[0]
        t = torch.rand(B, device=x.device)
        tc = t[:, None].to(W.dtype)
        # The path through the fused ops: noise_inject with per-sample coefficients (t, 1 − t) gives
        # z_t = t·u_y + (1 − t)·z_0 and, from the same seed, z_0 itself; local_loss without softmax
        # and with offset z_0 is ‖logits·W − (u_y − z_0)‖², so v = logits·W is never materialised.
        zt, z0 = noise_inject(W, y, tc.T.contiguous(), (1 - tc).T.contiguous(), new_seed(W.device),
                              return_eps=True)
        zt, z0 = zt[0], z0[0]
        if self.sigma > 0:
            zt = zt + self.sigma * torch.randn_like(zt)
        logits = self._logits(x, None, zt, t)
        fm = local_loss(logits[None].contiguous(), W, y, W.new_ones(1), offset=z0, softmax=False)[0]
        zero = fm.new_zeros(())
        if self.embedding.trainable:
            v = logits @ W
            ce = F.cross_entropy(self.class_logits(zt + (1 - tc) * v, W), y)
        else:
            ce = zero
        return ContinuousLosses(fm + ce, fm, ce, zero)

    @torch.no_grad()
    def chain(self, x: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
              z0: torch.Tensor | None = None) -> torch.Tensor:
        """N Euler steps z_{i+1} = z_i + (1/N)·v(z_i, x, t_i), t_i = i/N, from z_0 ~ N(0, I) (or z0)."""
        N = self._prepare(x, steps, 1)
        W = self.embedding.weight
        B = x.shape[0]
        z = _initial_z(B, W, z0, generator)
        feats = self._features(x)
        no_noise = torch.zeros(1, dtype=torch.int64, device=W.device)  # sqrt_c = 0: the seed is never read
        for i in range(N):
            t = torch.full((B,), i / N, device=x.device)
            logits = self._logits(x, feats, z, t).contiguous()
            z = denoise_step(logits, W, z, 1.0 / N, 1.0, 0.0, no_noise, softmax=False)  # z + h·logits·W
        return z

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, steps: int | None = None, runs: int = 1,
                      generator: torch.Generator | None = None, mean_chain: bool = False) -> torch.Tensor:
        """softmax(−‖z_1 − u_c‖²) [B, m] (argmax = the class whose embedding is nearest z_1),
        averaged over `runs` draws of z_0. mean_chain is accepted for a common interface and
        changes nothing: the Euler chain adds no noise. Never sees a label."""
        self._prepare(x, steps, runs)
        W = self.embedding.weight
        probs = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        for _ in range(runs):
            probs += torch.softmax(self.class_logits(self.chain(x, steps, generator), W).float(), dim=-1)
        return probs / runs
