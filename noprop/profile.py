"""`noprop profile`: torch.profiler over a few training steps, with NoProp's stages as named ranges.

The stages are marked by `noprop.stages.stage` (noise, block_forward, local_loss, backward,
optimizer); `--nvtx` also emits them as NVTX ranges for Nsight Systems.
Output: a Chrome trace (DIR/trace.json, open in chrome://tracing or ui.perfetto.dev), a per-op table
(time and memory, key_averages with profile_memory=True) and a per-stage table on stdout.

Time by kind: each operator's self time (device time on a GPU: the kernels it launched itself, not
through other operators; CPU time on a CPU), summed per kind (`KINDS`: convolutions, matmuls, the
fused NoProp ops, the optimizer, copies, other aten work such as elementwise, normalisation and
pooling, and the rest: autograd and Python between operators on a CPU, kernels launched outside any
operator on a GPU). Self times add up without counting anything twice, so the shares are of the
profiled steps' operator time. On a CPU the eager fused ops' inner aten calls count as their own
kinds, so "NoProp fused ops" there is the ops' own overhead; on a GPU it is their kernels.

Operator calls per training step: a device-independent figure of a step's overhead (each call is a
dispatch and, on a GPU, at least one launch). One more step after the profiled ones runs under
`OperatorCount`, a TorchDispatchMode that sees every operator the step dispatches: the forward,
autograd's backward (its TLS carries the mode) and the optimizer; aten ops and noprop's fused ops,
each call of a foreach or fused optimizer op once. A dispatch mode keeps the blocks on the calling
thread (noprop.engine runs no block threads under one), so a threaded CPU step is counted as its loop
step; a compiled step is counted as what runs under the mode, which is not the compiled graph.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from noprop import engine
from noprop.atomic import write_text_atomically
from noprop.bench.measure import execution_used, step_factory
from noprop.bench.plan import Case
from noprop.devices import set_threads, usable_device
from noprop.options import check_ranges
from noprop.stages import STAGES, all_threads_profiler, enable_nvtx, sync
from noprop.training.config import MODE_ALIASES, MODES, PRECISIONS, canonical_mode, why_not_precision


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("dt", "backprop", "cnn"), default="dt", help="what to train")
    p.add_argument("--mode", default="parallel", choices=MODES + tuple(MODE_ALIASES),
                   help="NoProp-DT training mode, as for train (all-blocks = parallel; sequential: one step = T "
                        "single-block updates)")
    p.add_argument("--execution", choices=engine.EXECUTIONS, default="auto", help="how DT blocks run")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="arithmetic of the step, as for train "
                   "(tf32: CUDA only)")
    p.add_argument("--compile", action="store_true", help="the step's blocks through torch.compile, as for train")
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


# (kind, test on an operator's name): the first that matches names the kind; convolution first, so a
# noprop convolution kernel counts as a convolution rather than as one of the fused NoProp ops.
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_scaled_mm")
_COPIES = ("aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::contiguous", "aten::_to_copy",
           "aten::unbind", "aten::index_select")
KINDS = (
    ("convolutions", lambda n: "convolution" in n or "conv2d" in n or n in ("aten::im2col", "aten::col2im")),
    ("matmuls (Linear, bmm)", lambda n: n in _MATMULS),
    ("NoProp fused ops", lambda n: n.startswith("noprop::")),
    ("optimizer", lambda n: "adam" in n.lower() or n.startswith("aten::_foreach") or n.startswith("Optimizer.")),
    ("copies and stacking", lambda n: n in _COPIES),
    ("other aten (elementwise, norm, pool, dropout)", lambda n: n.startswith("aten::")),
    ("autograd and Python between ops", lambda n: True),
)


def time_by_kind(events, device: torch.device) -> list[tuple[str, float, float]]:
    """[(kind, ms, share)] of the profiled operators' self time (module docstring), largest first."""
    cuda = device.type == "cuda"
    totals = collections.Counter()
    for e in events:
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue  # a kernel's own row: its time is already its operator's self device time
        us = (getattr(e, "self_device_time_total", None) or 0) if cuda else e.self_cpu_time_total
        if us:
            totals[next(kind for kind, test in KINDS if test(e.key))] += us / 1e3
    whole = sum(totals.values()) or 1.0
    return [(kind, ms, ms / whole) for kind, ms in totals.most_common()]


