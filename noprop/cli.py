"""`noprop` command line: train | eval | bench | profile | info."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from noprop.devices import set_threads, usable_device
from noprop.options import check_ranges
from noprop import engine
from noprop.training.config import (METHODS, MODE_ALIASES, MODES, PRECISIONS, TrainConfig, blocks_per_step,
                                    canonical_mode)
from noprop.training.distributed import BACKENDS as DIST_BACKENDS, DEFAULT_TIMEOUT_S

DEFAULTS = TrainConfig()
DEFAULT_CHECKPOINT = "runs/noprop.pt"
DEFAULT_DIST_CHECKPOINT = "runs/noprop.dcp"  # block-parallel runs write a folder (training/dist_checkpoint.py)


def _add_data_args(p, source: bool = True):
    """source=False (eval): the data source is the checkpoint's; only its directory may have moved."""
    if source:
        p.add_argument("--data", default="mnist5k",
                       help="data source: mnist5k (embedded 4k/1k MNIST subset) or synthetic[:C,H,W[,classes[,N]]]")
    p.add_argument("--data-dir", default=None,
                   help="directory with MNIST IDX files or CIFAR-10/100 python batches (torchvision layout)"
                        + ("" if source else "; default: the one the checkpoint was trained from"))
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; on CPU the blocks' threads share them out (execution threads/auto) "
                        "(default: %(default)s = torch's own, one per core)")


def _add_train_args(p):
    p.add_argument("--method", choices=METHODS, default=DEFAULTS.method,
                   help="dt = NoProp-DT; backprop = the same blocks trained end to end; cnn = one block's image "
                        "branch + linear classifier trained with backprop (strongest fair reference); "
                        "ct = NoProp-CT (continuous time, learnable schedule); fm = NoProp-FM (flow matching)")
    p.add_argument("--mode", "--schedule", dest="mode", choices=MODES + tuple(MODE_ALIASES), default=DEFAULTS.mode,
                   help="NoProp-DT training mode: parallel (every block on every minibatch, one step; all-blocks is "
                        "another name for it), "
                        "chunked (the same update, --chunk-size blocks at a time: less memory), lean (one block "
                        "at a time: least memory), sequential (paper's Algorithm 1: one pass over the data per block)")
    p.add_argument("--chunk-size", type=int, default=DEFAULTS.chunk_size, help="blocks per chunk in --mode chunked")
    p.add_argument("--cuda-graph", action="store_true",
                   help="dt in mode parallel, or backprop, with --device cuda: capture the training step "
                        "once as a CUDA graph and replay it for every full batch (fresh noise each replay; a last "
                        "partial batch runs eagerly)")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision,
                   help="arithmetic of every step and evaluation: fp32; tf32 (CUDA: matmuls and convolutions round "
                        "inputs to TF32); bf16 (autocast; fp32 master weights and AdamW state; the fused ops "
                        "accumulate in fp32). tf32 and bf16 keep convolutions channels_last on CUDA")
    p.add_argument("--compile", action="store_true",
                   help="run the blocks of each step through torch.compile (dt, backprop, cnn; not with --execution "
                        "threads; the first steps pay the compilation; dropout masks come from the compiled graph)")
    p.add_argument("--execution", choices=engine.EXECUTIONS, default=DEFAULTS.execution,
                   help="how the blocks of a step run: one by one (loop), stacked with vmap per step, in groups on "
                        "CPU threads at once (threads: block parallelism, sharing torch's intra-op threads), held "
                        "stacked in a block bank (bank), or auto (threads on CPU with >= 2 torch threads; on CUDA a "
                        "bank for >= 4 blocks, else loop). --method backprop: loop, bank (its image branches "
                        "stacked) or auto")
    p.add_argument("--embedding", choices=("onehot", "learned", "prototype"), default=DEFAULTS.embedding,
                   help="class embedding: fixed one-hot, learned (--embed-dim), or prototype (image-sized)")
    p.add_argument("--embed-dim", type=int, default=DEFAULTS.embed_dim, help="dimension d of a learned embedding")
    p.add_argument("-T", "--blocks", dest="T", type=int, default=DEFAULTS.T, help="number of blocks / diffusion steps")
    p.add_argument("--eta", type=float, default=None,
                   help="weight η of the denoising loss (default: %(default)s = per method: 0.1 for dt, 1.0 for ct, "
                        "as in the paper)")
    p.add_argument("--max-alpha-bar", type=float, default=DEFAULTS.max_alpha_bar,
                   help="ᾱ_T, the top of the cosine schedule (caps SNR(T))")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the training data (default: %(default)s = per method: dt, backprop and cnn 15, "
                        "ct 40, fm 30; METHOD_DEFAULTS in noprop/training/config.py)")
    p.add_argument("--batch-size", "--batch", type=int, default=DEFAULTS.batch_size, help="minibatch size")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay")
    p.add_argument("--shared-lr-scale", type=float, default=None,
                   help="learning-rate factor of the shared head and embedding (default: %(default)s = T when every "
                        "block trains on every minibatch (dt parallel/chunked/lean), else 1)")
    p.add_argument("--eval-runs", type=int, default=DEFAULTS.eval_runs,
                   help="stochastic inference chains averaged per test image")
    p.add_argument("--mean-chain", action="store_true", help="evaluate with the noise-free mean chain")
    p.add_argument("--inference-steps", type=int, default=DEFAULTS.inference_steps,
                   help="ct/fm: steps of the inference chain (time grid / Euler), used by the last epoch's "
                        "evaluation and stored for noprop eval")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="ct/fm: steps of the cheaper chain used by the per-epoch evaluation before the last "
                        "epoch (default: %(default)s = 20 for ct and fm)")
    p.add_argument("--augment-shift", type=int, default=DEFAULTS.augment_shift,
                   help="translate training images at random by up to this many pixels (0: no augmentation)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed")


