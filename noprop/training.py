"""Training loops for NoProp-DT and the backprop baselines.

Update schedules for NoProp-DT:
- `all-blocks`: every minibatch updates every block from its own local loss, in one step. The
  summed objective gives each θ_t exactly its own gradient (blocks share no parameters). The shared
  head and embedding then get one update per minibatch instead of Algorithm 1's T, so their
  learning rate is scaled by `shared_lr_scale` (default T), which closes that gap.
- `parallel`: the same update as all-blocks (its name in the engine's vocabulary).
- `chunked` / `lean`: the same update, with the blocks run k at a time (lean: k = 1) and each
  chunk's backward done before the next chunk's forward, so peak memory holds one chunk's
  activations instead of all T blocks'.
- `sequential`: the paper's Algorithm 1 — per epoch, for t = 1..T, one pass over the data updating
  block t, the head and the embedding.
In the sequential schedule each block has its own AdamW, so a block that is not being trained is
not stepped at all: no weight decay and no stale momentum reach it (see `Optimizers`).
`cuda_graph` (parallel / all-blocks on CUDA): the same update, captured as a CUDA graph on the first
batch and replayed for every batch of that shape (noprop.graphs); epoch 1's time includes the capture.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from noprop import checkpoint as ckpt
from noprop import engine, graphs
from noprop.data import Dataset, Split, batches, random_shift, validate
from noprop.devices import usable_device
from noprop.embeddings import ClassEmbedding, make_embedding
from noprop.models import BackpropDT, CNNClassifier, NoPropCT, NoPropDT, NoPropFM, ct_block, dt_block_factory
from noprop.ops import new_seed
from noprop.profile import stage
from noprop.schedule import DTSchedule

METHODS = ("dt", "backprop", "cnn", "ct", "fm")
CONTINUOUS = ("ct", "fm")  # one network û(z_t, x, t), per-sample t ~ U(0, 1) (models/continuous.py)
# Per-method defaults of the TrainConfig fields left at None (NoProp-CT uses η = 1, paper §3).
# CT/FM epochs: chosen so that a default run on MNIST-5k fits 15 min on a 2-core CPU (see
# docs/continuous.md); eval_steps: inference steps of the per-epoch evaluation (the last epoch
# and `noprop eval` use inference_steps, 1000 as in the paper).
METHOD_DEFAULTS = {"dt": {"epochs": 15, "eta": 0.1, "eval_steps": None},
                   "ct": {"epochs": 40, "eta": 1.0, "eval_steps": 20},
                   "fm": {"epochs": 30, "eta": 1.0, "eval_steps": 20}}
SCHEDULES = ("all-blocks", "parallel", "chunked", "lean", "sequential")


def canonical_schedule(name: str) -> str:
    """`all-blocks` and `parallel` name the same update (every block on every minibatch, one step);
    bench and profile call it `parallel`."""
    return "parallel" if name == "all-blocks" else name


def _flag(field_name: str) -> str:
    """The `noprop train` option of a TrainConfig field."""
    return "-T" if field_name == "T" else "--" + field_name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything `fit` needs to build, train and evaluate one model. `noprop train` sets the fields
    its flags name (--mode sets `schedule`, -T/--blocks sets `T`). Validated on creation
    (ValueError); fields left at None get their per-method value from METHOD_DEFAULTS.

    Model: `method` (METHODS: dt, backprop, cnn, ct, fm); `embedding` (onehot, learned, prototype)
    with `embed_dim` = d for a learned one; `T` blocks; `eta`, the weight of the denoising loss
    (dt 0.1, ct 1.0); `max_alpha_bar` = ᾱ_T, the top of the cosine schedule.
    Updates: `schedule` (SCHEDULES; see the module docstring) with `chunk_size` blocks per chunk
    when chunked; `execution` (auto, loop, vmap, threads: how a step's blocks run, noprop.engine);
    `cuda_graph` (replay dt parallel/all-blocks or backprop steps as one CUDA graph).
    Optimisation: `epochs` (dt, backprop, cnn 15; ct 40; fm 30), minibatches of `batch_size`
    images [B, C, H, W], AdamW with `lr` and `weight_decay`, `shared_lr_scale` for the shared head
    and embedding (None: T when every block trains on every minibatch, else 1; see
    `effective_shared_lr_scale`), `augment_shift` (random translation by up to this many pixels,
    0 = none), `seed`.
    Evaluation: `eval_runs` stochastic chains averaged per test image, or the noise-free
    `mean_chain`; ct/fm: `inference_steps` for the last epoch and `noprop eval`, `eval_steps` for the
    cheaper per-epoch evaluation before it (20 by default).
    Where: `device` (a torch device string), `data` (a noprop.data source such as mnist5k or
    synthetic:C,H,W,...) and `data_dir`; `extra`, a free-form dict noprop does not read, saved
    with the config in each checkpoint.
    """

    method: str = "dt"
    schedule: str = "all-blocks"
    embedding: str = "onehot"
    embed_dim: int = 20
    T: int = 10
    eta: float | None = None  # None: per method (METHOD_DEFAULTS)
    max_alpha_bar: float = 0.999
    epochs: int | None = None  # None: per method (METHOD_DEFAULTS)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    augment_shift: int = 0  # random translation of training images by up to this many pixels (0: none)
    chunk_size: int = 2  # blocks per chunk in the chunked mode
    execution: str = "auto"  # how blocks run: loop, vmap (stacked), threads (CPU block parallelism) or auto (noprop.engine)
    shared_lr_scale: float | None = None  # None: T when every block trains on every minibatch, else 1
    eval_runs: int = 1
    mean_chain: bool = False
    inference_steps: int = 1000  # CT/FM: time-grid / Euler steps of inference
    eval_steps: int | None = None  # CT/FM: steps of the per-epoch evaluation (None: per method)
    seed: int = 0
    device: str = "cpu"
    cuda_graph: bool = False  # dt parallel/all-blocks on CUDA: replay each step as one CUDA graph (noprop.graphs)
    data: str = "mnist5k"
    data_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name, default in {**METHOD_DEFAULTS["dt"], **METHOD_DEFAULTS.get(self.method, {})}.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        for name in ("inference_steps",) + (("eval_steps",) if self.eval_steps is not None else ()):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} ({_flag(name)} on the command line)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("T", "epochs", "batch_size", "eval_runs", "embed_dim", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} ({_flag(name)} on the command line)")
        for name in ("lr", "eta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)} ({_flag(name)} on the command line)")
        if self.execution == "threads":
            engine.check_threads_device(self.device)
        if self.cuda_graph:
            if self.method not in graphs.METHODS or self.schedule not in graphs.SCHEDULES:
                raise ValueError(f"cuda_graph: {graphs.WHY_ONLY_PARALLEL}; got method {self.method!r}, "
                                 f"schedule {self.schedule!r}")
            if str(self.device).split(":")[0] != "cuda":
                raise ValueError(f"cuda_graph: CUDA graphs need a CUDA device, got device {self.device!r} "
                                 "(train with --device cuda, or drop --cuda-graph)")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def effective_shared_lr_scale(self) -> float:
        if self.shared_lr_scale is not None:
            return self.shared_lr_scale
        return float(self.T) if self.method == "dt" and self.schedule != "sequential" else 1.0

    @property
    def chunk(self) -> int | None:
        """Blocks per chunk within a minibatch (None: all at once)."""
        return {"chunked": self.chunk_size, "lean": 1}.get(self.schedule)


