"""PNG plots of `noprop bench` records: throughput and memory per method/mode, with ratios to backprop.

    python bench/plots.py bench/results/cpu-epyc/bench.json [more.json ...] [--out DIR]

For each JSON file STEM.json writes DIR/STEM_throughput.png (samples/s, median with min-max
whiskers, label = ratio to backprop measured side by side) and DIR/STEM_memory.png (peak memory:
CUDA max allocated, or on the CPU the process RSS above its pre-model baseline; and the peak bytes
saved for backward, labelled with the ratio to backprop). DIR defaults to the JSON's folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"dt": "#3b7dd8", "backprop": "#d9534f", "cnn": "#9e9e9e"}


def _ok(records):
    return [r for r in records if r.get("ms_per_step")]


def _subtitle(records) -> str:
    r = records[0]
    parts = [r.get("device_name", r.get("device", "?")), f"batch {r.get('batch')}", f"T {r.get('T')}",
             f"{r.get('threads')} threads", f"torch {r.get('torch')}", f"commit {r.get('commit')}"]
    return " | ".join(str(p) for p in parts if p is not None)


def _label(r) -> str:
    graph = "+graph" if r.get("cuda_graph") else ""
    tags = [t for t in (r.get("precision") if r.get("precision", "fp32") != "fp32" else None,
                        "compile" if r.get("compile") else None) if t]
    tail = f"\n[{', '.join(tags)}]" if tags else ""
    if r["method"] != "dt":
        if r["method"] == "cnn":
            return r["method"] + graph + "\n(1 block, not\nequal work)" + tail
        return r["method"] + graph + ("\n(bank)" if r.get("execution") == "bank" else "\n(end to end)") + tail
    ex = r.get("execution_used") or r.get("execution")
    return f"DT {r['mode']}{graph}\n({ex}){tail}"


def _bars(ax, records, values, errs=None, ratios=None, unit="", fmt="{:.0f}"):
    labels = [_label(r) for r in records]
    colors = [COLORS.get(r["method"], "#555555") for r in records]
    xs = range(len(records))
    ax.bar(xs, values, color=colors, yerr=errs, capsize=4, edgecolor="black", linewidth=0.6,
           error_kw={"elinewidth": 1, "ecolor": "#333333"})
    top = max(v + (errs[1][i] if errs else 0) for i, v in enumerate(values)) if values else 1
    for i, v in enumerate(values):
        text = fmt.format(v) + unit
        if ratios is not None and ratios[i] is not None:
            text += f"\n×{ratios[i]:.2f}" + ("*" if records[i].get("ratio_unlike") else "")
        ax.text(i, v + (errs[1][i] if errs else 0) + top * 0.02, text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, top * 1.25)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def throughput(records, path: Path) -> Path:
    recs = _ok(records)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.15 * len(recs) + 1.5), 4.6))
    vals = [r["samples_per_s"] for r in recs]
    lo = [v - r.get("samples_per_s_min", v) for v, r in zip(vals, recs)]
    hi = [r.get("samples_per_s_max", v) - v for v, r in zip(vals, recs)]
    _bars(ax, recs, vals, errs=[lo, hi], ratios=[r.get("ratio_to_backprop") for r in recs])
    ax.set_ylabel("training samples / s (higher is better)")
    graphs = any((r.get("ratio_base") or "").startswith("backprop+graph") for r in recs)
    ax.set_title("Training throughput, equal work (T block updates per sample)\n"
                 "label: samples/s and ×throughput of backprop (median of side-by-side rounds"
                 + ("; +graph bars: × backprop+graph" if graphs else "")
                 + ("; ×…*: against backprop of another precision/compile/capture/stacking" if any(
                     r.get("ratio_unlike") for r in recs) else "") + "); whiskers: min-max", fontsize=9)
    fig.suptitle(_subtitle(recs), fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory(records, path: Path) -> Path:
    recs = _ok(records)
    cpu = recs[0].get("device") == "cpu"
    fig, axes = plt.subplots(2, 1, figsize=(max(6.5, 1.15 * len(recs) + 1.5), 8.6))
    if cpu and not recs[0].get("isolated", True):
        peak = [r["peak_mem_mb"] for r in recs]
        title = "Peak RSS of ONE shared process (MB): not per config\n(run without --no-isolate/--quick for per-config numbers)"
    elif cpu:
        peak = [r["peak_mem_mb"] - (r.get("rss_base_mb") or 0) for r in recs]
        title = "Peak process RSS above its baseline (MB)\n(fresh process per config; baseline = RSS before the model)"
    else:
        peak = [r["peak_mem_mb"] for r in recs]
        title = "Peak CUDA memory allocated (MB)\n(torch.cuda.max_memory_allocated, reset per config)"
    _bars(axes[0], recs, peak, ratios=[r.get("mem_ratio_to_backprop") for r in recs])
    axes[0].set_title(title + "; label ×backprop", fontsize=9)
    axes[0].set_ylabel("MB (lower is better)")
    metered = [r for r in recs if r.get("saved_mb") is not None]  # a graph replay runs no hooks: not metered
    saved = [r["saved_mb"] for r in metered]
    _bars(axes[1], metered, saved, ratios=[r.get("saved_ratio_to_backprop") for r in metered], fmt="{:.1f}")
    axes[1].set_title("Peak bytes saved for backward during one step (MB)\n"
                      "(saved_tensors_hooks; device-independent; label ×backprop)", fontsize=9)
    axes[1].set_ylabel("MB (lower is better)")
    fig.suptitle(_subtitle(recs), fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(json_path: Path, out_dir: Path | None = None) -> list[Path]:
    records = json.loads(Path(json_path).read_text())
    if not _ok(records):
        raise ValueError(f"{json_path}: no successful records to plot")
    out_dir = Path(out_dir) if out_dir else Path(json_path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(json_path).stem
    return [throughput(records, out_dir / f"{stem}_throughput.png"), memory(records, out_dir / f"{stem}_memory.png")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path, help="bench JSON files (noprop bench --json)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: next to each JSON)")
    args = p.parse_args(argv)
    failed = 0
    for path in args.json:  # one unreadable or empty file must not cost the others their plots
        try:
            pngs = plot_file(path, args.out)
        except (OSError, ValueError, KeyError) as exc:
            print(f"plots: {path}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
            failed = 1
            continue
        for png in pngs:
            print(f"wrote {png}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
