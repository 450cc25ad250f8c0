"""How the blocks of a NoProp-DT model execute: one by one (`loop`) or stacked (`vmap`).

Stacked execution runs T structurally identical blocks as one batched computation with
`torch.func.functional_call` under `vmap`: convolutions become grouped convolutions and the fully
connected layers batched matmuls. Per-block parameters stay the source of truth (they are stacked
on the fly, differentiably), so per-block optimizers, checkpoints and the locality guarantee are
unchanged; BatchNorm running statistics updated inside the stacked call are written back.

Which is faster depends on the device. Measured on the 2-core CPU this project develops on
(`noprop bench`, bench/results/): stacking loses there (grouped convs are ~2-3x slower than
separate ones, ../shared/docs/design.md), so `auto` picks `loop` on CPU and `vmap` on CUDA.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

EXECUTIONS = ("auto", "loop", "vmap")


def structure(block: nn.Module):
    """(type, parameter names and shapes, buffer names and shapes) of a block."""
    return (type(block), tuple((n, tuple(p.shape)) for n, p in block.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in block.named_buffers()))


def why_not_stackable(blocks: Sequence[nn.Module]) -> str | None:
    """None if the blocks can run stacked, else the reason."""
    if len(blocks) < 2:
        return "a single block has nothing to stack with"
    first = structure(blocks[0])
    for t, block in enumerate(blocks[1:], 2):
        if structure(block) != first:
            return f"block {t} differs in structure from block 1 (type, parameter or buffer shapes)"
    return None


def resolve(execution: str, blocks: Sequence[nn.Module], device: torch.device) -> str:
    """The execution to use: an explicit 'vmap' on unstackable blocks raises with the reason."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    reason = why_not_stackable(blocks)
    if execution == "vmap" and reason and len(blocks) > 1:
        raise ValueError(f"cannot stack these blocks: {reason}")
    if execution == "auto":
        return "vmap" if torch.device(device).type == "cuda" and reason is None else "loop"
    return "loop" if reason else execution


def run_stacked(blocks: Sequence[nn.Module], x: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """Blocks k = 0..K-1 on (x, zs[k]) as one vmapped call: x [B, ...], zs [K, B, d] -> [K, B, m]."""
    names = [n for n, _ in blocks[0].named_parameters()]
    per_block = [dict(b.named_parameters()) for b in blocks]
    params = {n: torch.stack([p[n] for p in per_block]) for n in names}
    buffer_lists = [dict(b.named_buffers()) for b in blocks]
    buffers = {n: torch.stack([bl[n] for bl in buffer_lists]) for n in buffer_lists[0]}

    def one(p, b, z):
        return functional_call(blocks[0], (p, b), (x, z))

    out = vmap(one, in_dims=(0, 0, 0), randomness="different")(params, buffers, zs)
    if blocks[0].training and buffers:
        with torch.no_grad():  # BatchNorm running statistics were updated on the stacked copies
            for k, bl in enumerate(buffer_lists):
                for n, buf in bl.items():
                    buf.copy_(buffers[n][k])
    return out