def build_model(cfg: TrainConfig, image_shape, num_classes: int, train: Dataset | None = None):
    """The model `cfg` describes. A prototype embedding is initialised from `train` when given
    (else zeros, to be overwritten by a checkpoint)."""
    if cfg.embedding == "prototype" and train is None:
        d = math.prod(image_shape)
        embedding = ClassEmbedding("prototype", num_classes, init=torch.zeros(num_classes, d),
                                   image_shape=tuple(image_shape))
    else:
        embedding = make_embedding(cfg.embedding, num_classes, cfg.embed_dim,
                                   None if train is None else train.images, None if train is None else train.labels)
    if cfg.method in CONTINUOUS:
        net = ct_block(image_shape, num_classes, embedding)
        if cfg.method == "ct":
            return NoPropCT(net, embedding, eta=cfg.eta, input_shape=image_shape,
                            inference_steps=cfg.inference_steps)
        return NoPropFM(net, embedding, input_shape=image_shape, inference_steps=cfg.inference_steps)
    factory = dt_block_factory(image_shape, num_classes, embedding)
    if cfg.method == "dt":
        return NoPropDT(factory, embedding, DTSchedule.cosine(cfg.T, cfg.max_alpha_bar), eta=cfg.eta,
                        input_shape=image_shape, execution=cfg.execution)
    if cfg.method == "backprop":
        return BackpropDT(factory, embedding, num_blocks=cfg.T, input_shape=image_shape)
    return CNNClassifier(image_shape, num_classes)


