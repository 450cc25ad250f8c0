"""One training update: the optimizers, and the one step body that the eager step and the CUDA-graph
capture (training/graphs.py) share.

`forward_backward` is the device work of an update: noise, the blocks' local losses (and CE + KL),
and their backward, chunk by chunk or on block threads as the mode and the execution ask, in the
step's precision (training/precision.py, entered here and nowhere else in a step). The eager
`train_step` then checks the loss on the host and steps the optimizers; the captured step
(`captured_body`) cannot read the host, so it tells fused optimizers to skip a non-finite update on
the device instead. The optimizers step outside the precision: fp32 master weights, fp32 state.
"""
from __future__ import annotations

import torch

from noprop import checkpoint as ckpt
from noprop import engine
from noprop.models import NoPropDT
from noprop.ops import new_seed
from noprop.stages import stage
from noprop.training.compiling import is_compiled
from noprop.training.config import TrainConfig
from noprop.training.precision import precision_context, prepare_input


class Optimizers:
    """AdamW for NoProp-DT and the baselines.

    Sequential (Algorithm 1): one AdamW per block plus one for the shared head and embedding, so
    a block that is not being trained is not stepped at all (no weight decay, no stale momentum).
    Every other mode updates every block on every minibatch: then one multi-tensor AdamW (fused on
    CUDA) over all blocks does exactly the same per-parameter arithmetic in fewer launches.
    Backprop baselines: a single AdamW over everything.
    A bank (noprop.models.bank) is the same arithmetic on fewer, larger tensors: one AdamW over its
    [T, ...] tensors is elementwise T per-block AdamWs (same step count, weight decay and moments
    per element) when every block trains on every step. Sequential leaves blocks out, so there each
    block's AdamW runs over leaves that alias its rows (`NoPropDT.block_parameters`), their gradients
    pointed at the rows of the bank's before each step: blocks not trained are not touched. Saved
    optimizer state always has the per-block layout (`state_dict` splits a bank's rows, wherever they
    sit among the optimizer's parameters: first for NoPropDT, after the mixing weights for the
    backprop baseline), so a checkpoint resumes with or without a bank.
    capturable (default: cfg.cuda_graph) builds them capturable, as a CUDA graph of the step needs
    (training/graphs.py); only on CUDA, and kept through `load_state_dict`.
    blocks (1-based; None = all): the blocks this process trains, when the others are trained
    elsewhere (block-parallel training, training/distributed.py); not with sequential.
    """

    def __init__(self, model, cfg: TrainConfig, capturable: bool | None = None, blocks=None):
        self.capturable = cfg.cuda_graph if capturable is None else bool(capturable)
        kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        device = next(model.parameters()).device
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        if self.capturable:
            if device.type != "cuda":
                raise ValueError(f"capturable optimizers (for CUDA graphs) need the model on a CUDA device, got {device}")
            kw["capturable"] = True
        self.blocks = []
        self.bank = model.blocks if getattr(model, "is_bank", False) else None  # NoPropDT or BackpropDT
        if self.bank is not None and blocks is not None:
            raise ValueError("Optimizers(blocks=...) steps some blocks of a model whose blocks are separate "
                             "modules; this model holds them in one bank (NoPropDT.set_execution(..., separate=True))")
        if isinstance(model, NoPropDT):
            shared_group = {"params": model.shared_parameters(), "lr": cfg.lr * cfg.effective_shared_lr_scale}
            if cfg.mode == "sequential":
                self.blocks = [torch.optim.AdamW(model.block_parameters(t), **kw) for t in range(1, model.T + 1)]
                self.shared = torch.optim.AdamW([shared_group], **kw)
            else:
                ts = range(1, model.T + 1) if blocks is None else blocks
                owned = list(self.bank.parameters()) if self.bank is not None else \
                    [p for t in ts for p in model.blocks[t - 1].parameters()]
                self.shared = torch.optim.AdamW([{"params": owned}, shared_group], **kw, **fast)
        else:
            self.shared = torch.optim.AdamW(model.parameters(), **kw, **fast)

    def zero_grad(self):
        for opt in self.all():
            opt.zero_grad(set_to_none=True)
        if self.bank is not None and self.blocks:  # per-block optimizers hold aliases, not the bank's tensors
            self.bank.zero_grad(set_to_none=True)

    def step(self, blocks=None):
        """Step the shared optimizer and, per-block optimizers present, those of `blocks` (1-based;
        None = all)."""
        ts = range(1, len(self.blocks) + 1) if blocks is None else blocks
        chosen = [self.blocks[t - 1] for t in ts] if self.blocks else []
        if self.bank is not None and self.blocks:
            for t in ts:
                self._point_grads_at_rows(t)
        for opt in chosen + [self.shared]:
            opt.step()

    def _point_grads_at_rows(self, t: int) -> None:
        """Sequential with a bank: block t's optimizer steps leaves aliasing row t-1; their gradients are
        that row of the bank's (no copy)."""
        for alias, p in zip(self.blocks[t - 1].param_groups[0]["params"], self.bank.parameters()):
            alias.grad = None if p.grad is None else p.grad[t - 1]

    def all(self):
        return self.blocks + [self.shared]

    def _bank_layout(self) -> tuple[int, int, int, int]:
        """(T, P, start, total): the bank's T blocks of P tensors sit at positions start .. start+P-1 of
        the shared optimizer's parameters (over all its groups), `total` of them."""
        flat = [id(p) for g in self.shared.param_groups for p in g["params"]]
        start = flat.index(id(next(self.bank.parameters())))
        return len(self.bank), _count(self.bank), start, len(flat)

    def state_dict(self):
        states = [opt.state_dict() for opt in self.all()]
        if self.bank is not None and not self.blocks:
            states[-1] = _bank_state_per_block(states[-1], *self._bank_layout()[:3])
        return states

    def load_state_dict(self, states):
        if len(states) != len(self.all()):
            raise ckpt.CheckpointError("checkpoint optimizer state does not match this model and training mode")
        if self.bank is not None and not self.blocks:
            states = states[:-1] + [_per_block_state_banked(states[-1], *self._bank_layout())]
        for opt, st in zip(self.all(), states):
            opt.load_state_dict(st)
            for group in opt.param_groups:  # the checkpoint's groups carry the flag of the run that saved them
                group["capturable"] = self.capturable


