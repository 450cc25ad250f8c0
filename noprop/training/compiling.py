"""`TrainConfig.compile`: the blocks of a training step through torch.compile.

What is compiled is the block computation of a step, never the optimizer's Python:
- NoPropDT: `run_blocks` (the T blocks' forward on their noisy inputs, looped or stacked, as the
  model's execution says), so dynamo traces the blocks of a set into one graph and AOTAutograd
  makes their backward one graph too; the noise, the fused losses and AdamW stay as they are.
- the backprop / cnn baselines: their `loss` (the forward through every block, the head and the
  cross-entropy), so backprop's blocks get the same treatment as NoProp's (docs/design.md §11).
Evaluation (`predict`) is not compiled: it runs once per epoch on other shapes.

Mode: "max-autotune-no-cudagraphs" on CUDA (Triton templates for matmuls and convolutions chosen by
timing; without inductor's own CUDA graphs, which `--cuda-graph`'s CapturedStep owns), torch's
default on CPU; NOPROP_COMPILE_MODE names another.

Consequences a compiled step has:
- dropout masks come from the compiled graph's generator (seeded from torch's), not from the
  per-(step, block) keyed generators of the eager CPU step: a keyed mask would make the step's seed
  a Python int that changes every step, and dynamo would recompile for each value;
- each distinct set of blocks (parallel: one; chunked: one per chunk; lean and sequential: T) is its
  own graph, compiled on first use, and a last batch of another size one more; `_guard_limit` raises
  dynamo's per-function recompile limit (8 by default) to that count for these calls only, so no set
  silently falls back to eager;
- the blocks run on the calling thread (`TrainConfig.effective_execution` turns CPU 'auto' into
  'loop'; explicit 'threads' is refused).
"""
from __future__ import annotations

import functools
import math

import torch

from noprop.models import NoPropDT
from noprop.training.config import TrainConfig, blocks_per_step, compile_mode_override

_ATTR = "_noprop_compiled"  # set on a model this module compiled: (mode, graphs)


def compile_mode(device) -> str | None:
    """torch.compile's mode for a step on `device` (None: its default). NOPROP_COMPILE_MODE overrides
    it (config.COMPILE_MODES; `default` where max-autotune's timing of every template would take too long)."""
    chosen = compile_mode_override()
    if chosen:
        return None if chosen == "default" else chosen
    return "max-autotune-no-cudagraphs" if torch.device(device).type == "cuda" else None


def is_compiled(model) -> bool:
    return getattr(model, _ATTR, None) is not None


def _graphs(model, cfg: TrainConfig) -> int:
    """Distinct graphs a run compiles: one per set of blocks run together, twice (a last batch of
    another size recompiles each with a dynamic batch dimension), plus one to spare."""
    if not isinstance(model, NoPropDT):
        return 3
    k = blocks_per_step(cfg.mode, model.T, cfg.chunk_size)
    return 2 * math.ceil(model.T / k) + 1


def _guard_limit(fn, limit: int):
    """fn with dynamo's recompile limit at least `limit` while it runs (the limit is per function and
    read when a call misses the cache; beyond it dynamo runs the call eagerly and only logs it)."""
    patch = torch._dynamo.config.patch(recompile_limit=max(limit, torch._dynamo.config.recompile_limit))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with patch:
            return fn(*args, **kwargs)

    return call


def apply_compile(model, cfg: TrainConfig, device) -> None:
    """Compile the block computation of `model`'s training step when cfg.compile (in place: the
    compiled function shadows the method on this instance, so state_dict keys, checkpoints and
    parameters are untouched). A model compiled before is left as it is."""
    if not cfg.compile or is_compiled(model):
        return
    mode = compile_mode(device)
    name = "run_blocks" if isinstance(model, NoPropDT) else "loss"
    graphs = _graphs(model, cfg)
    setattr(model, name, _guard_limit(torch.compile(getattr(model, name), mode=mode), graphs))
    setattr(model, _ATTR, (mode, graphs))
