"""`noprop bench`: the options, the run over all cases and rounds, and the printed summary."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from noprop import engine
from noprop.bench.measure import measure, run_isolated, worker
from noprop.bench.plan import BASELINES, DT_MODES, EXECUTIONS, plan
from noprop.bench.report import environment, execution_verdict, records_so_far, table, write_outputs
from noprop.devices import check_threads, usable_device
from noprop.options import check_ranges
from noprop.training.config import PRECISIONS, canonical_mode, compile_mode_override, why_not_precision


def run(opts: dict, methods, modes, executions, log=print, on_progress=None) -> list[dict]:
    """Every case, `repeats` rounds, side by side; returns one summary record per case.

    on_progress(records), when given, is called after every measured case with the summaries so
    far, so a run cut short (a time limit, Ctrl-C) still leaves its results behind.
    """
    device = torch.device(opts["device"])
    env = environment(device, opts["threads"])
    cases, notes = plan(methods, modes, executions, opts["T"], opts["chunk_size"], opts.get("cuda_graph", False),
                        opts.get("precisions", ("fp32",)), opts.get("compile", False), opts["device"])
    for note in notes:
        log(f"note: {note}")
    per_round = {c.label: [] for c in cases}
    n = len(cases) * opts["repeats"]
    done = 0
    for r in range(opts["repeats"]):
        for case in cases:
            saved = r == 0  # deterministic: measured once
            t0 = time.perf_counter()
            if opts["isolated"]:
                res = run_isolated(case, opts, saved, opts.get("case_timeout"))
            else:
                try:
                    res = measure(case, opts, saved)
                except Exception as exc:  # report and keep going
                    res = {"error": f"{type(exc).__name__}: {exc}"}
            per_round[case.label].append(res)
            done += 1
            what = res["error"] if "error" in res else \
                f"{res['ms_per_step']:8.1f} ms/step {opts['batch'] * 1e3 / res['ms_per_step']:8.1f} samples/s " \
                f"peak {res['peak_mem_mb']:7.0f} MB" + (f" saved {res['saved_mb']:7.1f} MB" if "saved_mb" in res else "")
            log(f"[{done:>2}/{n}] round {r + 1} {case.label:<24} {what}  ({time.perf_counter() - t0:.0f} s)")
            if on_progress is not None and done < n:
                on_progress(records_so_far(cases, per_round, opts, env))
    return records_so_far(cases, per_round, opts, env)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic",
                   help="data source (as for train): synthetic = MNIST-shaped 1x28x28, 10 classes; mnist5k; ...")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=128, help="minibatch size B")
    p.add_argument("-T", "--blocks", dest="T", type=int, default=10, help="number of DT blocks")
    p.add_argument("--chunk-size", type=int, default=2, help="blocks per chunk in the chunked mode")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per repeat (default: %(default)s = 5 on CPU, 20 on CUDA; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default: %(default)s = 1 on CPU, 5 on CUDA; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all configs (medians and spread over these)")
    p.add_argument("--modes", default=",".join(DT_MODES),
                   help="comma-separated NoProp-DT modes (all-blocks, train's name, = parallel)")
    p.add_argument("--methods", default="dt,backprop,cnn", help="comma-separated: dt, backprop, cnn")
    p.add_argument("--execution", default="auto",
                   help="how DT blocks run, comma-separated to compare: auto (the engine's per-device pick), loop, "
                        "vmap, threads (CPU, needs --threads >= 2), bank (stacked parameters; its convolutions: "
                        "NOPROP_BANK_CONV); both = loop,vmap; all = every one the device runs. backprop runs "
                        "the partner of each: its image branches in a bank for stacked ones (vmap, bank), loop "
                        "for the others")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, recorded with the results (1 steadies timings on a busy shared machine but "
                        "leaves the CPU's block threads nothing to share out) (default: %(default)s = torch's own, "
                        "one per core)")
    # Neither flag given: isolate is None and options() isolates on CPU unless --quick. --no-isolate's
    # default is SUPPRESS so that the help does not print store_false's default (True) as if it applied.
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="run each config in a fresh subprocess, so its peak RSS is its own (default: %(default)s = "
                        "neither flag: isolated on CPU except with --quick, in-process on CUDA)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", default=argparse.SUPPRESS,
                   help="run every config in this process (peak RSS then includes earlier configs)")
    p.add_argument("--case-timeout", type=float, default=None,
                   help="seconds before an isolated config is abandoned (default: %(default)s = no limit)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also run the dt parallel step and the backprop step captured as CUDA graphs and replayed "
                        "(labels 'dt parallel+graph', 'backprop+graph'; the dt graph rows are compared with "
                        "backprop+graph; CUDA only; needs dt and parallel in --methods/--modes)")
    p.add_argument("--precision", default="fp32",
                   help=f"comma-separated precisions ({', '.join(PRECISIONS)}; tf32 on CUDA only): every case, "
                        "backprop included, runs in each; DT rows are divided by the backprop row of their precision")
    p.add_argument("--compile", action="store_true",
                   help="also run every case with its blocks through torch.compile (labels '[compile]'; not "
                        "the threads execution), divided by the compiled backprop")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: T=3, batch 16, 1 warmup + 2 steps, 1 repeat, in-process (checks the output, "
                        "not the speed)")
    p.add_argument("--json", default=None, help="write the records (a JSON list) here")
    p.add_argument("--csv", default=None, help="write the records as CSV here")
    p.add_argument("--out", default=None, help="directory: writes bench.json and bench.csv there")


def options(args) -> tuple[dict, list, list, list]:
    check_ranges(args, {"batch": 1, "T": 1, "chunk_size": 1, "steps": 1, "warmup": 0, "repeats": 1, "case_timeout": 1})
    check_threads(args.threads)
    device = usable_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph: CUDA graphs need a CUDA device, got --device {args.device}")
    if args.quick:
        args.T, args.batch, args.repeats = 3, min(args.batch, 16), 1
        args.steps = args.steps if args.steps is not None else 2
        args.warmup = args.warmup if args.warmup is not None else 1
    cpu = device.type == "cpu"
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    isolated = args.isolate if args.isolate is not None else (cpu and not args.quick)
    opts = {"device": str(device), "batch": args.batch, "T": args.T, "chunk_size": args.chunk_size,
            "steps": args.steps if args.steps is not None else (5 if cpu else 20), "warmup": args.warmup if args.warmup is not None else (1 if cpu else 5),
            "repeats": args.repeats, "threads": threads, "isolated": isolated, "data": args.data,
            "case_timeout": args.case_timeout, "cuda_graph": bool(args.cuda_graph),
            "precisions": _precisions(args.precision, device), "compile": bool(args.compile)}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    # train's "all-blocks" is another name for the parallel update; duplicates are measured once
    try:
        modes = list(dict.fromkeys(canonical_mode(m.strip()) for m in args.modes.split(",") if m.strip()))
    except ValueError as exc:
        raise ValueError(f"--modes: {exc}") from None
    for m in methods:
        if m not in ("dt",) + BASELINES:
            raise ValueError(f"--methods: unknown method {m!r} (dt, backprop, cnn)")
    executions = _executions(args.execution, device, threads)
    if args.compile:
        compile_mode_override()  # a bad NOPROP_COMPILE_MODE is one line now, not an error in every case
    if args.cuda_graph and ("dt" not in methods or "parallel" not in modes):
        raise ValueError("--cuda-graph captures the dt parallel step: --methods must include dt and --modes parallel")
    return opts, methods, modes, executions


def _precisions(spec: str, device: torch.device) -> list[str]:
    """--precision's list, each checked against the device (tf32 is CUDA's)."""
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise ValueError(f"--precision {spec!r} names no precision ({', '.join(PRECISIONS)})")
    for name in names:
        reason = why_not_precision(name, str(device))
        if reason:
            raise ValueError(reason)
    return names


def _executions(spec: str, device: torch.device, threads: int) -> list[str]:
    """--execution's list: names checked against the device and the thread count."""
    aliases = {"both": ["loop", "vmap"], "all": ["loop", "vmap"] + (["threads"] if device.type == "cpu" else []) + ["bank"]}
    names = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        for ex in aliases.get(name, [name]):
            if ex not in ("auto",) + EXECUTIONS:
                raise ValueError(f"--execution: unknown execution {ex!r} (auto, {', '.join(EXECUTIONS)}, both, all)")
            if ex == "threads":
                engine.check_threads_device(device)
            if ex == "threads" and threads < 2 and name != "all":
                raise ValueError("--execution threads shares torch's threads out between blocks: it needs --threads >= 2 "
                                 "(with one thread it would be loop)")
            if ex == "threads" and threads < 2:
                continue
            if ex not in names:
                names.append(ex)
    if not names:
        raise ValueError(f"--execution {spec!r} names no execution")
    return names


