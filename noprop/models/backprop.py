"""Backprop baselines (docs/method.md §9).

`BackpropDT`: the paper's same-architecture baseline — the same T blocks and head trained end to
end through z_t = (1 − a_t)·z_{t−1} + a_t·û_t(z_{t−1}, x), a_t = tanh(w_t) learnable, z_0 ~ N(0, I).
The paper gives no initial w_t; with w_t = 0 the blocks start disconnected (a_t = 0) and the
baseline barely learns, which would flatter NoProp. We start at a_t = 0.5 (w_t = atanh 0.5).

Execution (`BACKPROP_EXECUTIONS`): 'loop' runs block after block; 'bank' holds the blocks in a
BlockBank (noprop.models.bank) and runs the T image branches, which read only x (97 % of the
multiply-adds of a DT block on MNIST), as one stacked call, then the z-chain block by block: the
treatment NoProp's stacked step gets, so a benchmark compares like with like (docs/design.md §11).
'auto' is a bank where NoProp-DT's 'auto' is (CUDA, >= 4 blocks that stack), else loop. The chain
itself cannot stack: block t reads z_{t-1}, the output of block t-1.

`CNNClassifier` (in blocks.py) is the strongest fair reference for accuracy comparisons.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from noprop import engine
from noprop.embeddings import ClassEmbedding
from noprop.models.bank import BlockBank, held_for
from noprop.models.inputs import check_images, check_runs

BACKPROP_EXECUTIONS = ("auto", "loop", "bank")
WHY_NOT_STACKED = ("backprop's blocks run one after another along z (block t reads block t-1's output): only their "
                   "image branches stack, in a bank")


def why_not_backprop_execution(execution: str) -> str | None:
    """None if the backprop baseline can run its blocks with `execution`, else why not (one line)."""
    if execution in BACKPROP_EXECUTIONS:
        return None
    if execution in engine.EXECUTIONS:
        return f"execution {execution!r}: {WHY_NOT_STACKED}; use one of {', '.join(BACKPROP_EXECUTIONS)}"
    return f"execution must be one of {BACKPROP_EXECUTIONS} for the backprop baseline, got {execution!r}"


class BackpropDT(nn.Module):
    """blocks: T modules or a factory t -> module; forward(x) -> logits [B, m] of head(z_T)."""

    def __init__(self, blocks: Sequence[nn.Module] | Callable[[int], nn.Module], embedding: ClassEmbedding,
                 num_blocks: int = 10, init_mix: float = 0.5, input_shape: tuple[int, ...] | None = None,
                 execution: str = "auto"):
        super().__init__()
        reason = why_not_backprop_execution(execution)
        if reason:
            raise ValueError(reason)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        if callable(blocks) and not isinstance(blocks, nn.Module):
            blocks = [blocks(t) for t in range(1, num_blocks + 1)]
        self.blocks = nn.ModuleList(blocks)
        if not 0.0 < init_mix < 1.0:
            raise ValueError(f"init_mix (the initial a_t) must lie in (0, 1), got {init_mix}")
        self.w = nn.Parameter(torch.full((len(self.blocks),), math.atanh(init_mix)))
        self.embedding = embedding
        self.head = nn.Linear(embedding.dim, embedding.num_classes)
        self._execution = "loop"
        self.set_execution(execution)

    @property
    def execution(self) -> str:
        """How the blocks run (BACKPROP_EXECUTIONS); set with `set_execution`."""
        return self._execution

    @property
    def is_bank(self) -> bool:
        """Whether the blocks are held as one BlockBank (stacked parameters) rather than separate modules."""
        return isinstance(self.blocks, BlockBank)

    def set_execution(self, execution: str, device=None) -> None:
        """Use `execution` from now on, on `device` (default: where the parameters are): the blocks move
        into a BlockBank where it resolves to one, back into separate modules where it does not (new
        parameter tensors: build optimizers after this call). Checkpoints keep per-block keys either way."""
        reason = why_not_backprop_execution(execution)
        if reason:
            raise ValueError(reason)
        if device is None:
            device = next(self.parameters()).device
        self.blocks = held_for(self.blocks, execution, device)  # 'bank' on blocks that differ raises why
        self._execution = execution

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
        if self.is_bank:
            return self.head(self._chain_bank(x, z, W, mix))
        for t, block in enumerate(self.blocks):
            u_hat = torch.softmax(block(x, z), dim=-1) @ W
            z = (1 - mix[t]) * z + mix[t] * u_hat
        return self.head(z)

    def _chain_bank(self, x, z, W, mix):
        """z_T through a bank: the T image branches in one stacked call, then the chain block by block."""
        bank = self.blocks
        # a bank that is not folded serves features through per-block views, which keep their own
        # gradients: it runs whole blocks instead
        feats = bank.features(x) if bank.folded else [None] * len(bank)
        with bank.one_at_a_time():
            for t in range(len(bank)):
                if feats[t] is None:  # a block without a features/from_features split
                    logits = bank(x, z.unsqueeze(0), slice(t, t + 1))[0]
                else:
                    logits = bank.logits_from_features(t, feats[t], z)
                z = (1 - mix[t]) * z + mix[t] * (torch.softmax(logits, dim=-1) @ W)
        return z

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