# Options that shape only some runs, with the runs they shape: given (set off its default) for a run
# they do not shape, they are refused rather than silently ignored.
APPLIES = {
    "mode": (lambda c: c.method == "dt", "it picks NoProp-DT's update mode (--method dt)"),
    "chunk_size": (lambda c: c.method == "dt" and c.mode == "chunked", "it sets the chunk of --mode chunked"),
    "execution": (lambda c: c.method in ("dt", "backprop"), "it says how the blocks of dt and backprop run"),
    "embedding": (lambda c: c.method != "cnn", "the cnn baseline has no class embedding"),
    "embed_dim": (lambda c: c.embedding == "learned", "it sizes a learned embedding (--embedding learned)"),
    "T": (lambda c: c.method in ("dt", "backprop"), "ct, fm and cnn train one network, not T blocks"),
    "eta": (lambda c: c.method in ("dt", "ct"), "it weights the denoising loss of dt and ct"),
    "max_alpha_bar": (lambda c: c.method == "dt", "it tops NoProp-DT's cosine schedule"),
    "shared_lr_scale": (lambda c: c.method == "dt", "it scales NoProp-DT's shared head and embedding"),
    "inference_steps": (lambda c: c.method in ("ct", "fm"), "it sets the ct/fm inference chain"),
    "eval_steps": (lambda c: c.method in ("ct", "fm"), "it sets the ct/fm per-epoch chain"),
    "mean_chain": (lambda c: c.method in ("dt", "ct", "fm"), "backprop and cnn predict without a denoising chain"),
    "eval_runs": (lambda c: c.method != "cnn", "the cnn baseline predicts without noise"),
}


def _check_options_apply(cfg: TrainConfig, given: dict) -> None:
    for name, (applies, why) in APPLIES.items():
        value, default = given.get(name), getattr(DEFAULTS, name)
        if name == "mode":
            value = canonical_mode(value)
        if value is None or value == default or (name == "mean_chain" and not value) or applies(cfg):
            continue
        flag = "-T" if name == "T" else "--" + name.replace("_", "-")
        raise ValueError(f"{flag} {value} does not apply to --method {cfg.method}"
                         f"{' --mode ' + cfg.mode if cfg.method == 'dt' else ''}"
                         f"{' --embedding ' + cfg.embedding if name == 'embed_dim' else ''}: {why}")


