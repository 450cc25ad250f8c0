"""`noprop bench`'s records: the environment, summaries over rounds, ratios to backprop, the table
and the JSON / CSV files."""
from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

from noprop.atomic import write_text_atomically
from noprop.bench.plan import DT_MODES, EXECUTIONS, LIKE, STACKED, TREATMENT, Case

ROOT = Path(__file__).resolve().parent.parent.parent
CSV_COLUMNS = ("method", "mode", "execution", "execution_used", "stacked", "cuda_graph", "precision", "compile",
               "compile_mode", "device",
               "device_name", "batch", "T", "chunk_size", "threads", "steps", "repeats", "ms_per_step", "ms_min",
               "ms_max", "ms_q25", "ms_q75", "ms_all", "samples_per_s", "samples_per_s_min", "samples_per_s_max",
               "ms_per_block_update", "flop_per_step", "tflops", "pct_of_bf16_peak", "ratio_to_backprop",
               "ratio_base", "ratio_unlike", "mem_ratio_to_backprop", "saved_ratio_to_backprop", "peak_mem_mb",
               "peak_mem_kind", "rss_base_mb", "reserved_mem_mb", "nvml_mem_mb", "saved_mb", "equal_work", "isolated", "torch",
               "cuda", "triton", "backend", "data", "loadavg_1min", "commit", "dirty", "timestamp", "error")


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


# Dense (not sparse) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by a part of the
# device name; the first match wins, so more specific names come first.
BF16_DENSE_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200 NVL", 835.0),
                          ("H200", 989.4), ("A100", 312.0))


def bf16_dense_peak_tflops(name: str) -> float | None:
    """The bf16 dense peak of a GPU named `name` (torch.cuda.get_device_name), None if not listed."""
    return next((peak for part, peak in BF16_DENSE_PEAK_TFLOPS if part in (name or "")), None)


def add_flops(records: list[dict]) -> None:
    """TFLOP/s and the share of the device's bf16 dense peak for each record. The operations of a step
    are counted in the eager, uncompiled cases; a graph or compiled case of the same method and mode
    does the same arithmetic and borrows their count."""
    counted = {(r["method"], r["mode"]): r["flop_per_step"] for r in records if r.get("flop_per_step")}
    for rec in records:
        flop = rec.get("flop_per_step") or counted.get((rec["method"], rec["mode"]))
        rec["flop_per_step"] = flop
        rec["tflops"] = rec["pct_of_bf16_peak"] = None
        if flop and rec.get("ms_per_step"):
            rec["tflops"] = flop / (rec["ms_per_step"] * 1e-3) / 1e12
            peak = bf16_dense_peak_tflops(rec.get("device_name")) if rec.get("device") == "cuda" else None
            rec["pct_of_bf16_peak"] = 100 * rec["tflops"] / peak if peak else None