def _count(module) -> int:
    return sum(1 for _ in module.parameters())


def _row(value, t):
    """Row t of a state tensor (t None, or a scalar such as AdamW's step: the value), always a tensor of
    its own: optimizers step their `step` tensors in place, so entries must not share one."""
    if not torch.is_tensor(value):
        return value
    return (value if t is None or value.dim() == 0 else value[t]).clone()


def _bank_state_per_block(state: dict, T: int, P: int, start: int) -> dict:
    """An AdamW state_dict whose parameters hold the bank's P [T, ...] tensors at positions start ..
    start+P-1 in the layout of T separate blocks there instead (block 1's P tensors, block 2's, ...;
    the positions after them shifted by (T-1)·P): rows copied out, step counts repeated."""
    def per_block(i):
        if i < start:
            return [i]
        if i < start + P:
            return [start + t * P + i - start for t in range(T)]
        return [i + (T - 1) * P]

    per = {}
    for i, st in state["state"].items():
        if start <= i < start + P:
            for t, k in enumerate(per_block(i)):
                per[k] = {name: _row(v, t) for name, v in st.items()}
        else:
            per[per_block(i)[0]] = st
    groups = [dict(g) for g in state["param_groups"]]
    for g in groups:
        g["params"] = sorted(k for i in g["params"] for k in per_block(i))
    return {"state": per, "param_groups": groups}


