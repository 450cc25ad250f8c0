"""Test accuracy against training wall time (paper Fig. 3 style), one curve per run.

    noprop train --method dt --metrics runs/dt.jsonl ...        (one JSON object per epoch:
    noprop train --method backprop --metrics runs/bp.jsonl ...   epoch, test_acc, elapsed_s, ...)
    python bench/accuracy_vs_time.py runs/*.jsonl --out bench/results/accuracy_vs_time.png

elapsed_s counts training time only (evaluation excluded), as `fit` records it. Each curve starts
at (0, chance) when --chance is given. A table of final accuracy, best accuracy, total time and
the time each run first reached each --targets accuracy is printed (and written next to the PNG
as .csv).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"dt": ("#3b7dd8", "-"), "backprop": ("#d9534f", "--"), "cnn": ("#7f7f7f", ":"),
         "ct": ("#2ca02c", "-."), "fm": ("#9467bd", "-.")}


def read_run(path: Path) -> list[dict]:
    """The epoch records of one --metrics JSONL file, sorted by epoch (blank lines skipped)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        for key in ("test_acc", "elapsed_s"):
            if key not in row:
                raise ValueError(f"{path}:{n}: record has no {key!r} (written by noprop train --metrics?)")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no records")
    return sorted(rows, key=lambda r: r.get("epoch", 0))


def run_label(path: Path, rows: list[dict]) -> str:
    r = rows[0]
    method = r.get("method")
    if method is None:
        return Path(path).stem
    if method == "dt":
        return f"NoProp-DT {r.get('mode', r.get('schedule', ''))}".strip()
    return {"backprop": "backprop (same blocks)", "cnn": "backprop CNN", "ct": "NoProp-CT",
            "fm": "NoProp-FM"}.get(method, method)


def time_to(rows, target):
    return next((r["elapsed_s"] for r in rows if r["test_acc"] >= target), None)


def plot(paths, out: Path, labels=None, title=None, chance=None, targets=(0.9, 0.95, 0.97), logx=False) -> list[dict]:
    runs = [(Path(p), read_run(p)) for p in paths]
    labels = labels or [run_label(p, rows) for p, rows in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    seen = {}
    for i, lab in enumerate(labels):  # disambiguate repeated labels by file name
        if labels.count(lab) > 1:
            labels[i] = f"{lab} [{runs[i][0].stem}]"
        seen[lab] = True
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    summary = []
    used: dict = {}  # method -> curves drawn: a second run of a method gets a lighter, dashed line
    for (path, rows), lab in zip(runs, labels):
        method = rows[0].get("method")
        color, ls = STYLE.get(method, (None, "-"))
        repeat = used.get(method, 0)
        used[method] = repeat + 1
        if repeat and color is not None:
            color, ls = matplotlib.colors.to_rgba(color, alpha=max(0.35, 1 - 0.3 * repeat)), (":" if ls == "-" else "-")
        xs = [r["elapsed_s"] for r in rows]
        ys = [100 * r["test_acc"] for r in rows]
        if chance is not None:
            xs, ys = [0.0] + xs, [100 * chance] + ys
        ax.plot(xs, ys, ls, marker="o", markersize=3, color=color, label=lab)
        row = {"run": lab, "file": str(path), "epochs": len(rows), "final_acc": rows[-1]["test_acc"],
               "best_acc": max(r["test_acc"] for r in rows), "total_s": rows[-1]["elapsed_s"]}
        for t in targets:
            row[f"s_to_{t:g}"] = time_to(rows, t)
        summary.append(row)
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Test accuracy against training time", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", type=Path, help="JSONL files from noprop train --metrics")
    p.add_argument("--out", type=Path, default=Path("bench/results/accuracy_vs_time.png"), help="output PNG")
    p.add_argument("--labels", default=None, help="comma-separated curve labels (default: from method/mode)")
    p.add_argument("--title", default=None, help="plot title")
    p.add_argument("--chance", type=float, default=None, help="start each curve at (0 s, this accuracy), e.g. 0.1")
    p.add_argument("--targets", default="0.9,0.95,0.97", help="accuracies to report the time-to of")
    p.add_argument("--logx", action="store_true", help="log-scale time axis")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    targets = tuple(float(t) for t in args.targets.split(",") if t)
    try:
        summary = plot(args.metrics, args.out, labels, args.title, args.chance, targets, args.logx)
    except (OSError, ValueError) as exc:
        print(f"accuracy_vs_time: error: {exc}", file=sys.stderr)
        return 2
    cols = ["run", "epochs", "final_acc", "best_acc", "total_s"] + [f"s_to_{t:g}" for t in targets]
    print("  ".join(f"{c:>24}" if i == 0 else f"{c:>10}" for i, c in enumerate(cols)))
    for row in summary:
        cells = []
        for i, c in enumerate(cols):
            v = row[c]
            cells.append(f"{v:>24}" if i == 0 else f"{'-' if v is None else (f'{v:.4f}' if 'acc' in c else f'{v:.0f}' if isinstance(v, float) else v):>10}")
        print("  ".join(cells))
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
