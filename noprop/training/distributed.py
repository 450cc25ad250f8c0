"""Block-parallel NoProp-DT across processes: the mesh, who owns which blocks, the step's few
collectives, the data split over replicas (the process group itself, its collectives and its
faults: training/dist_group.py, whose names are re-exported here).

W processes form a 2-D mesh (dp, block): dp data-parallel replicas (default 1), each of W / dp
block ranks. Block rank r of every replica owns a contiguous slice of the T blocks (computed from
the world found at start-up, so a restart on another W recomputes it) and runs the one step body
(`step.forward_backward`) on its slice only. Blocks share no parameters and never read each other's
output, so nothing of a block crosses ranks in a step. What does, per step:

- the noise seed, 8 bytes broadcast from rank 0, so every rank draws the ε a one-process step would
  (replica i > 0 mixes i into it: its half of the batch gets noise of its own);
- ONE flat bucket over all W ranks: the shared parameters' gradients (head, a learned embedding)
  and the rank's share of the loss, each weighted by its replica's share of the minibatch
  (1 / dp for equal shares): summed over the block group, averaged over dp. CE + KL are computed by
  block rank 0 only, so they count once, as in one process;
- with dp > 1, one flat bucket over the replicas of each block rank: its blocks' gradients and
  BatchNorm running statistics, averaged the same way (the statistics of a step are each replica's
  own half-batch; averaging the running buffers keeps the replicas' models identical).

Every rank then steps its own AdamW over its blocks and the shared parameters; the shared ones get
the same summed gradient everywhere, so they stay identical without being sent.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from noprop import engine
from noprop.ops import new_seed
from noprop.training.config import TrainConfig
from noprop.training.dist_group import (BACKENDS, DEFAULT_TIMEOUT_S, Comm, DistributedError, abandon, active,  # noqa: F401
                                        choose_backend, init_from_env, launched, leave, rank_device)
from noprop.training.step import check_finite_loss, forward_backward

_SEED_RANGE = 2**62  # new_seed draws in [0, 2**62)
_REPLICA_STRIDE = 0x9E3779B97F4A7C1  # odd, < 2**62: replica i's seed is seed + i * stride (mod 2**62)
WHY_NOT_SEQUENTIAL = ("mode sequential trains one block per pass over the data (Algorithm 1), so all but one "
                      "block rank would idle every pass: train block-parallel with --mode parallel, chunked or "
                      "lean (every block on every minibatch)")
WHY_NOT_GRAPH = ("--cuda-graph is not supported distributed: the captured step would have to contain the step's "
                 "collectives; drop --cuda-graph (each rank runs the eager step)")


@dataclass
class Layout:
    """Where this process sits: rank of world, replica dp_rank of dp, block rank of n_block, and the
    blocks (1-based) each block rank owns (`assignment`; this rank's: `owned`)."""

    world: int
    rank: int
    dp: int
    n_block: int
    dp_rank: int
    block_rank: int
    assignment: list
    mesh: object = None  # torch DeviceMesh (dp, block), None without a process group
    timeout_s: float = DEFAULT_TIMEOUT_S
    device: torch.device = torch.device("cpu")  # where this rank's tensors (and its collectives' buffers) live

    @property
    def owned(self) -> list:
        return self.assignment[self.block_rank]

    def group(self, dim: str):
        return self.mesh.get_group(dim) if self.mesh is not None else None


def ownership(T: int, n_block: int) -> list:
    """Contiguous slices of blocks 1..T, one per block rank, sizes differing by at most one."""
    return engine.split_evenly(list(range(1, T + 1)), n_block)


def make_layout(T: int, dp: int, device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Layout:
    """The (dp, block) mesh over the world found now; without a process group, one process owning all."""
    if dp < 1:
        raise ValueError(f"--dp must be >= 1, got {dp}")
    world = dist.get_world_size() if active() else 1
    if world % dp:
        raise ValueError(f"a world of {world} processes does not split into --dp {dp} replicas ({world} % {dp} != 0): "
                         f"launch a multiple of {dp} processes, or pick a --dp that divides {world}")
    n_block = world // dp
    if n_block > T:
        raise ValueError(f"{n_block} block ranks per replica for T = {T} blocks: every block rank needs a block; "
                         f"launch at most {T * dp} processes (T x --dp), or raise --dp")
    if not active():
        return Layout(1, 0, 1, 1, 0, 0, ownership(T, 1), None, timeout_s, torch.device(device))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch.device(device).type, (dp, n_block), mesh_dim_names=("dp", "block"))
    rank = dist.get_rank()
    return Layout(world, rank, dp, n_block, mesh.get_local_rank("dp"), mesh.get_local_rank("block"),
                  ownership(T, n_block), mesh, timeout_s, torch.device(device))


def replica_seed(seed: torch.Tensor, dp_rank: int) -> torch.Tensor:
    """Replica dp_rank's noise seed from the step's: replica 0 keeps it (so dp = 1 draws the ε of one
    process); the others shift it by a large odd stride, mod 2**62 (both terms < 2**62: no overflow)."""
    if dp_rank == 0:
        return seed
    return (seed + (dp_rank * _REPLICA_STRIDE) % _SEED_RANGE) % _SEED_RANGE


def check_same_setup(cfg: TrainConfig, layout: Layout, comm: Comm, data: dict) -> None:
    """Once at start-up: every rank must run the same config and data (else each would train a
    different model). All ranks gather each other's, and all raise the same one line."""
    if layout.world == 1:
        return
    mine = {k: v for k, v in asdict(cfg).items() if k not in ("device", "extra")}
    mine.update({"dp": layout.dp, "data fingerprint": data})
    text = json.dumps(mine, sort_keys=True, default=str)
    digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.int64, device=layout.device)
    every = [torch.empty_like(digest) for _ in range(layout.world)]
    comm.run("the start-up config check", lambda: dist.all_gather(every, digest))
    odd = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
    if not odd:
        return
    configs = [None] * layout.world
    comm.run("the start-up config check", lambda: dist.all_gather_object(configs, mine))
    diff = sorted(k for k in configs[0] if configs[0][k] != configs[odd[0]].get(k))
    raise ValueError(f"ranks run different settings: rank {odd[0]} differs from rank 0 in "
                     + ", ".join(f"{k} ({configs[odd[0]].get(k)!r} vs {configs[0][k]!r})" for k in diff)
                     + (f" (and {len(odd) - 1} more rank(s) differ)" if len(odd) > 1 else "")
                     + "; launch every rank with the same arguments")