def _quantiles(values):
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarise(case: Case, runs: list[dict], opts: dict, env: dict) -> dict:
    ok = [r for r in runs if "error" not in r]
    rec = {"method": case.method, "mode": case.mode, "execution": case.execution, "label": case.label,
           "cuda_graph": case.graph, "precision": case.precision, "compile": case.compile,
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
    flops = [r["flop_per_step"] for r in ok if r.get("flop_per_step")]
    nvml = [r["nvml_mem_mb"] for r in ok if r.get("nvml_mem_mb") is not None]
    reserved = [r["reserved_mem_mb"] for r in ok if r.get("reserved_mem_mb") is not None]
    rec.update(ms_per_step=med, ms_min=min(ms), ms_max=max(ms), ms_q25=q25, ms_q75=q75, ms_all=ms,
               samples_per_s=opts["batch"] * 1e3 / med, samples_per_s_min=opts["batch"] * 1e3 / max(ms),
               samples_per_s_max=opts["batch"] * 1e3 / min(ms),
               ms_per_block_update=med / opts["T"] if case.method != "cnn" else None,
               peak_mem_mb=max(r["peak_mem_mb"] for r in ok), peak_mem_kind=ok[0]["peak_mem_kind"],
               rss_base_mb=min(r["rss_base_mb"] for r in ok), nvml_mem_mb=max(nvml) if nvml else None,
               reserved_mem_mb=max(reserved) if reserved else None,
               saved_mb=saved[0] if saved else None, execution_used=ok[0]["execution_used"],
               flop_per_step=flops[0] if flops else None, stacked=ok[0].get("stacked"),
               compile_mode=ok[0].get("compile_mode"))
    if len(ok) < len(runs):
        rec["error"] = f"{len(runs) - len(ok)} of {len(runs)} repeats failed: {next(r for r in runs if 'error' in r)['error']}"
    return rec


def _treatment(rec: dict) -> tuple:
    """(precision, compile, graph) of a record, in plan.TREATMENT's order (records before these
    fields existed were fp32, eager)."""
    values = {"precision": rec.get("precision", "fp32"), "compile": bool(rec.get("compile")),
              "graph": bool(rec.get("cuda_graph"))}
    return tuple(values[name] for name in TREATMENT)


def _like(rec: dict) -> tuple:
    """The record's treatment and whether its blocks ran stacked (plan.LIKE's order; records without
    `stacked` say it by their execution)."""
    stacked = rec["stacked"] if rec.get("stacked") is not None else rec.get("execution_used") in STACKED
    return _treatment(rec) + (bool(stacked),)


_WORDS = {"compile": ("compiled", "eager"), "graph": ("graph", "eager"), "stacked": ("stacked", "unstacked")}


def _differences(rec: dict, base: dict) -> str | None:
    """How a record's treatment differs from its baseline's ('bf16 vs fp32; graph vs eager'), or None."""
    def word(name, value):
        return value if name == "precision" else _WORDS[name][0 if value else 1]

    out = [f"{word(name, mine)} vs {word(name, theirs)}"
           for name, mine, theirs in zip(LIKE, _like(rec), _like(base)) if mine != theirs]
    return "; ".join(out) or None


def _baseline(rec: dict, bases: list[dict]) -> dict | None:
    """The backprop record `rec` is divided by. Like for like: the one with the same precision, compile,
    capture and stacking. A backprop record itself is divided by the plain one (fp32, eager, no graph,
    blocks one by one), which shows what its treatment does for backprop. Where no like one was
    measured, the closest (fewest differences, then plan order): add_ratios labels that pair unlike."""
    if not bases:
        return None
    want = ("fp32", False, False, False) if rec["method"] == "backprop" else _like(rec)
    return min(bases, key=lambda b: sum(x != y for x, y in zip(_like(b), want)))


def add_ratios(records: list[dict], per_round: dict) -> None:
    """Throughput, memory and saved-bytes ratios to backprop; throughput per round (side by side).

    `ratio_base` names the backprop record each record was divided by (see `_baseline`), and
    `ratio_unlike` says how the two differ in precision, compile, capture or stacking (None: like for like):
    an unlike ratio is never reported without saying so."""
    bases = [r for r in records if r["method"] == "backprop" and r.get("ms_per_step")]
    for rec in records:
        rec["ratio_to_backprop"] = rec["mem_ratio_to_backprop"] = rec["saved_ratio_to_backprop"] = None
        base = _baseline(rec, bases)
        rec["ratio_base"] = base["label"] if base is not None else None
        rec["ratio_unlike"] = _differences(rec, base) if base is not None else None
        if base is None or not rec.get("ms_per_step"):
            continue
        label = base["label"]
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


def records_so_far(cases, per_round: dict, opts: dict, env: dict) -> list[dict]:
    """Summaries of the cases measured so far (at least one round), with their ratios to backprop."""
    records = [summarise(c, per_round[c.label], opts, env) for c in cases if per_round[c.label]]
    add_ratios(records, per_round)
    add_flops(records)
    return records


def table(records: list[dict]) -> str:
    width = max([22] + [len(r["label"]) + 1 for r in records])
    peaks = any(r.get("pct_of_bf16_peak") for r in records)
    head = f"{'config':<{width}}{'ms/step':>10}{'[min-max]':>18}{'samples/s':>11}{'TFLOP/s':>9}" \
           f"{'% bf16 peak' if peaks else '':>{12 if peaks else 0}}{'x backprop':>11}" \
           f"{'peak MB':>9}{'saved MB':>10}{'x bp saved':>11}"
    lines = [head, "-" * len(head)]
    for r in records:
        if not r.get("ms_per_step"):
            lines.append(f"{r['label']:<{width}}  error: {r.get('error')}")
            continue
        ratio = f"{r['ratio_to_backprop']:.2f}" if r.get("ratio_to_backprop") else "-"
        sratio = f"{r['saved_ratio_to_backprop']:.2f}" if r.get("saved_ratio_to_backprop") else "-"
        saved = f"{r['saved_mb']:.1f}" if r.get("saved_mb") is not None else "-"
        spread = f"[{r['ms_min']:.0f}-{r['ms_max']:.0f}]"
        unlike = f"  (unlike: {r['ratio_unlike']}, against {r['ratio_base']})" if r.get("ratio_unlike") else ""
        tflops = f"{r['tflops']:.3g}" if r.get("tflops") else "-"
        pct = (f"{r['pct_of_bf16_peak']:.1f}" if r.get("pct_of_bf16_peak") else "-") if peaks else ""
        lines.append(f"{r['label']:<{width}}{r['ms_per_step']:>10.1f}{spread:>18}"
                     f"{r['samples_per_s']:>11.1f}{tflops:>9}{pct:>{12 if peaks else 0}}{ratio:>11}"
                     f"{r['peak_mem_mb']:>9.0f}{saved:>10}{sratio:>11}{unlike}")
    graph_bases = any((r.get("ratio_base") or "").startswith("backprop+graph") for r in records)
    lines.append("TFLOP/s: matmul and convolution operations of a step (torch's FlopCounterMode) per second"
                 + ("; % bf16 peak: of the GPU's dense bf16 tensor-core peak" if peaks else ""))
    lines.append("x backprop: against the backprop row of the same precision, compile, capture and stacking"
                 + ("; +graph rows against backprop+graph, replay against replay" if graph_bases else "")
                 + ("; (unlike: ...) marks a row without one (a backprop row: what its setting does for backprop)"
                    if any(r.get("ratio_unlike") for r in records) else ""))
    return "\n".join(lines)


def execution_verdict(records: list[dict]) -> list[str]:
    """Per mode (and precision and compile) measured more than one way (loop, vmap, threads): which
    execution wins here."""
    out = []
    by = {(r["mode"], _treatment(r), r["execution"]): r for r in records
          if r["method"] == "dt" and r.get("ms_per_step") and not r.get("cuda_graph")}
    for treatment in sorted({t for _, t, _ in by}, key=str):
        tags = ", ".join(t for t in (treatment[0] if treatment[0] != "fp32" else "", "compile" if treatment[1] else "")
                         if t)
        for mode in DT_MODES:
            measured = sorted((r["ms_per_step"], ex, r) for ex in EXECUTIONS if (r := by.get((mode, treatment, ex))))
            if len(measured) > 1:
                (best_ms, best, rec), (next_ms, runner_up, _) = measured[0], measured[1]
                times = ", ".join(f"{ex} {ms:.1f} ms" for ms, ex, _ in measured)
                out.append(f"{mode}{f' [{tags}]' if tags else ''}: {best} wins on {rec['device']} "
                           f"({next_ms / best_ms:.2f}x faster than {runner_up}; {times})")
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


