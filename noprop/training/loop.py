"""The training loop: `fit` (epochs, evaluation, checkpoints, resume), `evaluate` and `load_model`."""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from noprop import checkpoint as ckpt
from noprop.atomic import write_text_atomically
from noprop.data import Dataset, Split, batch_bounds, batches, fingerprint, random_shift, validate
from noprop.devices import usable_device
from noprop.messages import first_line
from noprop.models import NoPropCT, NoPropDT, NoPropFM
from noprop.training.build import build_model, check_model_matches, ready_for_training
from noprop.training.config import CONTINUOUS, TrainConfig
from noprop.training.graphs import CapturedStep
from noprop.training.precision import precision_context, prepare_input
from noprop.training.step import Optimizers, train_step


@torch.no_grad()
def evaluate(model, ds: Dataset, device="cpu", batch_size: int = 500, runs: int = 1, mean_chain: bool = False,
             seed: int = 0, steps: int | None = None, precision: str = "fp32") -> float:
    """Test accuracy (fraction). Predictions come from images alone; labels are read only to score.
    precision: the arithmetic of inference (training/precision.py), as the run trained in."""
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
        with precision_context(precision, device):
            pred = model.predict(prepare_input(x.to(device), precision), **kwargs)
        correct += int((pred.cpu() == y).sum())
    model.train(was_training)
    return correct / len(ds)


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
# CUDA graph, precision, compile, data_dir) may change between the interrupted run and its continuation
# (precision changes the arithmetic, not what is trained: a run may continue in bf16 on a GPU).
RESUME_MUST_MATCH = ("method", "mode", "embedding", "embed_dim", "T", "eta", "max_alpha_bar", "batch_size",
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


RESUME_NEEDS = ("model", "optimizers", "epoch", "history", "rng")


def data_record(split: Split, data_id: str) -> dict:
    """What a checkpoint (file or folder) says about its training data; data_id = fingerprint(split)."""
    return {"name": split.name, "image_shape": list(split.image_shape), "num_classes": split.num_classes,
            "fingerprint": data_id}


def check_same_data(saved: dict, data_id: str, path) -> None:
    """--resume on other data than the checkpoint's (`saved`: its state or noprop.json, whose "data"
    holds data_record's fingerprint) is refused: the run would continue on images it never saw."""
    saved_id = (saved.get("data") or {}).get("fingerprint")
    if saved_id is not None and saved_id != data_id:
        raise ckpt.CheckpointError(f"--resume: {path} was trained on other data (fingerprint {saved_id}, "
                                   f"now {data_id}); a resumed run must see the same images: pass the same "
                                   "--data / --data-dir, or start a new run with another --checkpoint")


def _resume(model, opts: Optimizers, cfg: TrainConfig, checkpoint_path, device, data_id: str,
            trusted: bool) -> tuple[list, int]:
    """Load an interrupted run's state into model and opts: (history, last completed epoch)."""
    if checkpoint_path is None or not Path(checkpoint_path).exists():
        raise ckpt.CheckpointError(f"--resume: no checkpoint at {checkpoint_path} to resume from")
    state = ckpt.load(checkpoint_path, map_location=device, trusted=trusted)
    _check_resumable(state, cfg, checkpoint_path)
    missing = [key for key in RESUME_NEEDS if key not in state]
    if missing:
        raise ckpt.CheckpointError(f"--resume: {checkpoint_path} lacks {', '.join(missing)}, without which the run "
                                   "cannot continue exactly as it would have; start a new run (--overwrite)")
    check_same_data(state, data_id, checkpoint_path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # same config, other model: fit(model=...) with other blocks
        raise ckpt.CheckpointError(f"--resume: the model in {checkpoint_path} does not fit this one "
                                   f"({first_line(exc)})") from None
    opts.load_state_dict(state["optimizers"])
    torch.set_rng_state(state["rng"].cpu())
    return state["history"], state["epoch"]


class _Stepper:
    """Runs each minibatch's update: the CUDA graph captured on the first batch when cfg.cuda_graph,
    else (and for a last, partial batch of another shape) the eager train_step."""

    def __init__(self, model, opts: Optimizers, cfg: TrainConfig, device):
        self.model, self.opts, self.cfg, self.device = model, opts, cfg, device
        self.captured = None

    def __call__(self, x, y, blocks) -> float:
        if self.cfg.cuda_graph and self.captured is None:
            self.captured = CapturedStep(self.model, self.opts, x, y, precision=self.cfg.precision)  # after resume
        if self.captured is not None and self.captured.accepts(x, y):
            return self.captured(x, y)  # copies the CPU batch into the graph's static buffers
        return train_step(self.model, self.opts, x.to(self.device), y.to(self.device), blocks, self.cfg.chunk,
                          self.cfg.precision)


def _train_epoch(step: _Stepper, split: Split, cfg: TrainConfig, epoch: int, gen, progress: bool) -> dict:
    """One epoch's passes over the training data: {train_loss, samples_per_s, train_s}."""
    plan = cfg.passes
    n_batches = len(batch_bounds(len(split.train), cfg.batch_size, min_last=2))
    bar = tqdm(total=n_batches * len(plan), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
               leave=False, unit="batch")
    t0, total, count, seen = time.perf_counter(), 0.0, 0, 0
    augment_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # resume-safe: keyed by epoch
    for blocks in plan:
        for x, y in batches(split.train, cfg.batch_size, shuffle=True, generator=gen, min_last=2):
            total += step(random_shift(x, cfg.augment_shift, augment_gen), y, blocks)
            count += 1
            seen += x.shape[0]
            bar.update()
            bar.set_postfix(loss=f"{total / count:.4f}")
    bar.close()
    train_s = time.perf_counter() - t0
    return {"train_loss": total / count, "samples_per_s": seen / train_s, "train_s": train_s}


def _check_finite_parameters(model, epoch: int) -> None:
    """Raise when an update left a parameter NaN or infinite (a learning rate too large for the loss to
    show it within the epoch: the loss is computed before each update)."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(f"training diverged in epoch {epoch}: {len(bad)} parameter tensor(s) became NaN or "
                                 f"infinite ({bad[0]}, ...); lower the learning rate (--lr); the checkpoint of the "
                                 "last good epoch, if any, was kept")


def _check_before_training(cfg: TrainConfig, split: Split, checkpoint_path, metrics_path, resume: bool,
                           overwrite: bool, log) -> None:
    """Everything that can fail before the first epoch does fail there."""
    validate(split.train.images, split.train.labels, split.num_classes, "training set")
    if len(split.train) % cfg.batch_size == 1 and len(split.train) > cfg.batch_size:
        log(f"note: {len(split.train)} training images in batches of {cfg.batch_size} leave a last batch of one "
            "image, which BatchNorm cannot normalise: it joins the batch before it")
    if cfg.execution == "threads" and torch.get_num_threads() < 2:
        raise ValueError("execution 'threads' shares torch's threads out between blocks, but torch has 1 thread: "
                         "set --threads 2 or more, or use execution 'loop'")
    _check_output_path(checkpoint_path, "checkpoint")
    _check_output_path(metrics_path, "metrics file")
    check_not_overwriting(checkpoint_path, resume, overwrite)


def check_not_overwriting(checkpoint_path, resume: bool, overwrite: bool) -> None:
    """An existing checkpoint (a file, or a distributed run's folder) is continued only when resuming
    and replaced only when told to."""
    if checkpoint_path is not None and Path(checkpoint_path).exists() and not resume and not overwrite:
        raise ValueError(f"checkpoint {checkpoint_path} already exists: pass --resume to continue that run, "
                         "--overwrite to replace it, or another --checkpoint")


def fit(cfg: TrainConfig, split: Split, checkpoint_path=None, metrics_path=None, resume: bool = False,
        progress: bool = True, log=print, model=None, overwrite: bool = False, trust_checkpoint: bool = False):
    """Train per `cfg` on `split`; checkpoint every epoch; returns (model, history).

    model: bring your own (e.g. a NoPropDT of your own blocks, or a BackpropDT of the same blocks);
    by default the model `cfg` describes is built. `cfg.method` must name its kind and `cfg.T` its
    number of blocks (checked), and cfg.execution is applied to it. `noprop eval` rebuilds only
    models a config describes; reload one of your own with
    model.load_state_dict(noprop.checkpoint.load(checkpoint_path)["model"]).
    Checked before any training: the data and batch size, the device, that checkpoint_path and
    metrics_path can be written, that an existing checkpoint is resumed or overwritten only when
    asked, and on resume that the checkpoint's settings and data match. After each epoch the
    parameters must be finite (else FloatingPointError, before that epoch is saved); the checkpoint
    is written before the epoch's metrics line, so the metrics never run ahead of what can resume.
    """
    _check_before_training(cfg, split, checkpoint_path, metrics_path, resume, overwrite, log)
    device = usable_device(cfg.device, "device")
    data_id = fingerprint(split)
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_model(cfg, split.image_shape, split.num_classes, split.train)
    else:
        check_model_matches(model, cfg)
    model = ready_for_training(model, cfg, device)
    opts = Optimizers(model, cfg)
    history, start_epoch = [], 0
    if resume:
        history, start_epoch = _resume(model, opts, cfg, checkpoint_path, device, data_id, trust_checkpoint)
        log(f"resumed from {checkpoint_path} after epoch {start_epoch}")
    if metrics_path:  # what the checkpoint holds, no more: a line written after it was saved is dropped
        write_text_atomically(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(start_epoch * len(cfg.passes)):  # keep the shuffling sequence of an uninterrupted run
        torch.randperm(len(split.train), generator=gen)
    step = _Stepper(model, opts, cfg, device)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        if cfg.method in CONTINUOUS:
            _cosine_lr(opts, epoch, cfg.epochs)
        trained = _train_epoch(step, split, cfg, epoch, gen, progress)
        _check_finite_parameters(model, epoch)
        elapsed += trained["train_s"]
        record = _evaluate_epoch(model, split, cfg, epoch, device, trained, elapsed)
        history.append(record)
        log(f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  test acc {record['test_acc']:.4f}  "
            f"{record['samples_per_s']:.0f} samples/s  peak mem {record['peak_mem_mb']:.0f} MB  "
            f"elapsed {elapsed:.0f}s")
        if checkpoint_path:
            ckpt.save({"config": asdict(cfg), "model": model.state_dict(), "optimizers": opts.state_dict(),
                       "epoch": epoch, "history": history, "rng": torch.get_rng_state(),
                       "data": data_record(split, data_id)}, checkpoint_path)
        if metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    return model, history


def _evaluate_epoch(model, split: Split, cfg: TrainConfig, epoch: int, device, trained: dict, elapsed: float) -> dict:
    """The epoch's record: its training figures and the test accuracy. CT/FM evaluate with a cheaper
    chain (eval_steps) in between and the full one (inference_steps) after the last epoch."""
    steps = cfg.inference_steps if epoch == cfg.epochs or cfg.eval_steps is None else cfg.eval_steps
    acc = evaluate(model, split.test, device, runs=cfg.eval_runs, mean_chain=cfg.mean_chain, seed=cfg.seed,
                   steps=steps, precision=cfg.precision)
    record = {"epoch": epoch, "train_loss": trained["train_loss"], "test_acc": acc,
              "samples_per_s": trained["samples_per_s"], "peak_mem_mb": peak_memory_mb(device),
              "elapsed_s": elapsed, "method": cfg.method, "mode": cfg.mode, "precision": cfg.precision,
              "compile": cfg.compile}
    if cfg.method in CONTINUOUS:
        record["eval_steps"] = steps
    return record


def load_model(path, device="cpu", trusted: bool = False):
    """(model, config, checkpoint state) from a checkpoint written by `fit` (trusted: see
    `noprop.checkpoint.load`). A model whose parameters are not all finite is refused."""
    device = usable_device(device, "device")
    state = ckpt.load(path, map_location=device, trusted=trusted)
    try:
        cfg = TrainConfig.from_dict(state["config"])
        data = state["data"]
        model = build_model(cfg, tuple(data["image_shape"]), data["num_classes"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(
            f"checkpoint {path} does not describe a model noprop can rebuild ({first_line(exc)}); a model of your own "
            "blocks: build it again, then model.load_state_dict(noprop.checkpoint.load(path)['model'])") from exc
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ckpt.CheckpointError(f"checkpoint {path} holds NaN or infinite parameters ({bad[0]}"
                                   f"{', ...' if len(bad) > 1 else ''}): the run that wrote it diverged")
    return model.to(device), cfg, state