def kind_table(rows, device: torch.device) -> str:
    clock = "device" if device.type == "cuda" else "CPU"
    lines = [f"{'time by kind (' + clock + ' self time)':<48}{'ms':>10}{'share':>8}"]
    lines += [f"{kind:<48}{ms:>10.2f}{share:>8.1%}" for kind, ms, share in rows]
    return "\n".join(lines)


class OperatorCount(TorchDispatchMode):
    """Counts the operator calls dispatched while it is entered, by name ('aten::mm', 'noprop::local_loss')."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":  # record_function's range markers: instrumentation, not the step's work
            self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def operator_calls(step) -> collections.Counter:
    """The operators one call of step() dispatches, by name, with their call counts (see the module
    docstring for what a dispatch mode sees)."""
    with OperatorCount() as counter:
        step()
    return counter.calls


def operator_summary(calls: collections.Counter, top: int = 12) -> tuple[str, str]:
    """(one line for the summary, a table of the most called operators)."""
    total = sum(calls.values())
    by_space = collections.Counter()
    for name, n in calls.items():
        by_space[name.split("::")[0]] += n
    spaces = ", ".join(f"{space} {n}" for space, n in by_space.most_common())
    line = f"operator calls per training step: {total} ({spaces}; forward + backward + optimizer, device-independent)"
    rows = [f"{'operator':<40}{'calls':>8}"] + [f"{name:<40}{n:>8}" for name, n in calls.most_common(top)]
    return line, "\n".join(rows)


def _all_threads_config():
    """Kineto's profile_all_threads, so that the threads of `--execution threads` are profiled too
    (torch's profiler is otherwise per thread); None where this torch lacks the option."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


def main_args(args) -> int:
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    check_ranges(args, {"steps": 1, "warmup": 0, "batch": 1, "T": 1, "chunk_size": 1, "row_limit": 1})
    device = usable_device(args.device)
    set_threads(args.threads)
    enable_nvtx(args.nvtx)
    mode = canonical_mode(args.mode)
    reason = why_not_precision(args.precision, str(device), args.method)
    if reason:
        raise ValueError(reason)
    if args.method != "dt" and mode != "parallel":
        raise ValueError(f"--mode {args.mode} does not apply to --method {args.method}: it picks NoProp-DT's update mode")
    if args.method == "cnn" and args.execution != "auto":
        raise ValueError(f"--execution {args.execution} does not apply to --method cnn: it trains one network, "
                         "not T blocks")
    case = Case(args.method, mode if args.method == "dt" else "end-to-end", args.execution, precision=args.precision,
                compile=args.compile)
    model, cfg, train_once = step_factory(case, args.data, args.batch, args.T, args.chunk_size, device)
    blocks = execution_used(model, cfg, device)[0]

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
    calls_line, calls_table = operator_summary(operator_calls(train_once))
    if args.compile:  # dynamo steps aside while a dispatch mode is active: the eager ops run and are counted
        calls_line += " [--compile: counted eagerly; a dispatch mode cannot see inside a compiled graph]"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # 'device': torch >= 2.4
    op_table = events.table(sort_by=sort, row_limit=args.row_limit)
    stages = _stage_table(events)
    kinds = kind_table(time_by_kind(events, device), device)
    head = (f"noprop profile: {case.label} | blocks: {blocks} | device {device} | batch {args.batch} | T {args.T} | "
            f"{args.steps} steps in {wall:.2f} s under the profiler | torch {torch.__version__}")
    write_text_atomically(out / "table.txt",
                          f"{head}\n\n{kinds}\n\n{calls_line}\n{calls_table}\n\n{stages}\n\n{op_table}\n")
    print(head)
    print("\nper op (sorted by " + sort + "):")
    print(op_table)
    print("NoProp stages:")
    print(stages)
    print()
    print(kinds)
    print(f"\n{calls_line}")
    print(f"\nwrote {trace} (chrome://tracing or https://ui.perfetto.dev) and {out / 'table.txt'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="noprop profile", description=__doc__.split("\n\n")[0])
    add_args(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
