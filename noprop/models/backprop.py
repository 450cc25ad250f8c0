"""Backprop baselines (docs/method.md §9).

`BackpropDT`: the paper's same-architecture baseline — the same T blocks and head trained end to
end through z_t = (1 − a_t)·z_{t−1} + a_t·û_t(z_{t−1}, x), a_t = tanh(w_t) learnable, z_0 ~ N(0, I).
The paper gives no initial w_t; with w_t = 0 the blocks start disconnected (a_t = 0) and the
baseline barely learns, which would flatter NoProp. We start at a_t = 0.5 (w_t = atanh 0.5).

`CNNClassifier` (in blocks.py) is the strongest fair reference for accuracy comparisons.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from noprop.embeddings import ClassEmbedding
from noprop.models.inputs import check_images, check_runs


class BackpropDT(nn.Module):
    """blocks: T modules or a factory t -> module; forward(x) -> logits [B, m] of head(z_T)."""

    def __init__(self, blocks: Sequence[nn.Module] | Callable[[int], nn.Module], embedding: ClassEmbedding,
                 num_blocks: int = 10, init_mix: float = 0.5, input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.input_shape = None if input_shape is None else tuple(input_shape)
        if callable(blocks) and not isinstance(blocks, nn.Module):
            blocks = [blocks(t) for t in range(1, num_blocks + 1)]
        self.blocks = nn.ModuleList(blocks)
        if not 0.0 < init_mix < 1.0:
            raise ValueError(f"init_mix (the initial a_t) must lie in (0, 1), got {init_mix}")
        self.w = nn.Parameter(torch.full((len(self.blocks),), math.atanh(init_mix)))
        self.embedding = embedding
        self.head = nn.Linear(embedding.dim, embedding.num_classes)

    @property
    def num_classes(self) -> int:
        """m, the number of classes (rows of the embedding W [m, d])."""
        return self.embedding.num_classes

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x [B, ...] -> logits [B, m] of head(z_T).

        z_0 [B, d] ~ N(0, I) (from `generator` when given), then for t = 1..T
        z_t = (1 − a_t)·z_{t−1} + a_t·softmax(block_t(x, z_{t−1}))·W, a_t = tanh(w_t): differentiable
        end to end, so backprop trains every block through the chain. Never sees a label."""
        check_images(x, self.input_shape)
        W = self.embedding.weight
        z = torch.randn(x.shape[0], W.shape[1], device=x.device, dtype=W.dtype, generator=generator)
        mix = torch.tanh(self.w)
        for t, block in enumerate(self.blocks):
            u_hat = torch.softmax(block(x, z), dim=-1) @ W
            z = (1 - mix[t]) * z + mix[t] * u_hat
        return self.head(z)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar training objective: mean cross-entropy of forward(x) [B, m] against labels y [B]
        (class indices); one backward reaches every block, the mixing weights w, the head and a learned embedding."""
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, runs: int = 1, generator: torch.Generator | None = None,
                      **_) -> torch.Tensor:
        """Class probabilities [B, m] for images x [B, ...]: softmax(forward(x)), averaged over `runs`
        draws of z_0 (runs >= 1). Other keywords (mean_chain, steps) are accepted and ignored, so one
        call serves every model in `noprop.training.evaluate`."""
        check_runs(runs)
        return sum(torch.softmax(self(x, generator), -1) for _ in range(runs)) / runs

    def predict(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Predicted classes [B] (int64): the argmax of `predict_proba(x, **kwargs)` [B, m]."""
        return self.predict_proba(x, **kwargs).argmax(-1)
