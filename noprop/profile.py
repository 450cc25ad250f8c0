"""`noprop profile`: torch.profiler over a few training steps, with NoProp's stages as named ranges.

The stages are marked by `noprop.stages.stage` (noise, block_forward, local_loss, backward,
optimizer); `--nvtx` also emits them as NVTX ranges for Nsight Systems.
Output: a Chrome trace (DIR/trace.json, open in chrome://tracing or ui.perfetto.dev), a per-op table
(time and memory, key_averages with profile_memory=True) and a per-stage table on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from noprop import engine
from noprop.atomic import write_text_atomically
from noprop.bench.measure import step_factory
from noprop.bench.plan import Case
from noprop.devices import set_threads, usable_device
from noprop.options import check_ranges
from noprop.stages import STAGES, all_threads_profiler, enable_nvtx, sync
from noprop.training.config import MODE_ALIASES, MODES, canonical_mode


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("dt", "backprop", "cnn"), default="dt", help="what to train")
    p.add_argument("--mode", default="parallel", choices=MODES + tuple(MODE_ALIASES),
                   help="NoProp-DT training mode, as for train (all-blocks = parallel; sequential: one step = T "
                        "single-block updates)")
    p.add_argument("--execution", choices=engine.EXECUTIONS, default="auto", help="how DT blocks run")
    p.add_argument("--steps", type=int, default=3, help="profiled training steps")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps first")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=128, help="minibatch size")
    p.add_argument("-T", "--blocks", dest="T", type=int, default=10, help="number of DT blocks")
    p.add_argument("--chunk-size", type=int, default=2, help="blocks per chunk in the chunked mode")
    p.add_argument("--data", default="synthetic", help="data source, as for train (synthetic: MNIST-shaped)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads; >= 2 lets a CPU step run its blocks on threads "
                        "(default: %(default)s = torch's own, one per core)")
    p.add_argument("--out", default="runs/profile", help="directory for trace.json and table.txt")
    p.add_argument("--nvtx", action="store_true", help="also emit NVTX ranges for the stages (for Nsight)")
    p.add_argument("--row-limit", type=int, default=25, help="rows of the per-op table")


def _stage_table(events) -> str:
    rows = [e for e in events if e.key in STAGES]
    cuda = any(getattr(e, "device_time_total", 0) for e in rows)
    lines = [f"{'stage':<24}{'calls':>7}{'CPU total ms':>14}" + (f"{'CUDA total ms':>15}" if cuda else "")]
    for e in sorted(rows, key=lambda e: STAGES.index(e.key)):
        line = f"{e.key:<24}{e.count:>7}{e.cpu_time_total / 1e3:>14.2f}"
        if cuda:
            line += f"{e.device_time_total / 1e3:>15.2f}"
        lines.append(line)
    return "\n".join(lines)


def _all_threads_config():
    """Kineto's profile_all_threads, so that the threads of `--execution threads` are profiled too
    (torch's profiler is otherwise per thread); None where this torch lacks the option."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


def main_args(args) -> int:
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    check_ranges(args, {"steps": 1, "warmup": 0, "batch": 1, "T": 1, "chunk_size": 1, "row_limit": 1, "threads": 1})
    device = usable_device(args.device)
    set_threads(args.threads)
    enable_nvtx(args.nvtx)
    mode = canonical_mode(args.mode)
    case = Case(args.method, mode if args.method == "dt" else "end-to-end", args.execution)
    _, _, train_once = step_factory(case, args.data, args.batch, args.T, args.chunk_size, device)

    def step():
        with record_function("noprop.step"):
            train_once()

    for _ in range(args.warmup):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    config = _all_threads_config() if device.type == "cpu" else None  # only CPU steps run block threads
    t0 = time.perf_counter()
    with all_threads_profiler() if config is not None else contextlib.nullcontext():
        with torch_profile(activities=activities, profile_memory=True, record_shapes=True,
                           experimental_config=config) as prof:
            for _ in range(args.steps):
                step()
            sync(device)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # 'device': torch >= 2.4
    op_table = events.table(sort_by=sort, row_limit=args.row_limit)
    stages = _stage_table(events)
    head = (f"noprop profile: {case.label} | device {device} | batch {args.batch} | T {args.T} | "
            f"{args.steps} steps in {wall:.2f} s under the profiler | torch {torch.__version__}")
    write_text_atomically(out / "table.txt", f"{head}\n\n{stages}\n\n{op_table}\n")
    print(head)
    print("\nper op (sorted by " + sort + "):")
    print(op_table)
    print("NoProp stages:")
    print(stages)
    print(f"\nwrote {trace} (chrome://tracing or https://ui.perfetto.dev) and {out / 'table.txt'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="noprop profile", description=__doc__.split("\n\n")[0])
    add_args(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
