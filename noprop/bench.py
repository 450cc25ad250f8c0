"""`noprop bench`: end-to-end training throughput and peak memory, NoProp-DT modes against backprop.

Equal work. One NoProp-DT step = T local block updates on one minibatch of B samples; one backprop
step = one end-to-end update of the same T blocks (and head) on one minibatch. Both push every
sample through all T blocks forward and backward once, so the per-sample arithmetic is the same.
Per mode:
  parallel / chunked / lean  one train_step over all T blocks (chunked/lean: k = chunk_size / 1
                             blocks at a time, each chunk's backward before the next's forward).
  sequential                 Algorithm 1 updates ONE block per minibatch, so one step here is T
                             iterations (block t = 1..T, each on its own minibatch): T block updates
                             per B samples, like the others. It also pays T optimizer steps of the
                             shared head and T noise/CE/KL evaluations; ms_per_block_update = ms/T.
  backprop                   the paper's same-architecture baseline (method doc §2), end to end.
  cnn                        the strongest fair accuracy reference: ONE block's image branch + a
                             linear classifier. Not equal work (about 1/T of it); shown for scale.
  parallel+graph             (--cuda-graph, CUDA only) the parallel step captured once as a CUDA
                             graph and replayed (noprop.graphs): the same update, one launch per step.
  backprop+graph             (--cuda-graph) backprop's step captured and replayed the same way: the
                             baseline the parallel+graph rows are divided by (like for like).
samples_per_s = B / (seconds per step), i.e. training-set samples per second of epoch time: an
epoch over N samples takes N / samples_per_s seconds in every mode (Algorithm 1's epoch is T
passes that each update one block).

Memory. CUDA: torch.cuda.max_memory_allocated (reset per config), max_memory_reserved (what the
caching allocator held) and, if pynvml imports, the process's device memory from NVML (None where
NVML shows host PIDs, as in containers). CPU: every config runs in a fresh subprocess (`isolated`) so
its ru_maxrss is its own (rss_base_mb = the RSS before the model was built). Everywhere: saved_mb,
the peak bytes of tensors saved for backward that are alive at once during one step
(saved_tensors_hooks; parameters excluded, storages counted once) — deterministic and device-
independent, it shows lean < chunked < parallel.

Timing: `repeats` rounds; in each round every config runs warmup steps then `steps` timed steps
(configs interleaved, so a slow spell on a shared machine hits all of them). Reported: medians over
rounds with min/max and quartiles, and ratios to backprop computed per round (side by side), then
the median.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from noprop import engine
from noprop.atomic import write_text_atomically
from noprop.devices import usable_device

DT_MODES = ("parallel", "chunked", "lean", "sequential")
EXECUTIONS = tuple(e for e in engine.EXECUTIONS if e != "auto")  # measurable ones; "auto" picks one of them
BASELINES = ("backprop", "cnn")
REQUIRED_KEYS = ("method", "mode", "device", "batch", "samples_per_s", "ms_per_step", "peak_mem_mb")
CSV_COLUMNS = ("method", "mode", "execution", "execution_used", "cuda_graph", "device", "device_name", "batch", "T",
               "chunk_size", "threads", "steps", "repeats", "ms_per_step", "ms_min", "ms_max", "ms_q25",
               "ms_q75", "ms_all", "samples_per_s", "samples_per_s_min", "samples_per_s_max", "ms_per_block_update",
               "ratio_to_backprop", "ratio_base", "mem_ratio_to_backprop", "saved_ratio_to_backprop", "peak_mem_mb",
               "peak_mem_kind", "rss_base_mb", "reserved_mem_mb", "nvml_mem_mb", "saved_mb", "equal_work", "isolated", "torch",
               "cuda", "triton", "backend", "data", "loadavg_1min", "commit", "dirty", "timestamp", "error")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    """One benchmarked configuration: method dt with a mode and execution, or a baseline."""

    method: str
    mode: str  # dt: a training mode; baselines: "end-to-end"
    execution: str  # loop | vmap | threads | auto ("-" for baselines: they run end to end)
    graph: bool = False  # dt parallel and backprop only: the step captured as a CUDA graph and replayed

    @property
    def label(self) -> str:
        if self.method != "dt":
            return self.method + ("+graph" if self.graph else "")
        return f"dt {self.mode}" + ("+graph" if self.graph else "") + \
            ("" if self.execution in ("auto", "-") else f" ({self.execution})")


def plan(methods, modes, executions, T: int, chunk_size: int, cuda_graph: bool = False) -> tuple[list[Case], list[str]]:
    """Cases to run and notes on the ones skipped. vmap and threads are only run where they differ
    from loop: a lean chunk or a sequential step holds one block (nothing to stack or share out), as
    does a chunk of 1.
    cuda_graph: each dt parallel case, and backprop, is repeated captured as a CUDA graph, after all
    the other cases (in-process on CUDA, a failed capture could leave the context unusable for what
    follows). A dt graph case is then compared with backprop+graph: replay against replay."""
    cases, notes, graphs = [], [], []
    for method in methods:
        if method in BASELINES:
            cases.append(Case(method, "end-to-end", "-"))
            if cuda_graph and method == "backprop":
                graphs.append(Case(method, "end-to-end", "-", graph=True))
            continue
        for mode in modes:
            for ex in executions:
                k = {"parallel": T, "chunked": min(chunk_size, T), "lean": 1, "sequential": 1}[mode]
                if ex in ("vmap", "threads") and k < 2:
                    what = "nothing to stack" if ex == "vmap" else "nothing to share out between threads"
                    notes.append(f"dt {mode} ({ex}) skipped: {k} block per chunk, {what} (runs as loop)")
                    continue
                cases.append(Case(method, mode, ex))
                if cuda_graph and mode == "parallel":
                    graphs.append(Case(method, mode, ex, graph=True))
    return cases + graphs, notes


# ---- measuring one case --------------------------------------------------------------------------

class SavedTensorMeter:
    """Peak bytes of autograd-saved tensors alive at once (saved_tensors_hooks). Storages are counted
    once however often they are saved; parameters (alive anyway) are excluded."""

    def __init__(self, params=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict = {}
        self.current = self.peak = 0
        self.lock = threading.RLock()  # threaded execution saves from several threads at once

    def _add(self, key, nbytes):
        with self.lock:
            n, _ = self.refs.get(key, (0, nbytes))
            if n == 0:
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            self.refs[key] = (n + 1, nbytes)

    def _drop(self, key):
        with self.lock:
            n, nbytes = self.refs[key]
            if n == 1:
                del self.refs[key]
                self.current -= nbytes
            else:
                self.refs[key] = (n - 1, nbytes)

    def pack(self, t):
        try:
            st = t.untyped_storage()
            key, nbytes = (st.data_ptr(), st.device), st.nbytes()
        except (RuntimeError, NotImplementedError):  # a wrapper without storage: count its elements
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if key[0] in self.exclude:
            return t
        return _Saved(self, key, nbytes, t)

    @staticmethod
    def unpack(h):
        return h.tensor if isinstance(h, _Saved) else h

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Saved:
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter, key, nbytes, tensor):
        self.meter, self.key, self.tensor = meter, key, tensor
        meter._add(key, nbytes)

    def __del__(self):  # the graph released this saved tensor (after its backward)
        self.meter._drop(self.key)


def _minibatches(data: str, batch: int, device, count: int = 4):
    from noprop.data import load

    split = load(data)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        idx = torch.randint(0, len(split.train), (batch,), generator=g)
        out.append((split.train.images[idx].to(device), split.train.labels[idx].to(device)))
    return split, out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nvml_process_mb(device) -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
        # By UUID: CUDA's ordinals follow CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER, NVML's do not.
        handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
                  if uuid else pynvml.nvmlDeviceGetHandleByIndex(index))
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory / 2**20
    except Exception:  # no permission, MIG, driver mismatch: NVML is a bonus, not a requirement
        return None
    return None


def training_step_fn(case: Case, data: str, batch: int, T: int, chunk_size: int, device):
    """(model, config, step): `step()` runs one benchmark step of `case` on cycling minibatches.

    One step is equal work (see the module docstring): T block updates on one minibatch in the
    parallel/chunked/lean modes, one end-to-end update for backprop, and for Algorithm 1
    (sequential) T iterations that each update one block on its own minibatch. A graph case
    captures its step here (warm-up and capture happen before any timed step) and replays it.
    """
    from noprop.graphs import CapturedStep
    from noprop.training import Optimizers, TrainConfig, build_model, train_step

    torch.manual_seed(0)
    split, mbs = _minibatches(data, batch, device)
    cfg = TrainConfig(method=case.method, schedule=case.mode if case.method == "dt" else "all-blocks",
                      T=T, batch_size=batch, chunk_size=chunk_size,
                      execution="auto" if case.execution == "-" else case.execution, device=str(device),
                      cuda_graph=case.graph)
    model = build_model(cfg, split.image_shape, split.num_classes, split.train).to(device)
    optimizers = Optimizers(model, cfg)
    model.train()
    if case.graph:
        captured = CapturedStep(model, optimizers, *mbs[0])
        cursor = [0]

        def replay():
            x, y = mbs[cursor[0] % len(mbs)]
            cursor[0] += 1
            captured(x, y)  # reads the loss like train_step does: one host sync per step in both

        return model, cfg, replay
    sequential = case.method == "dt" and case.mode == "sequential"
    plan = [[t] for t in range(1, T + 1)] if sequential else [None]
    chunk = cfg.chunk if case.method == "dt" else None
    cursor = [0]

    def step():
        for blocks in plan:
            x, y = mbs[cursor[0] % len(mbs)]
            cursor[0] += 1
            train_step(model, optimizers, x, y, blocks, None if blocks else chunk)

    return model, cfg, step


def measure(case: Case, opts: dict, saved: bool = True) -> dict:
    """Warmup + `steps` timed steps of `case`: ms per step, peak memory, and (saved=True) the peak
    saved-for-backward bytes of one more step."""
    from noprop.models import NoPropDT

    torch.set_num_threads(opts["threads"])
    device = torch.device(opts["device"])
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        gc.collect()  # the previous in-process case's model may sit in reference cycles: free it first
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, cfg, step = training_step_fn(case, opts["data"], opts["batch"], opts["T"], opts["chunk_size"], device)
    is_dt = isinstance(model, NoPropDT)

    for _ in range(opts["warmup"]):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(opts["steps"]):
        step()
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3 / opts["steps"]
    out = {"ms_per_step": ms, "rss_base_mb": rss_base}
    if saved and not case.graph:  # a replay runs no autograd hooks: nothing to meter (the same step as parallel)
        meter = SavedTensorMeter(model.parameters())
        with meter.hooks():
            step()
        out["saved_mb"] = meter.peak / 2**20
    if is_dt:
        k = {"parallel": model.T, "chunked": cfg.chunk_size, "lean": 1, "sequential": 1}[case.mode]
        out["execution_used"] = engine.resolve(model.execution, list(model.blocks)[:max(1, min(k, model.T))], device)
    else:
        out["execution_used"] = "-"
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
        out["reserved_mem_mb"] = torch.cuda.max_memory_reserved(device) / 2**20  # + the caching allocator's slack
        out["nvml_mem_mb"] = _nvml_process_mb(device)
    else:
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_mem_kind"] = "ru_maxrss of this config's own process" if opts["isolated"] else \
            "ru_maxrss of the shared process (not isolated: includes earlier configs)"
    return out


def _run_isolated(case: Case, opts: dict, saved: bool, timeout: float | None) -> dict:
    payload = json.dumps({"case": asdict(case), "opts": opts, "saved": saved})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        proc = subprocess.run([sys.executable, "-m", "noprop.bench", "--worker", payload], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# ---- environment ---------------------------------------------------------------------------------

def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # no getloadavg, or a sandbox without /proc/loadavg
        return None


def environment(device: torch.device, threads: int) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "--short", "HEAD")
    if os.environ.get("NOPROP_COMMIT"):  # a copied tree whose .git is stale (the lent GPU machines)
        commit, status = os.environ["NOPROP_COMMIT"], ""
    return {"device": device.type, "device_name": device_name(device), "threads": threads,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "backend": os.environ.get("NOPROP_BACKEND", "auto"),
            "loadavg_1min": _loadavg(),
            "commit": commit, "dirty": bool(status) if status is not None else None,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---- the benchmark -------------------------------------------------------------------------------

def _quantiles(values):
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarise(case: Case, runs: list[dict], opts: dict, env: dict) -> dict:
    ok = [r for r in runs if "error" not in r]
    rec = {"method": case.method, "mode": case.mode, "execution": case.execution, "label": case.label,
           "cuda_graph": case.graph,
           **env, "batch": opts["batch"], "T": opts["T"], "chunk_size": opts["chunk_size"], "steps": opts["steps"],
           "warmup": opts["warmup"], "repeats": len(ok), "data": opts["data"], "isolated": opts["isolated"],
           "equal_work": case.method != "cnn",
           "block_updates_per_step": opts["T"] if case.method != "cnn" else None}
    if not ok:
        return {**rec, "error": runs[0].get("error") if runs else "not run", "samples_per_s": None,
                "ms_per_step": None, "peak_mem_mb": None}
    ms = [r["ms_per_step"] for r in ok]
    q25, q75 = _quantiles(ms)
    med = statistics.median(ms)
    saved = [r["saved_mb"] for r in ok if "saved_mb" in r]
    nvml = [r["nvml_mem_mb"] for r in ok if r.get("nvml_mem_mb") is not None]
    reserved = [r["reserved_mem_mb"] for r in ok if r.get("reserved_mem_mb") is not None]
    rec.update(ms_per_step=med, ms_min=min(ms), ms_max=max(ms), ms_q25=q25, ms_q75=q75, ms_all=ms,
               samples_per_s=opts["batch"] * 1e3 / med, samples_per_s_min=opts["batch"] * 1e3 / max(ms),
               samples_per_s_max=opts["batch"] * 1e3 / min(ms),
               ms_per_block_update=med / opts["T"] if case.method != "cnn" else None,
               peak_mem_mb=max(r["peak_mem_mb"] for r in ok), peak_mem_kind=ok[0]["peak_mem_kind"],
               rss_base_mb=min(r["rss_base_mb"] for r in ok), nvml_mem_mb=max(nvml) if nvml else None,
               reserved_mem_mb=max(reserved) if reserved else None,
               saved_mb=saved[0] if saved else None, execution_used=ok[0]["execution_used"])
    if len(ok) < len(runs):
        rec["error"] = f"{len(runs) - len(ok)} of {len(runs)} repeats failed: {next(r for r in runs if 'error' in r)['error']}"
    return rec


def add_ratios(records: list[dict], per_round: dict) -> None:
    """Throughput, memory and saved-bytes ratios to backprop; throughput per round (side by side).

    Like for like: a dt case replayed as a CUDA graph is compared with backprop+graph when that was
    measured (`ratio_base` names the baseline each record was divided by)."""
    bases = {label: next((r for r in records if r["label"] == label and r.get("ms_per_step")), None)
             for label in ("backprop", "backprop+graph")}
    for rec in records:
        rec["ratio_to_backprop"] = rec["mem_ratio_to_backprop"] = rec["saved_ratio_to_backprop"] = None
        label = "backprop+graph" if rec.get("cuda_graph") and rec["method"] == "dt" and bases["backprop+graph"] \
            else "backprop"
        base = bases[label]
        rec["ratio_base"] = label if base is not None else None
        if base is None or not rec.get("ms_per_step"):
            continue
        pairs = [(b["ms_per_step"], c["ms_per_step"]) for b, c in zip(per_round[label], per_round[rec["label"]])
                 if "ms_per_step" in b and "ms_per_step" in c]
        ratios = [b / c for b, c in pairs]  # > 1: faster than backprop
        rec["ratio_to_backprop"] = statistics.median(ratios) if ratios else base["ms_per_step"] / rec["ms_per_step"]
        rec["ratio_to_backprop_min"] = min(ratios) if ratios else None
        rec["ratio_to_backprop_max"] = max(ratios) if ratios else None
        if rec["peak_mem_mb"] and base["peak_mem_mb"]:
            if rec["device"] == "cpu" and rec.get("rss_base_mb") is not None and base.get("rss_base_mb") is not None:
                mine, theirs = rec["peak_mem_mb"] - rec["rss_base_mb"], base["peak_mem_mb"] - base["rss_base_mb"]
                rec["mem_ratio_to_backprop"] = mine / theirs if theirs > 0 else None  # RSS above the baseline
            else:
                rec["mem_ratio_to_backprop"] = rec["peak_mem_mb"] / base["peak_mem_mb"]
        if rec.get("saved_mb") and base.get("saved_mb"):
            rec["saved_ratio_to_backprop"] = rec["saved_mb"] / base["saved_mb"]


def _records(cases, per_round: dict, opts: dict, env: dict) -> list[dict]:
    """Summaries of the cases measured so far (at least one round), with their ratios to backprop."""
    records = [summarise(c, per_round[c.label], opts, env) for c in cases if per_round[c.label]]
    add_ratios(records, per_round)
    return records


def run(opts: dict, methods, modes, executions, log=print, on_progress=None) -> list[dict]:
    """Every case, `repeats` rounds, side by side; returns one summary record per case.

    on_progress(records), when given, is called after every measured case with the summaries so
    far, so a run cut short (a time limit, Ctrl-C) still leaves its results behind.
    """
    device = torch.device(opts["device"])
    env = environment(device, opts["threads"])
    cases, notes = plan(methods, modes, executions, opts["T"], opts["chunk_size"], opts.get("cuda_graph", False))
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
                res = _run_isolated(case, opts, saved, opts.get("case_timeout"))
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
            log(f"[{done:>2}/{n}] round {r + 1} {case.label:<22} {what}  ({time.perf_counter() - t0:.0f} s)")
            if on_progress is not None and done < n:
                on_progress(_records(cases, per_round, opts, env))
    return _records(cases, per_round, opts, env)


def table(records: list[dict]) -> str:
    head = f"{'config':<22}{'ms/step':>10}{'[min-max]':>18}{'samples/s':>11}{'x backprop':>11}" \
           f"{'peak MB':>9}{'saved MB':>10}{'x bp saved':>11}"
    lines = [head, "-" * len(head)]
    for r in records:
        if not r.get("ms_per_step"):
            lines.append(f"{r['label']:<22}  error: {r.get('error')}")
            continue
        ratio = f"{r['ratio_to_backprop']:.2f}" if r.get("ratio_to_backprop") else "-"
        sratio = f"{r['saved_ratio_to_backprop']:.2f}" if r.get("saved_ratio_to_backprop") else "-"
        saved = f"{r['saved_mb']:.1f}" if r.get("saved_mb") is not None else "-"
        spread = f"[{r['ms_min']:.0f}-{r['ms_max']:.0f}]"
        lines.append(f"{r['label']:<22}{r['ms_per_step']:>10.1f}{spread:>18}"
                     f"{r['samples_per_s']:>11.1f}{ratio:>11}{r['peak_mem_mb']:>9.0f}{saved:>10}{sratio:>11}")
    if any(r.get("ratio_base") == "backprop+graph" for r in records):
        lines.append("(+graph rows: x backprop is against backprop+graph, replay against replay)")
    return "\n".join(lines)


def execution_verdict(records: list[dict]) -> list[str]:
    """Per mode measured more than one way (loop, vmap, threads): which execution wins here."""
    out = []
    by = {(r["mode"], r["execution"]): r for r in records
          if r["method"] == "dt" and r.get("ms_per_step") and not r.get("cuda_graph")}
    for mode in DT_MODES:
        measured = sorted((r["ms_per_step"], ex, r) for ex in EXECUTIONS if (r := by.get((mode, ex))))
        if len(measured) > 1:
            (best_ms, best, rec), (next_ms, runner_up, _) = measured[0], measured[1]
            times = ", ".join(f"{ex} {ms:.1f} ms" for ms, ex, _ in measured)
            out.append(f"{mode}: {best} wins on {rec['device']} ({next_ms / best_ms:.2f}x faster than {runner_up}; "
                       f"{times})")
    return out


def _rounded(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def write_outputs(records: list[dict], json_path=None, csv_path=None) -> None:
    records = [{k: _rounded(v) for k, v in r.items()} for r in records]
    if json_path:
        write_text_atomically(json_path, json.dumps(records, indent=1) + "\n")
    if csv_path:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k) for k in CSV_COLUMNS})
        write_text_atomically(csv_path, buf.getvalue())


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
                        "vmap, threads (CPU, needs --threads >= 2); both = loop,vmap; all = every one the device runs")
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
    p.add_argument("--quick", action="store_true",
                   help="smoke test: T=3, batch 16, 1 warmup + 2 steps, 1 repeat, in-process (checks the output, "
                        "not the speed)")
    p.add_argument("--json", default=None, help="write the records (a JSON list) here")
    p.add_argument("--csv", default=None, help="write the records as CSV here")
    p.add_argument("--out", default=None, help="directory: writes bench.json and bench.csv there")


def options(args) -> tuple[dict, list, list, list]:
    from noprop.training import canonical_schedule

    device = usable_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph: CUDA graphs need a CUDA device, got --device {args.device}")
    if args.quick:
        args.T, args.batch, args.repeats = 3, min(args.batch, 16), 1
        args.steps, args.warmup = args.steps or 2, args.warmup if args.warmup is not None else 1
    cpu = device.type == "cpu"
    threads = args.threads or torch.get_num_threads()
    isolated = args.isolate if args.isolate is not None else (cpu and not args.quick)
    opts = {"device": str(device), "batch": args.batch, "T": args.T, "chunk_size": args.chunk_size,
            "steps": args.steps or (5 if cpu else 20), "warmup": args.warmup if args.warmup is not None else (1 if cpu else 5),
            "repeats": args.repeats, "threads": threads, "isolated": isolated, "data": args.data,
            "case_timeout": args.case_timeout, "cuda_graph": bool(args.cuda_graph)}
    for name in ("batch", "T", "chunk_size", "steps", "repeats", "threads"):
        if opts[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {opts[name]}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    # train's "all-blocks" is another name for the parallel update; duplicates are measured once
    modes = list(dict.fromkeys(canonical_schedule(m.strip()) for m in args.modes.split(",") if m.strip()))
    for m in methods:
        if m not in ("dt",) + BASELINES:
            raise ValueError(f"--methods: unknown method {m!r} (dt, backprop, cnn)")
    for m in modes:
        if m not in DT_MODES:
            raise ValueError(f"--modes: unknown mode {m!r} ({', '.join(DT_MODES)}, or all-blocks = parallel)")
    executions = _executions(args.execution, device, threads)
    if args.cuda_graph and ("dt" not in methods or "parallel" not in modes):
        raise ValueError("--cuda-graph captures the dt parallel step: --methods must include dt and --modes parallel")
    return opts, methods, modes, executions


def _executions(spec: str, device: torch.device, threads: int) -> list[str]:
    """--execution's list: names checked against the device and the thread count."""
    aliases = {"both": ["loop", "vmap"], "all": ["loop", "vmap"] + (["threads"] if device.type == "cpu" else [])}
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


def _worker(payload: str) -> int:
    job = json.loads(payload)
    res = measure(Case(**job["case"]), job["opts"], job["saved"])
    print(json.dumps(res), flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    p = argparse.ArgumentParser(prog="noprop bench", description=__doc__.split("\n\n")[0])
    add_args(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