class Optimizers:
    """AdamW for NoProp-DT and the baselines.

    Sequential (Algorithm 1): one AdamW per block plus one for the shared head and embedding, so
    a block that is not being trained is not stepped at all (no weight decay, no stale momentum).
    Every other mode updates every block on every minibatch: then one multi-tensor AdamW (fused on
    CUDA) over all blocks does exactly the same per-parameter arithmetic in fewer launches.
    Backprop baselines: a single AdamW over everything.
    capturable (default: cfg.cuda_graph) builds them capturable, as a CUDA graph of the step needs
    (noprop.graphs); only on CUDA, and kept through `load_state_dict`.
    """

    def __init__(self, model, cfg: TrainConfig, capturable: bool | None = None):
        self.capturable = cfg.cuda_graph if capturable is None else bool(capturable)
        kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        device = next(model.parameters()).device
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        if self.capturable:
            if device.type != "cuda":
                raise ValueError(f"capturable optimizers (for CUDA graphs) need the model on a CUDA device, got {device}")
            kw["capturable"] = True
        self.blocks = []
        if isinstance(model, NoPropDT):
            shared_group = {"params": model.shared_parameters(), "lr": cfg.lr * cfg.effective_shared_lr_scale}
            if cfg.schedule == "sequential":
                self.blocks = [torch.optim.AdamW(b.parameters(), **kw) for b in model.blocks]
                self.shared = torch.optim.AdamW([shared_group], **kw)
            else:
                self.shared = torch.optim.AdamW([{"params": list(model.blocks.parameters())}, shared_group],
                                                **kw, **fast)
        else:
            self.shared = torch.optim.AdamW(model.parameters(), **kw, **fast)

    def zero_grad(self):
        for opt in self.all():
            opt.zero_grad(set_to_none=True)

    def step(self, blocks=None):
        """Step the shared optimizer and, per-block optimizers present, those of `blocks` (1-based;
        None = all)."""
        chosen = self.blocks if blocks is None else [self.blocks[t - 1] for t in blocks]
        for opt in chosen + [self.shared]:
            opt.step()

    def all(self):
        return self.blocks + [self.shared]

    def state_dict(self):
        return [opt.state_dict() for opt in self.all()]

    def load_state_dict(self, states):
        if len(states) != len(self.all()):
            raise ckpt.CheckpointError("checkpoint optimizer state does not match this model and training mode")
        for opt, st in zip(self.all(), states):
            opt.load_state_dict(st)
            for group in opt.param_groups:  # the checkpoint's groups carry the flag of the run that saved them
                group["capturable"] = self.capturable


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss.item()}: lower the learning rate or check inputs")


def _chunk_loss(model: NoPropDT, x, y, blocks, seed, include_shared: bool) -> torch.Tensor:
    """The total loss of `blocks` (and CE + KL if include_shared), checked finite. On CPU the noise
    seed's value also keys each block's dropout masks (noprop.models.dropout), so a block's update
    is the same whichever thread runs it and whichever blocks share its chunk."""
    dropout_seed = int(seed) if seed.device.type == "cpu" else None  # CUDA: no host read of the seed
    loss = model.losses(x, y, blocks, seed=seed, include_shared=include_shared, dropout_seed=dropout_seed).total
    _check_finite(loss)
    return loss


