"""Training loops for NoProp-DT and the backprop baselines.

Update schedules for NoProp-DT:
- `all-blocks`: every minibatch updates every block from its own local loss, in one step. The
  summed objective gives each θ_t exactly its own gradient (blocks share no parameters). The shared
  head and embedding then get one update per minibatch instead of Algorithm 1's T, so their
  learning rate is scaled by `shared_lr_scale` (default T), which closes that gap.
- `sequential`: the paper's Algorithm 1 — per epoch, for t = 1..T, one pass over the data updating
  block t, the head and the embedding.
Each block has its own AdamW, so a block that is not being trained is not stepped at all: no
weight decay and no stale momentum reach it.
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from noprop import checkpoint as ckpt
from noprop.data import Dataset, Split, batches, validate
from noprop.embeddings import ClassEmbedding, make_embedding
from noprop.models import BackpropDT, CNNClassifier, NoPropDT, dt_block_factory
from noprop.schedule import DTSchedule

METHODS = ("dt", "backprop", "cnn")
SCHEDULES = ("all-blocks", "sequential")


@dataclass
class TrainConfig:
    method: str = "dt"
    schedule: str = "all-blocks"
    embedding: str = "onehot"
    embed_dim: int = 20
    T: int = 10
    eta: float = 0.1
    max_alpha_bar: float = 0.999
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    shared_lr_scale: float | None = None  # None: T for all-blocks, 1 for sequential
    eval_runs: int = 1
    mean_chain: bool = False
    seed: int = 0
    device: str = "cpu"
    data: str = "mnist5k"
    data_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("T", "epochs", "batch_size", "eval_runs", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "eta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def effective_shared_lr_scale(self) -> float:
        if self.shared_lr_scale is not None:
            return self.shared_lr_scale
        return float(self.T) if self.method == "dt" and self.schedule == "all-blocks" else 1.0


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
    factory = dt_block_factory(image_shape, num_classes, embedding)
    if cfg.method == "dt":
        return NoPropDT(factory, embedding, DTSchedule.cosine(cfg.T, cfg.max_alpha_bar), eta=cfg.eta,
                        input_shape=image_shape)
    if cfg.method == "backprop":
        return BackpropDT(factory, embedding, num_blocks=cfg.T, input_shape=image_shape)
    return CNNClassifier(image_shape, num_classes)


class Optimizers:
    """One AdamW per NoProp block plus one for the shared parameters (head, embedding); for the
    backprop baselines a single AdamW over everything."""

    def __init__(self, model, cfg: TrainConfig):
        kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        if isinstance(model, NoPropDT):
            self.blocks = [torch.optim.AdamW(b.parameters(), **kw) for b in model.blocks]
            shared = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
            self.shared = torch.optim.AdamW(shared, lr=cfg.lr * cfg.effective_shared_lr_scale,
                                            weight_decay=cfg.weight_decay)
        else:
            self.blocks = []
            self.shared = torch.optim.AdamW(model.parameters(), **kw)

    def zero_grad(self):
        for opt in self.all():
            opt.zero_grad(set_to_none=True)

    def step(self, blocks=None):
        """Step the shared optimizer and those of `blocks` (1-based; None = all)."""
        chosen = self.blocks if blocks is None else [self.blocks[t - 1] for t in blocks]
        for opt in chosen + [self.shared]:
            opt.step()

    def all(self):
        return self.blocks + [self.shared]

    def state_dict(self):
        return [opt.state_dict() for opt in self.all()]

    def load_state_dict(self, states):
        if len(states) != len(self.all()):
            raise ckpt.CheckpointError("checkpoint optimizer state does not match this model's blocks")
        for opt, st in zip(self.all(), states):
            opt.load_state_dict(st)


def train_step(model, opts: Optimizers, x, y, blocks=None) -> float:
    """One update on minibatch (x, y); for NoProp-DT only `blocks` (1-based, None = all) move."""
    opts.zero_grad()
    if isinstance(model, NoPropDT):
        loss = model.losses(x, y, blocks).total
    else:
        loss = model.loss(x, y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss.item()}: lower the learning rate or check inputs")
    loss.backward()
    opts.step(blocks)
    return loss.item()


@torch.no_grad()
def evaluate(model, ds: Dataset, device="cpu", batch_size: int = 500, runs: int = 1, mean_chain: bool = False,
             seed: int = 0) -> float:
    """Test accuracy (fraction). Predictions come from images alone; labels are read only to score."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    correct = 0
    for x, y in batches(ds, batch_size, shuffle=False):
        kwargs = {"runs": runs, "generator": g}
        if isinstance(model, NoPropDT):
            kwargs["mean_chain"] = mean_chain
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


def fit(cfg: TrainConfig, split: Split, checkpoint_path=None, metrics_path=None, resume: bool = False,
        progress: bool = True, log=print):
    """Train per `cfg` on `split`; checkpoint every epoch; returns (model, history)."""
    validate(split.train.images, split.train.labels, split.num_classes, "training set")
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model = build_model(cfg, split.image_shape, split.num_classes, split.train).to(device)
    opts = Optimizers(model, cfg)
    history, start_epoch = [], 0
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise ckpt.CheckpointError(f"--resume: no checkpoint at {checkpoint_path} to resume from")
        state = ckpt.load(checkpoint_path, map_location=device)
        model.load_state_dict(state["model"])
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
        plan = _epoch_plan(model, cfg)
        bar = tqdm(total=n_batches * len(plan), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   leave=False, unit="batch")
        t0, total, count, seen = time.perf_counter(), 0.0, 0, 0
        for blocks in plan:
            for x, y in batches(split.train, cfg.batch_size, shuffle=True, generator=gen):
                total += train_step(model, opts, x.to(device), y.to(device), blocks)
                count += 1
                seen += x.shape[0]
                bar.update()
                bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        train_time = time.perf_counter() - t0
        elapsed += train_time
        acc = evaluate(model, split.test, device, runs=cfg.eval_runs, mean_chain=cfg.mean_chain, seed=cfg.seed)
        record = {"epoch": epoch, "train_loss": total / count, "test_acc": acc, "samples_per_s": seen / train_time,
                  "peak_mem_mb": peak_memory_mb(device), "elapsed_s": elapsed, "method": cfg.method,
                  "schedule": cfg.schedule}
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
    state = ckpt.load(path, map_location=device)
    try:
        cfg = TrainConfig.from_dict(state["config"])
        data = state["data"]
        model = build_model(cfg, tuple(data["image_shape"]), data["num_classes"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path} does not describe a loadable model: {exc}") from exc
    return model.to(device), cfg, state