@dataclass
class BlockParallelStep:
    """One block-parallel update; called like loop._Stepper with the GLOBAL minibatch (every rank
    draws the same order): replica dp_rank trains on rows dp_rank::dp, as DistributedSampler cuts
    the data, so the replicas together see exactly the one-process minibatch."""

    model: object
    opts: object
    layout: Layout
    comm: Comm
    device: torch.device
    chunk: int | None
    shared: list = field(init=False)
    own_params: list = field(init=False)
    own_buffers: list = field(init=False)
    epoch: int = 0  # set by the loop, for messages
    calls: int = 0

    def __post_init__(self):
        blocks = [self.model.blocks[t - 1] for t in self.layout.owned]
        self.shared = [p for p in self.model.shared_parameters() if p.requires_grad]
        self.own_params = [p for b in blocks for p in b.parameters() if p.requires_grad]
        self.own_buffers = [buf for b in blocks for buf in b.buffers() if buf.is_floating_point()]

    def __call__(self, x, y, blocks=None) -> float:
        lay, comm = self.layout, self.comm
        self.calls += 1
        comm.where = f"epoch {self.epoch}, minibatch {self.calls}"
        x_r, y_r = x[lay.dp_rank::lay.dp].contiguous(), y[lay.dp_rank::lay.dp].contiguous()
        weight = x_r.shape[0] / x.shape[0]  # this replica's share of the minibatch (1 when dp = 1)
        self.opts.zero_grad()
        seed = new_seed(self.device)
        if lay.world > 1:
            comm.broadcast(seed, src=0, what="the noise-seed broadcast")
        losses = []
        if x_r.shape[0]:  # a last minibatch smaller than dp leaves some replicas out (weight 0)
            losses, _ = forward_backward(self.model, x_r.to(self.device), y_r.to(self.device), lay.owned, self.chunk,
                                         seed=replica_seed(seed, lay.dp_rank), include_shared=lay.block_rank == 0)
        local = 0.0
        for loss in losses:  # summed on the host in chunk order, as train_step sums them
            local += loss.item()
        dtype = self.shared[0].dtype if self.shared else torch.float32
        loss_bucket = torch.tensor([local], dtype=dtype, device=self.device)
        total = self._reduce(self.shared, [loss_bucket], weight, None, "the shared-gradient all-reduce")
        if lay.world == 1:
            total = local
        if lay.dp > 1:
            self._reduce(self.own_params, self.own_buffers, weight, lay.group("dp"), "the block-gradient all-reduce")
        check_finite_loss(total)
        self.opts.step()
        return total

    def _reduce(self, params, extra, weight: float, group, what: str) -> float | None:
        """Sum weight x (grads of params, then `extra` tensors) over `group` (None: the world) in one
        flat bucket; write the grads back to .grad and the extras in place. Returns extra's last
        value when it is the loss (the world bucket)."""
        if self.layout.world == 1:
            return float(extra[0]) if group is None else None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        tensors = grads + [t.detach() for t in extra]
        if not tensors:
            return None
        flat = _flatten_dense_tensors([t.to(tensors[0].dtype) for t in tensors])
        if weight != 1.0:
            flat.mul_(weight)
        self.comm.all_reduce(flat, group=group, what=what)
        for p, t, new in zip(params + [None] * len(extra), tensors, _unflatten_dense_tensors(flat, tensors)):
            if p is not None:
                p.grad = new.to(p.dtype)
            elif group is not None:
                t.copy_(new)
        return float(flat[-1]) if group is None else None

    def bytes_per_step(self) -> int:
        """Bytes this rank puts into the step's collectives (seed, world bucket, dp bucket)."""
        if self.layout.world == 1:
            return 0
        shared = sum(p.numel() for p in self.shared) + 1
        own = sum(p.numel() for p in self.own_params) + sum(b.numel() for b in self.own_buffers)
        return 8 + 4 * shared + (4 * own if self.layout.dp > 1 else 0)


def gather_blocks(model, layout: Layout, comm: Comm) -> None:
    """Bring every block's current weights and buffers to every rank of the replica (one broadcast
    per block rank and dtype, from the block's owner): afterwards each rank holds the whole model,
    for the label-free chain and the checkpoint's full state."""
    if layout.n_block == 1:
        return
    group = layout.group("block")
    for src, ts in enumerate(layout.assignment):
        tensors = [t for b in ts for t in model.blocks[b - 1].state_dict().values()]
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            same = [t for t in tensors if t.dtype == dtype]
            flat = _flatten_dense_tensors(same)
            comm.broadcast(flat, src=src, group=group, what="gathering the blocks")
            if src != layout.block_rank:
                with torch.no_grad():
                    for t, new in zip(same, _unflatten_dense_tensors(flat, same)):
                        t.copy_(new)