def _local_update(model: NoPropDT, x, y, blocks, seed, include_shared: bool) -> float:
    """Forward and backward of `blocks`' local losses (and CE + KL if include_shared): the loss."""
    loss = _chunk_loss(model, x, y, blocks, seed, include_shared)
    with stage("noprop.backward"):
        loss.backward()
    return loss.item()


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
    return loss.item(), grads[len(own):]


def _accumulate(params, grads) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def train_step(model, opts: Optimizers, x, y, blocks=None, chunk_size: int | None = None) -> float:
    """One update on minibatch (x, y); for NoProp-DT only `blocks` (1-based, None = all) move.

    chunk_size k runs the blocks k at a time, each chunk's backward right after its forward, so only
    one chunk's activations are alive at once; all chunks share the minibatch's noise (one seed) and
    the gradients accumulate, so the update equals the all-at-once step.
    Where the model's execution resolves to 'threads' (CPU, see noprop.engine), each chunk's blocks
    are split into one contiguous group per thread, and the groups' forwards and backwards run at
    once: the same update again, up to float rounding (the shared head's and embedding's gradients
    are summed group by group, in group order: a run on a given thread count repeats bit for bit).
    """
    opts.zero_grad()
    if not isinstance(model, NoPropDT):
        with stage("noprop.block_forward"):  # a baseline's whole forward and loss
            loss = model.loss(x, y)
        _check_finite(loss)
        with stage("noprop.backward"):
            loss.backward()
        with stage("noprop.optimizer"):
            opts.step()
        return loss.item()
    ts = list(range(1, model.T + 1)) if blocks is None else list(blocks)
    k = len(ts) if chunk_size is None else max(1, chunk_size)
    seed = new_seed(x.device)
    total = 0.0
    shared = None  # the trainable shared parameters, gathered once a threaded chunk needs them
    for i in range(0, len(ts), k):
        chunk = ts[i:i + k]
        if model.resolve_execution(chunk, x.device) == "threads":
            model.warn_unkeyed_dropout_once()
            groups = engine.split_evenly(chunk, torch.get_num_threads())
            if shared is None:
                shared = [p for p in model.shared_parameters() if p.requires_grad]
            for loss, shared_grads in engine.run_threaded(groups, lambda j, group: _group_update(
                    model, x, y, group, seed, i == 0 and j == 0, shared)):
                total += loss
                _accumulate(shared, shared_grads)  # in group order: the same sum whatever the timing
        else:
            total += _local_update(model, x, y, chunk, seed, include_shared=i == 0)
    with stage("noprop.optimizer"):
        opts.step(blocks)
    return total


@torch.no_grad()
def evaluate(model, ds: Dataset, device="cpu", batch_size: int = 500, runs: int = 1, mean_chain: bool = False,
             seed: int = 0, steps: int | None = None) -> float:
    """Test accuracy (fraction). Predictions come from images alone; labels are read only to score."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    correct = 0
    for x, y in batches(ds, batch_size, shuffle=False):
        kwargs = {"runs": runs, "generator": g}
        if isinstance(model, (NoPropDT, NoPropCT, NoPropFM)):
            kwargs["mean_chain"] = mean_chain
        if isinstance(model, (NoPropCT, NoPropFM)):
            kwargs["steps"] = steps  # None: the model's inference_steps
        pred = model.predict(x.to(device), **kwargs)
        correct += int((pred.cpu() == y).sum())
    model.train(was_training)
    return correct / len(ds)


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _epoch_plan(model, cfg: TrainConfig):
    """[(blocks to train or None for all)] passes over the data in one epoch."""
    if isinstance(model, NoPropDT) and cfg.schedule == "sequential":
        return [[t] for t in range(1, model.T + 1)]
    return [None]


def _cosine_lr(opts: Optimizers, epoch: int, epochs: int) -> None:
    """CT/FM learning-rate schedule (the paper gives none): cosine decay from lr towards 0 over the
    run, set per epoch (epoch e of E uses lr·½(1 + cos(π(e − 1)/E))). Measured on MNIST-5k it
    steadies the noisy per-epoch accuracy of CT (docs/continuous.md). Resume-safe: the base lr
    travels in the optimizer's param groups."""
    for opt in opts.all():
        for group in opt.param_groups:
            base = group.setdefault("base_lr", group["lr"])
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


