"""NoProp-DT: T independent blocks, a shared linear head, shared class embeddings.

Training never feeds one block's output to another: block t sees z_{t-1} ~ q(z_{t-1} | y), sampled
from the label by `noise_inject`, and learns from its own local loss. Inference runs the label-free
chain z_0 ~ N(0, I) → z_1 → ... → z_T with `denoise_step`, then the head.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from noprop import engine
from noprop.embeddings import ClassEmbedding
from noprop.models.bank import BlockBank, held_for
from noprop.models.dropout import Dropout, block_key, keyed_masks
from noprop.models.inputs import check_images, check_runs
from noprop.ops import denoise_step, local_loss, new_seed, noise_inject
from noprop.stages import stage
from noprop.schedule import DTSchedule


def _rows(ts: Sequence[int]) -> slice | list[int]:
    """0-based rows of blocks ts (1-based): a slice when they are consecutive (every block, a chunk, one
    block), else a list. A slice indexes a device tensor with no host-to-device copy of an index,
    which keeps the parallel step free of host syncs, so it can be captured in a CUDA graph
    (noprop.training.graphs)."""
    ts = list(ts)
    if ts == list(range(ts[0], ts[0] + len(ts))):
        return slice(ts[0] - 1, ts[0] - 1 + len(ts))
    return [t - 1 for t in ts]


def _warn_unkeyed_dropout(blocks) -> None:
    """One warning if a block holds torch's own nn.Dropout: under threaded execution its masks come
    from the global generator in whatever order the threads run, so runs are not reproducible."""
    for t, block in enumerate(blocks, 1):
        plain = [m for m in block.modules()
                 if isinstance(m, nn.modules.dropout._DropoutNd) and not isinstance(m, Dropout) and m.p > 0]
        if plain:
            warnings.warn(f"block {t} ({type(block).__name__}) uses torch.nn.{type(plain[0]).__name__}: with execution "
                          "'threads' its masks are drawn from torch's global generator in thread order, so the same "
                          "seed does not give the same run. noprop.models.Dropout takes the same arguments and keys "
                          "its masks by step and block; or use execution='loop'.", stacklevel=4)
            return


@dataclass
class DTLosses:
    """Parts of the DT objective for one minibatch (all scalars but `local`)."""

    total: torch.Tensor
    local: torch.Tensor  # [k]: weighted denoising loss of each trained block
    ce: torch.Tensor  # cross-entropy of head(z_T), z_T ~ q(z_T | y)
    kl: torch.Tensor  # KL(q(z_0 | y) ‖ N(0, I))


class NoPropDT(nn.Module):
    """T blocks (each (x [B,...], z [B, d]) -> logits [B, m]), a head Linear(d, m) and W [m, d].

    blocks: a sequence of T modules, or a factory t -> module called for t = 1..T (`num_blocks`).
    input_shape: the per-sample image shape, checked on every call when given.
    execution: how the trained blocks run — 'loop' (one by one), 'vmap' (stacked per step), 'threads'
    (groups of blocks on CPU threads at once, in `noprop.training.train_step`), 'bank' (the blocks
    held as one BlockBank of stacked parameters, noprop.models.bank) or 'auto' (see noprop.engine;
    `set_execution(execution, device)` makes 'auto' a bank on CUDA).
    In `train_step` on CPU, block t's dropout masks (noprop.models.dropout.Dropout layers) are
    keyed by the step's noise seed and t, so the update does not depend on which blocks share the
    step or on thread timing; stacked (vmap) and CUDA execution draw from torch's generator.
    """

    def __init__(self, blocks: Sequence[nn.Module] | Callable[[int], nn.Module], embedding: ClassEmbedding,
                 schedule: DTSchedule | None = None, num_blocks: int | None = None, eta: float = 0.1,
                 input_shape: tuple[int, ...] | None = None, execution: str = "auto"):
        super().__init__()
        self.input_shape = None if input_shape is None else tuple(input_shape)
        if execution not in engine.EXECUTIONS:
            raise ValueError(f"execution must be one of {engine.EXECUTIONS}, got {execution!r}")
        self._execution = execution
        if callable(blocks) and not isinstance(blocks, nn.Module):
            T = num_blocks if num_blocks is not None else (schedule.T if schedule else 10)
            blocks = [blocks(t) for t in range(1, T + 1)]
        self.blocks = nn.ModuleList(blocks)
        T = len(self.blocks)
        if T < 1:
            raise ValueError("NoPropDT needs at least one block")
        self.schedule = schedule if schedule is not None else DTSchedule.cosine(T)
        if self.schedule.T != T:
            raise ValueError(f"the schedule has T = {self.schedule.T} steps but {T} blocks were given")
        owner = {}
        for t, block in enumerate(self.blocks, 1):
            if not any(True for _ in block.parameters()):
                raise ValueError(f"block {t} ({type(block).__name__}) has no parameters: nothing for it to learn")
            for p in block.parameters():
                if id(p) in owner and owner[id(p)] != t:
                    raise ValueError(f"block {t} ({type(block).__name__}) shares parameters with block {owner[id(p)]}: "
                                     "NoProp blocks must be independent (give each t a fresh module)")
                owner[id(p)] = t
        self.embedding = embedding
        self.head = nn.Linear(embedding.dim, embedding.num_classes)
        self.eta = eta
        ab = self.schedule.alpha_bar
        a, b, c = self.schedule.inference_coefficients()
        self.register_buffer("sqrt_alpha_bar", ab.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - ab).sqrt().float(), persistent=False)
        self.register_buffer("block_weight", self.schedule.block_loss_weights(eta).float(), persistent=False)
        self._abc = (a.tolist(), b.tolist(), c.sqrt().tolist())
        self.set_execution(execution)

    @property
    def execution(self) -> str:
        """How the blocks run (engine.EXECUTIONS); setting it is `set_execution(value)`."""
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        self.set_execution(value)

    @property
    def is_bank(self) -> bool:
        """Whether the blocks are held as one BlockBank (stacked parameters) rather than separate modules."""
        return isinstance(self.blocks, BlockBank)

    def set_execution(self, execution: str, device=None, separate: bool = False) -> None:
        """Use `execution` from now on, on `device` (default: where the parameters are). Where it
        resolves to a bank ('bank', or 'auto' on CUDA for blocks that stack, noprop.engine.resolve)
        the blocks move into a BlockBank, and back into separate modules where it does not: the
        parameters become new tensors then, so build optimizers after this call. separate=True keeps
        separate modules whatever the execution (block-parallel ranks own some of the blocks; 'auto'
        then stacks them per step on CUDA, as before banks)."""
        if execution not in engine.EXECUTIONS:
            raise ValueError(f"execution must be one of {engine.EXECUTIONS}, got {execution!r}")
        if separate and execution == "bank":
            raise ValueError("execution 'bank' holds every block in one module, but these blocks must stay "
                             "separate (block-parallel training): use execution 'auto', 'vmap' or 'loop'")
        if device is None:
            device = next(self.parameters()).device
        self.blocks = held_for(self.blocks, execution, device, separate)
        self._execution = execution

    def block_parameters(self, t: int) -> list[nn.Parameter]:
        """Block t's (1-based) parameters, in the block's order; for a bank, leaves aliasing its rows
        (an optimizer over them steps the bank; their .grad is the caller's to set)."""
        if self.is_bank:
            return self.blocks.block_parameters(t - 1)
        return list(self.blocks[t - 1].parameters())

    @property
    def T(self) -> int:
        """Number of blocks = diffusion steps; block t (1-based) denoises z_{t-1} towards z_t."""
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        """m, the number of classes: rows of the embedding W [m, d] and outputs of each block and the head."""
        return self.embedding.num_classes

    def block_logits(self, t: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Run block t (1-based) and check its output: logits [B, m]."""
        out = self.blocks[t - 1](x, z)
        if not isinstance(out, torch.Tensor) or out.shape != (x.shape[0], self.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"block {t} ({type(self.blocks[t - 1]).__name__}) must return logits of shape "
                             f"[B, m] = [{x.shape[0]}, {self.num_classes}], got {got}")
        return out

    def losses(self, x: torch.Tensor, y: torch.Tensor, blocks: Sequence[int] | None = None,
               seed: torch.Tensor | None = None, include_shared: bool = True,
               dropout_seed: int | None = None) -> DTLosses:
        """DT objective on one minibatch for the blocks in `blocks` (1-based; default all).

        total = Σ_{t in blocks} (T/2)·η·ΔSNR(t)·‖û_t(z_{t-1}, x) − u_y‖² + CE(head(z_T), y) + KL.
        Each block's parameters get exactly the gradient of their own local term: z_{t-1} is
        sampled from the label, never from another block. `seed` fixes the noise (chunked training
        reuses one seed for every chunk of a minibatch); include_shared=False skips CE and KL (reported
        as 0): the caller's first chunk of the minibatch computes them once.
        """
        check_images(x, self.input_shape)
        ts = list(range(1, self.T + 1)) if blocks is None else list(blocks)
        if not ts or any(not 1 <= t <= self.T for t in ts):
            raise ValueError(f"blocks to train must be a non-empty subset of 1..{self.T}, got {ts}")
        W = self.embedding.weight
        # One launch samples z_0..z_T for the whole minibatch: block t reads z_{t-1}, the head z_T.
        # Sampling all of them (not just the trained blocks') keeps each block's noise the same
        # whichever subset is trained, so a subset's loss is exactly its share of the full loss.
        seed = new_seed(W.device) if seed is None else seed
        with stage("noprop.noise"):
            z = noise_inject(W, y, self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar, seed)
        with stage("noprop.block_forward"):
            logits = self.run_blocks(ts, x, z, dropout_seed)
        with stage("noprop.local_loss"):
            local = local_loss(logits, W, y, self.block_weight[_rows(ts)])
            if not include_shared:  # a later chunk of a minibatch: its first chunk carried CE and KL
                zero = local.new_zeros(())
                return DTLosses(local.sum(), local, zero, zero)
            ce = F.cross_entropy(self.head(z[self.T]), y)
            kl = self.schedule.kl_prior(W[y])
        return DTLosses(local.sum() + ce + kl, local, ce, kl)

    def run_blocks(self, ts: Sequence[int], x: torch.Tensor, z: torch.Tensor,
                   dropout_seed: int | None = None) -> torch.Tensor:
        """Logits [len(ts), B, m] of blocks ts (1-based) on their inputs z[t - 1] (z: [T+1, B, d]).
        dropout_seed (run one by one only): block t's dropout masks are keyed by (dropout_seed, t)."""
        if self.is_bank:
            return self._run_bank(ts, x, z, dropout_seed)
        chosen = [self.blocks[t - 1] for t in ts]
        if self.resolve_execution(ts, x.device) == "vmap":
            rows = _rows(ts)
            if not isinstance(rows, slice):
                rows = torch.tensor(rows, device=z.device)
            logits = engine.run_stacked(chosen, x, z[rows])
            if logits.shape[1:] != (x.shape[0], self.num_classes):
                raise ValueError(f"blocks must return logits of shape [B, m] = [{x.shape[0]}, {self.num_classes}], "
                                 f"got {list(logits.shape[1:])}")
            return logits
        out = []
        for t in ts:
            with keyed_masks(None if dropout_seed is None else block_key(dropout_seed, t)):
                out.append(self.block_logits(t, x, z[t - 1]))
        return torch.stack(out)

    def _run_bank(self, ts, x, z, dropout_seed):
        """Blocks ts through the bank, one call per run of consecutive blocks (a chunk is one run)."""
        runs, out = [], []
        for t in ts:
            if runs and t == runs[-1][-1] + 1:
                runs[-1].append(t)
            else:
                runs.append([t])
        for run in runs:
            rows = slice(run[0] - 1, run[-1])
            out.append(self.blocks(x, z[rows], rows, dropout_seed))
        logits = out[0] if len(out) == 1 else torch.cat(out)
        if logits.shape[1:] != (x.shape[0], self.num_classes):
            raise ValueError(f"blocks must return logits of shape [B, m] = [{x.shape[0]}, {self.num_classes}], "
                             f"got {list(logits.shape[1:])}")
        return logits

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters outside the blocks (the head, a learned embedding): what every block's
        step shares."""
        return [p for n, p in self.named_parameters() if not n.startswith("blocks.")]

    def resolve_execution(self, ts: Sequence[int], device) -> str:
        """How blocks ts (1-based) would run in a training step on `device`: 'loop', 'vmap', 'threads' or
        'bank'. A bank always runs as one; separate blocks that would belong in a bank are stacked per
        step ('vmap': a model moved to CUDA without `set_execution`)."""
        if self.is_bank:
            return "bank"
        how = engine.resolve(self.execution, [self.blocks[t - 1] for t in ts], device)
        return "vmap" if how == "bank" else how

    def warn_unkeyed_dropout_once(self) -> None:
        """Called by a threaded training step: one warning per model if a block holds torch's own
        nn.Dropout (its masks then come from the global generator in thread order)."""
        if not getattr(self, "_checked_thread_rng", False):
            self._checked_thread_rng = True
            _warn_unkeyed_dropout(self.blocks)

    def check_locality(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Raise ValueError if any block's local loss reaches another block's parameters (a block
        that reads another block's output or state). Costs one forward and T backwards."""
        out = self.losses(x, y)
        if self.is_bank:
            return self._check_bank_locality(out)
        params = [list(b.parameters()) for b in self.blocks]
        for t in range(1, self.T + 1):
            others = [(s, p) for s in range(1, self.T + 1) if s != t for p in params[s - 1]]
            grads = torch.autograd.grad(out.local[t - 1], [p for _, p in others], retain_graph=True,
                                        allow_unused=True)
            leaks = sorted({s for (s, _), g in zip(others, grads) if g is not None and bool(g.ne(0).any())})
            if leaks:
                raise ValueError(f"block {t} ({type(self.blocks[t - 1]).__name__})'s loss reaches the parameters of "
                                 f"block(s) {leaks}: a NoProp block must not read another block's output")

    def _check_bank_locality(self, out: DTLosses) -> None:
        """check_locality for a bank: block t's loss may reach row t of the stacked parameters only."""
        params = list(self.blocks.parameters())
        for t in range(1, self.T + 1):
            grads = torch.autograd.grad(out.local[t - 1], params, retain_graph=True, allow_unused=True)
            leaks = sorted({s for g in grads if g is not None
                            for s in range(1, self.T + 1) if s != t and bool(g[s - 1].ne(0).any())})
            if leaks:
                raise ValueError(f"block {t}'s loss reaches the parameters of block(s) {leaks}: a NoProp block "
                                 "must not read another block's output")

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, mean_chain: bool = False, runs: int = 1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Label-free inference (paper Eq. 3): x [B, ...] -> class probabilities [B, m].

        z_0 ~ N(0, I); z_t = a_t·û_t(z_{t-1}, x) + b_t·z_{t-1} + √c_t·ε; p = softmax(head(z_T)).
        mean_chain drops the noise (√c_t = 0); runs > 1 averages the probabilities of several
        stochastic chains (the paper averages 5). Never sees a label.
        """
        check_runs(runs)
        check_images(x, self.input_shape)
        W = self.embedding.weight
        a, b, sqrt_c = self._abc
        feats = self._block_features(x)
        probs = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        for _ in range(runs):
            z = torch.randn(x.shape[0], W.shape[1], device=x.device, generator=generator, dtype=W.dtype)
            for t in range(1, self.T + 1):
                logits = self._logits_from_features(t, x, feats[t - 1], z)
                seed = new_seed(x.device, generator)
                z = denoise_step(logits, W, z, a[t - 1], b[t - 1], 0.0 if mean_chain else sqrt_c[t - 1], seed)
            probs += torch.softmax(self.head(z).float(), dim=-1)
        return probs / runs

    def predict(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Predicted classes [B] (argmax of `predict_proba`)."""
        return self.predict_proba(x, **kwargs).argmax(dim=-1)

    def _block_features(self, x):
        """Blocks that split image features from the z path run their image branch once per image:
        [T] features (None for a block without `features`), in groups on CPU threads at once where
        the execution resolves to threads (forward only: the bulk of inference's arithmetic)."""
        def features(ts):
            return [self.blocks[t - 1].features(x) if hasattr(self.blocks[t - 1], "features") else None for t in ts]

        if self.is_bank:
            return self.blocks.features(x)
        ts = list(range(1, self.T + 1))
        if not engine.threads_for_inference(self.execution, self.T, x.device):
            return features(ts)
        groups = engine.split_evenly(ts, torch.get_num_threads())
        return [f for part in engine.run_threaded(groups, lambda i, group: features(group)) for f in part]

    def _logits_from_features(self, t, x, feats, z):
        if feats is None:
            return self.block_logits(t, x, z)
        if self.is_bank:
            return self.blocks.logits_from_features(t - 1, feats, z)
        return self.blocks[t - 1].from_features(feats, z)