def _version() -> str:
    import torch

    from noprop import __version__

    return f"noprop {__version__} (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noprop", description="NoProp training engine (Li, Teh, Pascanu 2025)")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", allow_abbrev=False, help="train NoProp-DT (default) or a backprop baseline",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_train_args(p)
    _add_data_args(p)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="checkpoint written (atomically) after every epoch (block-parallel runs: a folder, by default "
                        f"{DEFAULT_DIST_CHECKPOINT})")
    p.add_argument("--metrics", default=None, help="write one JSON object per epoch to this file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from --checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --checkpoint with a new run (without it, train refuses to)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="--resume from a checkpoint that holds more than tensors and plain containers, unpickling "
                        "it in full, which can run code from the file: only for files you trust")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g = p.add_argument_group("block-parallel training, under torchrun (docs/distributed.md)")
    g.add_argument("--dp", type=int, default=1,
                   help="data-parallel replicas: the W processes form a (dp, W/dp) mesh, and each replica's W/dp "
                        "ranks split the T blocks between them")
    g.add_argument("--dist-backend", choices=DIST_BACKENDS, default="auto", help="auto: gloo on CPU, nccl on CUDA")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective waits for a peer; then the run stops, naming the ranks that did not "
                        "answer")

    p = sub.add_parser("eval", allow_abbrev=False, help="score a checkpoint on its test set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by noprop train")
    _add_data_args(p, source=False)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a checkpoint that holds more than tensors and plain containers in full, which "
                        "can run code from the file: only for files you trust")
    p.add_argument("--eval-runs", type=int, default=1, help="stochastic inference chains averaged per image")
    p.add_argument("--mean-chain", action="store_true", help="use the noise-free mean chain")
    p.add_argument("--inference-steps", type=int, default=None,
                   help="ct/fm: steps of the inference chain (default: %(default)s = the checkpoint's, 1000 unless "
                        "trained with another --inference-steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inference noise")

    sub.add_parser("info", allow_abbrev=False, help="which op backends can run here, and why not")

    from noprop import bench, profile
    p = sub.add_parser("bench", allow_abbrev=False,
                       help="training throughput and peak memory: NoProp-DT modes vs backprop",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_args(p)
    p = sub.add_parser("profile", allow_abbrev=False,
                       help="torch.profiler trace and per-op table of a few training steps",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    profile.add_args(p)
    return parser


def _execution_note(cfg) -> str:
    """', blocks: threads on 2 CPU threads' and the like: how a DT (or backprop) step's blocks will run."""
    if cfg.method == "backprop":
        stacked = engine.resolve_identical(cfg.effective_execution, cfg.T, cfg.device) == "bank"
        return ", blocks: bank (image branches stacked)" if stacked else ", blocks: loop"
    if cfg.method != "dt":
        return ""
    import torch

    per_step = blocks_per_step(cfg.mode, cfg.T, cfg.chunk_size)  # blocks run together
    pick = engine.resolve_identical(cfg.effective_execution, per_step, cfg.device)
    return f", blocks: {pick}" + (f" on {torch.get_num_threads()} CPU threads" if pick == "threads" else "")


def _train(args) -> int:
    from noprop.data import load
    from noprop.training import fit

    set_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(**values)
    _check_options_apply(cfg, values)
    usable_device(cfg.device)  # before the data loads: a missing GPU is the first thing said
    split = load(cfg.data, cfg.data_dir, cfg.seed)
    from noprop.training import distributed
    if distributed.launched() or args.dp != 1:
        return _train_distributed(args, cfg, split)
    mode = {"dt": cfg.mode, "ct": "one network, per-sample t", "fm": "one network, per-sample t"}
    print(f"training {cfg.method} ({mode.get(cfg.method, 'end to end')}) on {split.name}: "
          f"{len(split.train)} train / {len(split.test)} test images, {cfg.epochs} epochs, device {cfg.device}"
          f"{_execution_note(cfg)}{', ' + cfg.precision if cfg.precision != 'fp32' else ''}"
          f"{', compiled' if cfg.compile else ''}")
    _, history = fit(cfg, split, args.checkpoint, args.metrics, args.resume, progress=not args.no_progress,
                     overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint)
    if history:
        last = history[-1]
        print(f"final test accuracy {last['test_acc']:.4f} after {last['elapsed_s']:.0f}s of training; "
              f"checkpoint {args.checkpoint}")
    return 0


def _train_distributed(args, cfg, split) -> int:
    """Block-parallel training over the processes torchrun started (training/distributed.py). Under
    `torchrun --max-restarts N` a restarted run resumes from the checkpoint folder if there is one."""
    from noprop.training import distributed, fit_distributed
    from noprop.training.dist_checkpoint import is_distributed_checkpoint

    rank0 = os.environ.get("RANK", "0") == "0"
    if args.checkpoint == DEFAULT_CHECKPOINT:
        args.checkpoint = DEFAULT_DIST_CHECKPOINT  # a folder of DCP files, not one file
    resume = args.resume
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 and is_distributed_checkpoint(args.checkpoint):
        resume = True
    if rank0:
        print(f"training dt ({cfg.mode}, block-parallel over {os.environ.get('WORLD_SIZE', '1')} process(es), dp "
              f"{args.dp}) on {split.name}: {len(split.train)} train / {len(split.test)} test images, {cfg.epochs} "
              f"epochs, device {cfg.device}{' (resuming after a restart)' if resume and not args.resume else ''}")
    try:
        if distributed.launched():
            distributed.init_from_env(distributed.rank_device(cfg.device), args.dist_backend, args.dist_timeout)
        _, history = fit_distributed(cfg, split, args.checkpoint, args.metrics, resume,
                                     progress=rank0 and not args.no_progress, log=print if rank0 else _silent,
                                     dp=args.dp, timeout_s=args.dist_timeout, overwrite=args.overwrite)
        distributed.leave()
    except distributed.DistributedError as exc:
        print(f"noprop train: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:  # a bad set-up every rank refuses alike, Ctrl-C: main says it in one line
        distributed.abandon()
        raise
    if history and rank0:
        last = history[-1]
        print(f"final test accuracy {last['test_acc']:.4f} after {last['elapsed_s']:.0f}s of training; "
              f"checkpoint folder {args.checkpoint} (noprop eval {args.checkpoint})")
    return 0


def _silent(*args, **kwargs) -> None:
    pass


def _eval(args) -> int:
    from noprop.data import load
    from noprop.training import evaluate, load_model

    check_ranges(args, {"eval_runs": 1, "inference_steps": 1, "seed": 0})  # --threads: set_threads
    set_threads(args.threads)
    model, cfg, _ = load_model(args.checkpoint, usable_device(args.device), trusted=args.trust_checkpoint)
    split = load(cfg.data, args.data_dir or cfg.data_dir, cfg.seed)
    acc = evaluate(model, split.test, args.device, runs=args.eval_runs, mean_chain=args.mean_chain, seed=args.seed,
                   steps=args.inference_steps)
    print(json.dumps({"checkpoint": args.checkpoint, "method": cfg.method, "data": split.name,
                      "test_acc": acc, "test_size": len(split.test)}))
    return 0


def _info(args) -> int:
    from noprop import info

    info.main()
    return 0


def _bench(args) -> int:
    from noprop import bench

    return bench.main_args(args)


def _profile(args) -> int:
    from noprop import profile

    return profile.main_args(args)


COMMANDS = {"train": _train, "eval": _eval, "info": _info, "bench": _bench, "profile": _profile}


def _interrupted_note(args, started: float) -> str:
    """What an interrupted command leaves behind, said after "interrupted"."""
    if args.command == "bench":
        return " (--json/--csv/--out hold the cases measured so far)"
    if args.command != "train" or not args.checkpoint:
        return ""
    ck = Path(args.checkpoint)
    if ck.exists() and (args.resume or ck.stat().st_mtime >= started):
        return f" (the checkpoint {ck} of the last completed epoch is intact; continue with --resume)"
    earlier = f"; {ck} is from an earlier run" if ck.exists() else ""
    return f" (before its first epoch ended: this run wrote no checkpoint{earlier})"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from noprop.checkpoint import CheckpointError
    from noprop.data import DataError
    from noprop.dispatch import BackendUnavailable

    started = time.time()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `noprop info | head` closed the pipe: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (CheckpointError, DataError, BackendUnavailable, ValueError, FloatingPointError, OSError) as exc:
        print(f"noprop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"noprop {args.command}: interrupted{_interrupted_note(args, started)}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        print(f"noprop {args.command}: error: out of memory on {getattr(args, 'device', 'cpu')}: {_memory_advice(args)}",
              file=sys.stderr)
        return 2


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower())


def _memory_advice(args) -> str:
    """Which option to lower, for the command that ran out of memory."""
    batch = getattr(args, "batch_size", None) or getattr(args, "batch", None)
    advice = f"lower --batch-size (now {batch})" if batch else "lower --eval-runs or use a smaller device batch"
    if args.command == "train" and getattr(args, "method", "dt") == "dt" and getattr(args, "mode", "") != "lean":
        advice += ", or train with --mode chunked or --mode lean (fewer blocks' activations alive at once)"
    return advice


if __name__ == "__main__":
    sys.exit(main())