def _per_block_state_banked(state: dict, T: int, P: int, start: int, total: int) -> dict:
    """The inverse of `_bank_state_per_block` for an optimizer over `total` parameters; a state already
    in the bank's layout is returned as is."""
    saved = sum(len(g["params"]) for g in state["param_groups"])
    if saved == total:
        return state
    if saved != total + (T - 1) * P:
        raise ckpt.CheckpointError("checkpoint optimizer state does not match this model's blocks")

    def banked_index(k):
        return k if k < start else start + (k - start) % P if k < start + T * P else k - (T - 1) * P

    banked = {}
    for j in range(P):
        rows = [state["state"].get(start + t * P + j) for t in range(T)]
        if all(r is None for r in rows):
            continue
        if any(r is None for r in rows) or any(not torch.equal(torch.as_tensor(r["step"]), torch.as_tensor(rows[0]["step"]))
                                                 for r in rows):
            raise ckpt.CheckpointError("checkpoint optimizer state: the blocks were stepped unequally, so their state "
                                       "cannot be one optimizer over a bank (resume with execution loop or threads)")
        banked[start + j] = {k: torch.stack([r[k] for r in rows]) if torch.is_tensor(v) and v.dim() > 0
                             else _row(v, None) for k, v in rows[0].items()}
    for k, st in state["state"].items():
        if not start <= k < start + T * P:
            banked[banked_index(k)] = st
    groups = [dict(g) for g in state["param_groups"]]
    for g in groups:
        g["params"] = list(dict.fromkeys(banked_index(k) for k in g["params"]))
    return {"state": banked, "param_groups": groups}


def _chunk_loss(model: NoPropDT, x, y, blocks, seed, include_shared: bool, key_dropout: bool = True) -> torch.Tensor:
    """The total loss of `blocks` (and CE + KL if include_shared). On CPU (key_dropout) the noise
    seed's value also keys each block's dropout masks (noprop.models.dropout), so a block's update is
    the same whichever thread runs it and whichever blocks share its chunk; on CUDA, and in a body to
    be captured, the masks come from torch's generator (reading the seed is a host sync)."""
    dropout_seed = int(seed) if key_dropout and seed.device.type == "cpu" else None
    return model.losses(x, y, blocks, seed=seed, include_shared=include_shared, dropout_seed=dropout_seed).total


def _group_update(model: NoPropDT, x, y, group, seed, include_shared: bool, shared: list) -> tuple:
    """A threaded group's forward and backward: (loss, gradients of the `shared` parameters).

    The group's own blocks' gradients go straight to their .grad (no other group touches those).
    The shared parameters' (head, a learned embedding) are returned for the caller to add up in
    group order: threads adding into one .grad would sum in thread-timing order, and with three or
    more groups float addition makes that visible in the last bits.
    """
    loss = _chunk_loss(model, x, y, group, seed, include_shared)
    own = [p for t in group for p in model.blocks[t - 1].parameters() if p.requires_grad]
    with stage("noprop.backward"):
        grads = torch.autograd.grad(loss, own + shared, allow_unused=True)
    _accumulate(own, grads[:len(own)])
    return loss.detach(), grads[len(own):]


def _accumulate(params, grads) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def forward_backward(model, x, y, blocks=None, chunk_size: int | None = None, key_dropout: bool = True,
                     precision: str = "fp32", seed: torch.Tensor | None = None,
                     include_shared: bool = True) -> tuple[list, torch.Tensor | None]:
    """The device work of one update on (x, y), gradients left in .grad: (the detached losses of the
    chunks or thread groups in order, the step's noise seed; None for a baseline).

    For NoProp-DT only `blocks` (1-based, None = all) are trained. chunk_size k runs them k at a
    time, each chunk's backward right after its forward, so only one chunk's activations are alive
    at once; all chunks share the minibatch's noise (one seed) and the gradients accumulate, so the
    update equals the all-at-once step. Where the model's execution resolves to 'threads' (CPU,
    noprop.engine), each chunk's blocks are split into one contiguous group per thread and the
    groups' forwards and backwards run at once: the same update again, up to float rounding (the
    shared head's and embedding's gradients are summed group by group, in group order: a run on a
    given thread count repeats bit for bit). seed: the step's noise seed (default: drawn here);
    include_shared=False leaves CE + KL to another process (distributed block ranks share one seed
    and count the shared terms once). key_dropout=False leaves the dropout masks to torch's
    generator on the CPU too, so the body reads nothing on the host (see `captured_body`); so does a
    model whose blocks are compiled (training/compiling.py).

    precision (config.PRECISIONS) spans the forward and the backward: tf32's switches must cover the
    backward's matmuls and convolutions too, and under bf16 autocast the backward's ops already get
    the dtypes the forward saved (autocast re-casts only a few reductions to fp32 there). Block
    threads carry the CPU autocast state into their workers (noprop.engine.run_threaded).
    """
    x = prepare_input(x, precision)
    with precision_context(precision, x.device):
        return _forward_backward(model, x, y, blocks, chunk_size, key_dropout and not is_compiled(model), seed,
                                 include_shared)


