"""`fit_distributed`: `fit`'s epochs, evaluation, checkpoints and resume for block-parallel
NoProp-DT (training/distributed.py), on W processes or, without a process group, on one.

`noprop.training.fit` (the `fit` below) hands over here when a process group is initialised
(torchrun, or a user's own `init_process_group`), or when it is asked to resume from a distributed
checkpoint, and to the one-process `loop.fit` otherwise; `noprop.training.load_model` likewise
reads a checkpoint folder here and a checkpoint file in loop. The epoch
body is loop's own `_train_epoch` with the block-parallel step in place of the one-process step;
after every epoch each rank gathers all blocks from their owners and evaluates the whole model
(every rank the same test set, so every rank computes the same accuracy, and none waits on another
longer than a step); rank 0 alone logs and writes metrics; all ranks write the checkpoint together.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from noprop import checkpoint as ckpt
from noprop.atomic import write_text_atomically
from noprop.data import fingerprint, validate
from noprop.devices import usable_device
from noprop.training import dist_checkpoint
from noprop.training.build import apply_execution, build_model, check_model_matches
from noprop.training.config import TrainConfig
from noprop.training.distributed import (DEFAULT_TIMEOUT_S, WHY_NOT_GRAPH, WHY_NOT_SEQUENTIAL, BlockParallelStep, Comm,
                                          active, check_same_setup, gather_blocks, make_layout,
                                          rank_device)
from noprop.training import loop
from noprop.training.loop import (_check_finite_parameters, _check_resumable, _train_epoch, check_not_overwriting,
                                  check_same_data, data_record, evaluate, peak_memory_mb)
from noprop.training.step import Optimizers


def check_distributable(cfg: TrainConfig) -> None:
    """What block-parallel training refuses, each in one line with the reason."""
    if cfg.method != "dt":
        raise ValueError(f"block-parallel training splits NoProp-DT's blocks over processes (--method dt), got "
                         f"--method {cfg.method}: the backprop baselines' blocks depend on each other (use DDP) and "
                         "CT/FM train one network for every t")
    if cfg.mode == "sequential":
        raise ValueError(WHY_NOT_SEQUENTIAL)
    if cfg.cuda_graph:
        raise ValueError(WHY_NOT_GRAPH)
    if cfg.execution == "bank":
        raise ValueError("block-parallel training gives each process its own blocks as separate modules; "
                         "execution 'bank' holds every block in one: use execution 'auto', 'vmap' or 'loop'")
    if cfg.precision != "fp32" or cfg.compile:
        raise ValueError("block-parallel training runs its step in fp32 without torch.compile for now: the "
                         "block-parallel step does not yet pass --precision or --compile to its blocks (drop them, "
                         "or train in one process)")


def _check_checkpoint_dir(path) -> None:
    if path is None:
        return
    path = Path(path)
    if path.is_file():
        raise ValueError(f"checkpoint {path} is a file; a distributed run writes a folder of DCP files: give a "
                         f"folder path (e.g. {path.with_suffix('')}.dcp)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"checkpoint {path}: cannot create its folder {path.parent} ({exc.strerror})") from None


def _quiet(*args, **kwargs) -> None:
    pass


def _resume(model, opts: Optimizers, cfg: TrainConfig, checkpoint_path, data_id: str, layout,
            log) -> tuple[list, int]:
    """Load a checkpoint folder written on any world size: (history, last completed epoch)."""
    if not dist_checkpoint.is_distributed_checkpoint(checkpoint_path):
        raise ckpt.CheckpointError(f"--resume: no distributed checkpoint at {checkpoint_path} to resume from")
    meta = dist_checkpoint.read_meta(checkpoint_path)
    _check_resumable(meta, cfg, checkpoint_path)
    check_same_data(meta, data_id, checkpoint_path)
    dist_checkpoint.load_training_state(checkpoint_path, model, opts)
    log(f"resumed from {checkpoint_path} after epoch {meta['epoch']} (written by {meta.get('world')}; "
        f"now {layout.world} process(es), dp {layout.dp})")
    return meta["history"], meta["epoch"]


def _save(checkpoint_path, model, opts: Optimizers, cfg: TrainConfig, split, data_id: str, epoch: int,
          history: list, layout, comm) -> None:
    meta = {"config": asdict(cfg), "epoch": epoch, "history": history, "world": {"W": layout.world, "dp": layout.dp},
            "data": data_record(split, data_id)}
    dist_checkpoint.save(checkpoint_path, model, opts, layout, comm, meta)


def fit_distributed(cfg: TrainConfig, split, checkpoint_path=None, metrics_path=None, resume: bool = False,
                    progress: bool = True, log=print, model=None, dp: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S,
                    overwrite: bool = False):
    """Train per `cfg` block-parallel over the initialised process group (or in this one process);
    returns (model, history), the model whole on every rank. `dp`: data-parallel replicas (the
    world must be a multiple); the checkpoint is a folder (training/dist_checkpoint.py);
    timeout_s: the process group's timeout (sizes the roll call that names a dead rank). As in
    loop.fit: an existing checkpoint is continued only with resume and replaced only with overwrite,
    NaN or infinite parameters stop the run before their epoch is saved, and the checkpoint is
    written before the epoch's metrics line."""
    check_distributable(cfg)
    validate(split.train.images, split.train.labels, split.num_classes, "training set")
    device = usable_device(rank_device(cfg.device), "device")
    _check_checkpoint_dir(checkpoint_path)
    check_not_overwriting(checkpoint_path, resume, overwrite)
    layout = make_layout(cfg.T, dp, device, timeout_s)
    comm = Comm(layout)
    data_id = fingerprint(split)  # the same on every rank; recorded in the folder and checked on resume
    check_same_setup(cfg, layout, comm, {"name": split.name, "train": len(split.train), "test": len(split.test),
                                         "fingerprint": data_id})
    rank0 = layout.rank == 0
    torch.manual_seed(cfg.seed)  # every rank builds the same initial model as one process would
    if model is None:
        model = build_model(cfg, split.image_shape, split.num_classes, split.train)
    else:
        check_model_matches(model, cfg)
    apply_execution(model, cfg, separate=True)  # each rank trains its own blocks: no bank
    model = model.to(device)
    opts = Optimizers(model, cfg, blocks=layout.owned)
    history, start_epoch = [], 0
    if resume:
        history, start_epoch = _resume(model, opts, cfg, checkpoint_path, data_id, layout, log if rank0 else _quiet)
    if metrics_path and rank0:  # what the checkpoint holds, no more
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(start_epoch):  # the shuffling sequence of an uninterrupted run (one pass per epoch)
        torch.randperm(len(split.train), generator=gen)
    step = BlockParallelStep(model, opts, layout, comm, device, cfg.chunk)
    if rank0:
        log(f"block-parallel: {layout.world} process(es) = dp {layout.dp} x {layout.n_block} block ranks; block "
            f"ranks own blocks {layout.assignment}; {step.bytes_per_step()} bytes into collectives per step per rank")
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        step.epoch, step.calls = epoch, 0
        trained = _train_epoch(step, split, cfg, epoch, gen, progress and rank0)
        elapsed += trained["train_s"]
        comm.where = f"epoch {epoch}, after training"
        gather_blocks(model, layout, comm)
        _check_finite_parameters(model, epoch)  # every rank holds every block now: all stop alike
        acc = evaluate(model, split.test, device, runs=cfg.eval_runs, mean_chain=cfg.mean_chain, seed=cfg.seed)
        record = {"epoch": epoch, "train_loss": trained["train_loss"], "test_acc": acc,
                  "samples_per_s": trained["samples_per_s"], "peak_mem_mb": peak_memory_mb(device),
                  "elapsed_s": elapsed, "method": cfg.method, "mode": cfg.mode, "world": layout.world, "dp": layout.dp}
        history.append(record)
        if rank0:
            log(f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  test acc {acc:.4f}  "
                f"{record['samples_per_s']:.0f} samples/s  peak mem {record['peak_mem_mb']:.0f} MB (rank 0)  "
                f"elapsed {elapsed:.0f}s")
        if checkpoint_path:
            _save(checkpoint_path, model, opts, cfg, split, data_id, epoch, history, layout, comm)
        if rank0 and metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    return model, history