# A resumed run continues the same run: these fields shape the model, its updates or its data order
# and must match the checkpoint's. The others (epochs, evaluation settings, device, execution, the
# CUDA graph, data_dir) may change between the interrupted run and its continuation.
RESUME_MUST_MATCH = ("method", "schedule", "embedding", "embed_dim", "T", "eta", "max_alpha_bar", "batch_size",
                     "lr", "weight_decay", "augment_shift", "chunk_size", "shared_lr_scale", "seed", "data")


def _check_output_path(path, what: str) -> None:
    """Fail before training, not after the first epoch, when `path` cannot be written."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file path (e.g. {path / 'noprop.pt'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot create its folder {path.parent} ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{what} {path}: its folder {path.parent} is not writable")


MODEL_KINDS = {"dt": NoPropDT, "backprop": BackpropDT, "cnn": CNNClassifier, "ct": NoPropCT, "fm": NoPropFM}


def _check_model_matches(model, cfg: TrainConfig) -> None:
    """A model brought to `fit` must be of the kind cfg.method names, with cfg.T blocks: the training
    step, the optimizer and the checkpoint's config all follow cfg."""
    kind = MODEL_KINDS[cfg.method]
    if not isinstance(model, kind):
        raise ValueError(f"fit: cfg.method {cfg.method!r} trains a {kind.__name__}, got a {type(model).__name__} "
                         f"(set method to the model's kind: {dict((v.__name__, k) for k, v in MODEL_KINDS.items())})")
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) != cfg.T:
        raise ValueError(f"fit: the model has {len(blocks)} blocks but cfg.T is {cfg.T}: set T={len(blocks)}")


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message (load_state_dict's lists every missing key), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_resumable(state: dict, cfg: TrainConfig, path) -> None:
    saved = TrainConfig.from_dict(state.get("config", {})) if isinstance(state.get("config"), dict) else None
    if saved is None:
        raise ckpt.CheckpointError(f"--resume: {path} has no training config to resume")
    diffs = [f"{name} {getattr(saved, name)!r} (now {getattr(cfg, name)!r})" for name in RESUME_MUST_MATCH
             if getattr(saved, name) != getattr(cfg, name)]
    if diffs:
        raise ckpt.CheckpointError(f"--resume: {path} was trained with " + ", ".join(diffs) + "; a resumed run "
                                   "continues that run with its settings (only epochs, evaluation, device and "
                                   "execution may change): pass the same ones, or start a new run with another "
                                   "--checkpoint")


def fit(cfg: TrainConfig, split: Split, checkpoint_path=None, metrics_path=None, resume: bool = False,
        progress: bool = True, log=print, model=None):
    """Train per `cfg` on `split`; checkpoint every epoch; returns (model, history).

    model: bring your own (e.g. a NoPropDT of your own blocks, or a BackpropDT of the same blocks);
    by default the model `cfg` describes is built. `cfg.method` must name its kind and `cfg.T` its
    number of blocks (checked). `noprop eval` rebuilds only models a config describes; reload one of
    your own with model.load_state_dict(noprop.checkpoint.load(checkpoint_path)["model"]).
    Checked before any training: the device (`noprop.devices.usable_device`), that checkpoint_path
    and metrics_path can be written, and on resume that the checkpoint's settings match `cfg`.
    """
    validate(split.train.images, split.train.labels, split.num_classes, "training set")
    device = usable_device(cfg.device, "device")
    _check_output_path(checkpoint_path, "checkpoint")
    _check_output_path(metrics_path, "metrics file")
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_model(cfg, split.image_shape, split.num_classes, split.train)
    else:
        _check_model_matches(model, cfg)
    model = model.to(device)
    opts = Optimizers(model, cfg)
    captured = None  # cuda_graph: the step captured on the first batch (after a resume's state is loaded)
    history, start_epoch = [], 0
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise ckpt.CheckpointError(f"--resume: no checkpoint at {checkpoint_path} to resume from")
        state = ckpt.load(checkpoint_path, map_location=device)
        _check_resumable(state, cfg, checkpoint_path)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # same config, other model: fit(model=...) with other blocks
            raise ckpt.CheckpointError(f"--resume: the model in {checkpoint_path} does not fit this one "
                                       f"({_first_line(exc)})") from None
        opts.load_state_dict(state["optimizers"])
        history, start_epoch = state["history"], state["epoch"]
        torch.set_rng_state(state["rng"])
        log(f"resumed from {checkpoint_path} after epoch {start_epoch}")
    if metrics_path and not resume:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text("")
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(start_epoch):  # keep the shuffling sequence of an uninterrupted run
        for _ in _epoch_plan(model, cfg):
            torch.randperm(len(split.train), generator=gen)
    n_batches = math.ceil(len(split.train) / cfg.batch_size)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        if cfg.method in CONTINUOUS:
            _cosine_lr(opts, epoch, cfg.epochs)
        plan = _epoch_plan(model, cfg)
        bar = tqdm(total=n_batches * len(plan), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   leave=False, unit="batch")
        t0, total, count, seen = time.perf_counter(), 0.0, 0, 0
        augment_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # resume-safe: keyed by epoch
        for blocks in plan:
            for x, y in batches(split.train, cfg.batch_size, shuffle=True, generator=gen):
                x = random_shift(x, cfg.augment_shift, augment_gen)
                if cfg.cuda_graph and captured is None:
                    captured = graphs.CapturedStep(model, opts, x, y)
                if captured is not None and captured.accepts(x, y):
                    total += captured(x, y)  # copies the CPU batch into the graph's static buffers
                else:  # no graph, or a last partial batch of another shape: the eager step
                    total += train_step(model, opts, x.to(device), y.to(device), blocks, cfg.chunk)
                count += 1
                seen += x.shape[0]
                bar.update()
                bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        train_time = time.perf_counter() - t0
        elapsed += train_time
        # CT/FM: a cheaper chain (eval_steps) in between, the full one (inference_steps) at the end
        steps = cfg.inference_steps if epoch == cfg.epochs or cfg.eval_steps is None else cfg.eval_steps
        acc = evaluate(model, split.test, device, runs=cfg.eval_runs, mean_chain=cfg.mean_chain, seed=cfg.seed,
                       steps=steps)
        record = {"epoch": epoch, "train_loss": total / count, "test_acc": acc, "samples_per_s": seen / train_time,
                  "peak_mem_mb": peak_memory_mb(device), "elapsed_s": elapsed, "method": cfg.method,
                  "schedule": cfg.schedule}
        if cfg.method in CONTINUOUS:
            record["eval_steps"] = steps
        history.append(record)
        log(f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  test acc {acc:.4f}  "
            f"{record['samples_per_s']:.0f} samples/s  peak mem {record['peak_mem_mb']:.0f} MB  "
            f"elapsed {elapsed:.0f}s")
        if metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if checkpoint_path:
            ckpt.save({"config": asdict(cfg), "model": model.state_dict(), "optimizers": opts.state_dict(),
                       "epoch": epoch, "history": history, "rng": torch.get_rng_state(),
                       "data": {"name": split.name, "image_shape": list(split.image_shape),
                                "num_classes": split.num_classes}}, checkpoint_path)
    return model, history


def load_model(path, device="cpu"):
    """(model, config, checkpoint state) from a checkpoint written by `fit`."""
    device = usable_device(device, "device")
    state = ckpt.load(path, map_location=device)
    try:
        cfg = TrainConfig.from_dict(state["config"])
        data = state["data"]
        model = build_model(cfg, tuple(data["image_shape"]), data["num_classes"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(
            f"checkpoint {path} does not describe a model noprop can rebuild ({_first_line(exc)}); a model of your own "
            "blocks: build it again, then model.load_state_dict(noprop.checkpoint.load(path)['model'])") from exc
    return model.to(device), cfg, state
