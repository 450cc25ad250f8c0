"""NoProp-DT block-parallel against backprop with DDP, on W processes of one machine (gloo).

Driver (launches every config itself, torchrun's environment, rounds interleaved):
    PYTHONPATH=. python bench/bench_distributed.py --worlds 1 2 4 --out bench/results/cpu-distributed
One config by hand:
    PYTHONPATH=. torchrun --standalone --nproc_per_node=2 bench/bench_distributed.py --worker --method noprop

Equal work: both methods train the same T DT blocks on the same global minibatch of B samples per
step. NoProp: every rank runs the whole minibatch through its T/W blocks (training/distributed.py;
collectives: the 8-byte noise seed and one bucket of the shared head's gradients and the loss).
Backprop: torch's DistributedDataParallel over the BackpropDT baseline, every rank all T blocks on
B/W samples (collectives: every gradient, all-reduced in DDP's buckets during the backward, and the
BatchNorm buffers broadcast from rank 0 before each forward). Reported per config: median ms per step
over rounds, samples/s = B / step, bytes each rank puts into collectives per step (counted from
the tensors sent), and for NoProp the wall time a rank spends inside its collectives (waiting for
its peers included; DDP overlaps its all-reduces with the backward, so that time is not separable).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from noprop.bench.report import device_name

METHODS = ("noprop", "backprop-ddp")


def _worker(args) -> None:
    torch.set_num_threads(args.threads)
    import torch.distributed as dist
    import torch.nn.functional as F

    from noprop.training import Optimizers, TrainConfig, build_model
    from noprop.training.distributed import BlockParallelStep, Comm, init_from_env, make_layout

    init_from_env("cpu", "gloo", 120)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    shape = (1, args.image, args.image)
    x = torch.randn(args.batch, *shape, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    method = "dt" if args.method == "noprop" else "backprop"
    cfg = TrainConfig(method=method, T=args.T, batch_size=args.batch, execution="loop", data="synthetic")
    torch.manual_seed(0)
    model = build_model(cfg, shape, 10)
    if args.method == "noprop":
        layout = make_layout(cfg.T, 1, "cpu", 120)
        comm = Comm(layout)
        step = BlockParallelStep(model, Optimizers(model, cfg, blocks=layout.owned), layout, comm,
                                 torch.device("cpu"), None)
        run = lambda: step(x, y)  # noqa: E731
        sent = step.bytes_per_step()
    else:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        opts = Optimizers(model, cfg)
        x_r, y_r = x[rank::world].contiguous(), y[rank::world].contiguous()
        comm = None

        def run():
            opts.zero_grad()
            F.cross_entropy(ddp(x_r), y_r).backward()
            opts.step()

        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        sent = (grads + buffers) if world > 1 else 0
    for _ in range(args.warmup):
        run()
    dist.barrier()
    comm_before = comm.seconds if comm else 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        run()
    dist.barrier()
    ms = (time.perf_counter() - start) * 1000 / args.steps
    record = {"method": args.method, "W": world, "T": args.T, "batch": args.batch, "image": args.image,
              "ms_per_step": ms, "samples_per_s": args.batch / ms * 1000, "bytes_per_step_per_rank": sent,
              "comm_ms_per_step": (comm.seconds - comm_before) * 1000 / args.steps if comm else None,
              "params": sum(p.numel() for p in model.parameters())}
    if rank == 0:
        print("RESULT " + json.dumps(record), flush=True)
    dist.destroy_process_group()


def _launch(world: int, argv: list, timeout: float) -> dict:
    """W processes with torchrun's environment and a store hosted here; rank 0's RESULT line."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True, wait_for_workers=False)
    procs = []
    try:
        for rank in range(world):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(world),
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "TORCHELASTIC_USE_AGENT_STORE": "True",
                   "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *argv], env=env,
                                          stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL))
        out, _ = procs[0].communicate(timeout=timeout)
        for p in procs[1:]:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if not lines or any(p.returncode for p in procs):
        raise SystemExit(f"W={world} {argv}: a rank failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help="run as one rank (under torchrun or the driver)")
    p.add_argument("--method", choices=METHODS, default="noprop")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("-T", type=int, default=4, help="DT blocks (every W must be <= T)")
    p.add_argument("--batch", type=int, default=64, help="global minibatch")
    p.add_argument("--image", type=int, default=28, help="synthetic images of 1 x N x N")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and table.md")
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    common = ["-T", str(args.T), "--batch", str(args.batch), "--image", str(args.image), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--threads", str(args.threads)]
    runs: dict = {}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):  # configs interleaved, so a slow spell on a shared machine hits all of them
        for world in args.worlds:
            for method in METHODS:
                rec = _launch(world, ["--method", method] + common, timeout=600)
                runs.setdefault((world, method), []).append(rec)
                print(f"round {r + 1}: W={world} {method:13s} {rec['ms_per_step']:8.1f} ms/step", flush=True)
    rows = []
    for (world, method), recs in sorted(runs.items()):
        rows.append({**recs[-1], "ms_per_step": statistics.median(x["ms_per_step"] for x in recs),
                     "ms_rounds": [round(x["ms_per_step"], 1) for x in recs],
                     "samples_per_s": statistics.median(x["samples_per_s"] for x in recs),
                     "comm_ms_per_step": (statistics.median(x["comm_ms_per_step"] for x in recs)
                                          if recs[0]["comm_ms_per_step"] is not None else None)})
    for r in rows:  # DDP's ms / NoProp's ms at the same W, per round (side by side), then the median
        if r["method"] == "noprop":
            ratios = [d["ms_per_step"] / n["ms_per_step"] for n, d in zip(runs[(r["W"], "noprop")],
                                                                           runs[(r["W"], "backprop-ddp")])]
            r["speed_vs_ddp_rounds"] = [round(v, 2) for v in ratios]
            r["speed_vs_ddp"] = statistics.median(ratios)
    lines = [f"{device_name(torch.device('cpu'))}, {os.cpu_count()} cores, torch {torch.__version__}, 1-min load average "
             f"{load_before:.2f} before and {os.getloadavg()[0]:.2f} after; T = {args.T}, global batch {args.batch}, 1x{args.image}x{args.image} "
             f"images, {args.threads} torch thread(s) per process, median of {args.rounds} rounds x {args.steps} steps",
             "", "| method | W | ms/step (rounds) | samples/s | bytes/step/rank | comm ms/step | NoProp speed / DDP "
             "(per round) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("speed_vs_ddp")
        lines.append(f"| {r['method']} | {r['W']} | {r['ms_per_step']:.1f} ({', '.join(map(str, r['ms_rounds']))}) | "
                     f"{r['samples_per_s']:.0f} | {r['bytes_per_step_per_rank']:,} | "
                     f"{'-' if r['comm_ms_per_step'] is None else format(r['comm_ms_per_step'], '.1f')} | "
                     f"{'' if ratio is None else format(ratio, '.2f') + 'x (' + ', '.join(map(str, r['speed_vs_ddp_rounds'])) + ')'} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        from noprop.atomic import write_text_atomically

        write_text_atomically(args.out / "results.json", json.dumps(rows, indent=1))
        write_text_atomically(args.out / "table.md", table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