def fit(cfg: TrainConfig, split, checkpoint_path=None, metrics_path=None, resume: bool = False, progress: bool = True,
        log=print, model=None, overwrite: bool = False, trust_checkpoint: bool = False):
    """Train per `cfg` on `split` (see loop.fit): block-parallel over the process group when one is
    initialised, or when resuming from a distributed checkpoint folder; else in this one process.
    (trust_checkpoint concerns single-file checkpoints: a folder's index is read by an allow-list.)"""
    if active() or (resume and dist_checkpoint.is_distributed_checkpoint(checkpoint_path)):
        return fit_distributed(cfg, split, checkpoint_path, metrics_path, resume, progress, log, model,
                               overwrite=overwrite)
    return loop.fit(cfg, split, checkpoint_path, metrics_path, resume, progress, log, model, overwrite=overwrite,
                    trust_checkpoint=trust_checkpoint)


def load_model(path, device="cpu", trusted: bool = False):
    """(model, config, state) from a checkpoint: a file written by loop.fit, or a folder written by a
    distributed run (then state is its noprop.json: config, epoch, history, data, world)."""
    if dist_checkpoint.is_distributed_checkpoint(path):
        return dist_checkpoint.load_model(path, usable_device(device, "device"))
    return loop.load_model(path, device, trusted=trusted)