def main_args(args) -> int:
    opts, methods, modes, executions = options(args)
    torch.set_num_threads(opts["threads"])
    print(f"noprop bench: {', '.join(methods)} | modes {','.join(modes)}{' + parallel CUDA graph' if opts['cuda_graph'] else ''} | execution {'/'.join(executions)} | "
          f"precision {'/'.join(opts['precisions'])}{' + compiled' if opts['compile'] else ''} | "
          f"device {opts['device']} | batch {opts['batch']} | T {opts['T']} | {opts['warmup']} warmup + "
          f"{opts['steps']} steps x {opts['repeats']} rounds | {opts['threads']} threads | "
          f"{'isolated subprocesses' if opts['isolated'] else 'in-process'}", file=sys.stderr)
    json_path, csv_path = args.json, args.csv
    if args.out:
        json_path = json_path or str(Path(args.out) / "bench.json")
        csv_path = csv_path or str(Path(args.out) / "bench.csv")
    # Outputs are rewritten after every measured case (the cases so far), then once at the end.
    records = run(opts, methods, modes, executions, log=lambda s: print(s, file=sys.stderr, flush=True),
                  on_progress=lambda recs: write_outputs(recs, json_path, csv_path))
    write_outputs(records, json_path, csv_path)
    r0 = records[0]
    print(f"\n{r0['device_name']} | torch {r0['torch']} | {opts['threads']} threads | batch {opts['batch']} | "
          f"T {opts['T']} | commit {r0['commit'] or 'unknown (not run from a git checkout)'}"
          f"{' (dirty)' if r0['dirty'] else ''}")
    print(table(records))
    for line in execution_verdict(records):
        print("execution: " + line)
    for path in (json_path, csv_path):
        if path:
            print(f"wrote {path}")
    return 1 if any(r.get("error") for r in records) else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    p = argparse.ArgumentParser(prog="noprop bench", description=__doc__.split("\n\n")[0])
    add_args(p)
    return main_args(p.parse_args(argv))