def _forward_backward(model, x, y, blocks, chunk_size, key_dropout, seed,
                      include_shared) -> tuple[list, torch.Tensor | None]:
    if not isinstance(model, NoPropDT):
        with stage("noprop.block_forward"):  # a baseline's whole forward and loss
            loss = model.loss(x, y)
        with stage("noprop.backward"):
            loss.backward()
        return [loss.detach()], None
    ts = list(range(1, model.T + 1)) if blocks is None else list(blocks)
    k = len(ts) if chunk_size is None else max(1, chunk_size)
    seed = new_seed(x.device) if seed is None else seed
    losses = []
    shared = None  # the trainable shared parameters, gathered once a threaded chunk needs them
    for i in range(0, len(ts), k):
        chunk = ts[i:i + k]
        if model.resolve_execution(chunk, x.device) == "threads":
            model.warn_unkeyed_dropout_once()
            groups = engine.split_evenly(chunk, torch.get_num_threads())
            if shared is None:
                shared = [p for p in model.shared_parameters() if p.requires_grad]
            for loss, shared_grads in engine.run_threaded(groups, lambda j, group: _group_update(
                    model, x, y, group, seed, include_shared and i == 0 and j == 0, shared)):
                losses.append(loss)
                _accumulate(shared, shared_grads)  # in group order: the same sum whatever the timing
        else:
            loss = _chunk_loss(model, x, y, chunk, seed, include_shared and i == 0, key_dropout)
            with stage("noprop.backward"):
                loss.backward()
            losses.append(loss.detach())
    return losses, seed


def check_finite_loss(value: float) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise FloatingPointError(f"the training loss became {value}: lower the learning rate (--lr) or check the "
                                 "inputs; this update was not applied")


def train_step(model, opts: Optimizers, x, y, blocks=None, chunk_size: int | None = None,
               precision: str = "fp32") -> float:
    """One update on minibatch (x, y) (see `forward_backward`); returns the loss. A non-finite loss
    raises FloatingPointError before the optimizers step, so the parameters keep their values."""
    opts.zero_grad()
    losses, _ = forward_backward(model, x, y, blocks, chunk_size, precision=precision)
    total = 0.0
    for loss in losses:  # summed on the host in chunk order, as the losses were formed
        total += loss.item()
    check_finite_loss(total)
    with stage("noprop.optimizer"):
        opts.step(blocks)
    return total


def skips_nonfinite(opts: Optimizers) -> bool:
    """Whether `captured_body` can skip a non-finite update on the device: only fused optimizers take
    `found_inf`; others apply the update and the caller's error comes after it."""
    return all(group.get("fused") for opt in opts.all() for group in opt.param_groups)


def captured_body(model, opts: Optimizers, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32"):
    """The parallel-mode update on (x, y) as device work only, no host read: what a CUDA graph
    captures. `forward_backward` over every block, then the optimizers, told through `found_inf`
    (the flag GradScaler gives fused optimizers) to skip the update when the loss is not finite.
    Grads must be None or zero before it runs. Returns (loss, seed) as detached tensors. (On CPU,
    where the tests run this body, train_step also keys the blocks' dropout masks by the seed; this
    body draws them from torch's generator, as every step on CUDA does.)"""
    losses, seed = forward_backward(model, x, y, key_dropout=False, precision=precision)
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    optimizers = opts.all()
    fused = skips_nonfinite(opts)
    with stage("noprop.optimizer"):
        if fused:
            found_inf = (~torch.isfinite(loss)).to(torch.float32)
            for opt in optimizers:
                opt.found_inf = found_inf
        try:
            opts.step()
        finally:
            if fused:
                for opt in optimizers:
                    del opt.found_inf
    return loss, seed
