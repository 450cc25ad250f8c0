"""The network of NoProp-CT and NoProp-FM (docs/method.md §10): one block that also takes the time t.

forward(x [B, C, H, W], z [B, d], t [B]) -> logits [B, m]. NoProp-CT turns the logits into
û = softmax(logits) · W, NoProp-FM into a velocity v = logits · W (no softmax). Any module with
this signature can replace `CTBlock` in `NoPropCT` / `NoPropFM`.

Architecture (paper, no BatchNorm anywhere in this network):
  x → the DT conv stack (3×3 valid convs, pools, dropout 0.2) → FC256 → ReLU
  z → FC256 → ReLU                 (prototype embeddings: z is an image and goes through its own
                                   conv branch of the same kind)
  t → 64-dim sinusoidal embedding → FC256 → ReLU
  concat (768) → FC256 → ReLU → FC128 → ReLU → FC m
"""
from __future__ import annotations

import math

import torch
from torch import nn

from noprop.models.blocks import ConvBranch


def sinusoidal_time_embedding(t: torch.Tensor, dim: int = 64, scale: float = 1000.0,
                              max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style embedding of t [B] -> [B, dim]: [sin(s·t·f_k), cos(s·t·f_k)],
    f_k = max_period^(−k/(dim/2)), k = 0..dim/2−1.

    The paper gives no formula. t ∈ [0, 1] is scaled by `scale` = 1000 (as DDPM's integer steps) so
    that the fastest frequency turns about one radian per 1/1000 of t: neighbouring points of the
    default 1000-step inference grid get distinguishable embeddings.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"the time embedding dimension must be even and >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (scale * t.float())[:, None] * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class CTConvBranch(ConvBranch):
    """The DT conv stack ending FC256 → ReLU instead of FC256 → BN.  [B, C, H, W] -> [B, width]."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 256, dropout: float = 0.2):
        super().__init__(image_shape, width, dropout)
        self.fc = nn.Sequential(nn.Linear(self.fc[0].in_features, width), nn.ReLU())


def check_time(t, batch: int, device=None) -> torch.Tensor:
    """t as a float tensor [B]: a number or 0-d tensor is broadcast; raises on bad shape or range."""
    if isinstance(t, (int, float)):
        t = torch.full((batch,), float(t), device=device)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"t must be a float or a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape [B] = [{batch}] (one time per sample) or be a scalar, "
                         f"got {tuple(t.shape)}")
    if bool(((t < 0) | (t > 1) | ~torch.isfinite(t)).any()):
        raise ValueError(f"t must lie in [0, 1] (0 = noise, 1 = clean), got values in "
                         f"[{t.min().item():.4g}, {t.max().item():.4g}]")
    return t


class CTBlock(nn.Module):
    """û(z_t, x, t): (x [B, C, H, W], z [B, d], t [B]) -> logits [B, m].

    `features(x)` and `from_features(f, z, t)` split the work so that inference runs the image
    branch once per image instead of once per time step.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, embed_dim: int,
                 z_image_shape: tuple[int, int, int] | None = None, width: int = 256, time_dim: int = 64):
        super().__init__()
        self.embed_dim, self.z_image_shape, self.time_dim = embed_dim, z_image_shape, time_dim
        self.image = CTConvBranch(tuple(image_shape), width)
        if z_image_shape is not None:
            self.label = CTConvBranch(tuple(z_image_shape), width)
        else:
            self.label = nn.Sequential(nn.Linear(embed_dim, width), nn.ReLU())
        self.time = nn.Sequential(nn.Linear(time_dim, width), nn.ReLU())
        self.fuse = nn.Sequential(
            nn.Linear(3 * width, width), nn.ReLU(),
            nn.Linear(width, 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.image(x)

    def from_features(self, feats: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """feats [B, width], z [B, d], t [B] (unchecked) -> logits [B, m]."""
        if self.z_image_shape is not None:
            z = z.reshape(z.shape[0], *self.z_image_shape)
        temb = self.time(sinusoidal_time_embedding(t, self.time_dim).to(feats.dtype))
        return self.fuse(torch.cat([feats, self.label(z), temb], dim=1))

    def forward(self, x: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        if z.ndim != 2 or z.shape != (x.shape[0], self.embed_dim):
            raise ValueError(f"z must have shape [B, d] = [{x.shape[0]}, {self.embed_dim}], got {tuple(z.shape)}")
        t = check_time(t, x.shape[0], x.device)
        return self.from_features(self.features(x), z, t)


def ct_block(image_shape, num_classes: int, embedding) -> CTBlock:
    """The paper's CT/FM network for `embedding` (prototype embeddings get a conv z-branch)."""
    z_shape = embedding.image_shape if embedding.kind == "prototype" else None
    return CTBlock(tuple(image_shape), num_classes, embedding.dim, z_shape)
