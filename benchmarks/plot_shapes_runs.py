"""Held-out strict accuracy of shapes-world runs against their training wall time.

    python benchmarks/plot_shapes_runs.py runs/NAME1 runs/NAME2 ... [--out benchmarks/results/shapes_long]

Reads each run's `metrics.jsonl` (written by `flowpo train`), puts every evaluation at the
cumulative wall time of the epochs before it (`time/epoch_s`: sampling, reward and training;
the evaluations themselves are left out, so runs with different `eval.every` compare fairly),
and writes OUT.csv (run, epoch, wall seconds, eval reward, overall and per-tag accuracy) and
OUT.png (overall accuracy against minutes). Runs given the same label (seeds of one recipe:
`--labels grpo,grpo,grpo,nft,nft,nft`) are drawn as one line, the mean over runs at each
evaluation epoch, with a band of ± one standard error over runs, at the mean wall time; the
summary table (OUT_summary.csv) gives each label's mean ± SE start and end accuracy. It prints
the tables too.
Nothing is timed here: the times are what the runs measured; compare only runs made under the
same load (docs/results.md says which ran side by side).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from flowpo.tasks.shapes.world import TAGS


def load_run(run_dir: Path) -> list[dict]:
    """One row per evaluation: epoch, cumulative training wall seconds, reward, accuracies."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (pass run directories written by `flowpo train`)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elapsed: dict[int, float] = {}  # epoch -> wall seconds after that epoch
    total = 0.0
    for r in rows:
        if "time/epoch_s" in r:
            total += float(r["time/epoch_s"])
            elapsed[int(r["epoch"])] = total
    out = []
    for r in rows:
        if "eval/acc/overall" not in r:
            continue
        epoch = int(r["epoch"])
        # the start evaluation is logged as epoch 0 before any training epoch: 0 seconds
        first = not out
        out.append(
            {
                "run": run_dir.name,
                "epoch": epoch,
                "wall_s": 0.0 if first else elapsed.get(epoch, total),
                "eval_reward": r.get("eval/reward_mean"),
                "overall": r["eval/acc/overall"],
                **{t: r.get(f"eval/acc/{t}") for t in TAGS},
            }
        )
    if not out:
        raise SystemExit(f"{path}: no evaluations with per-tag accuracy (shapes eval prompts?)")
    return out


def _se(vals: list[float]) -> float:
    """Standard error of the mean over runs (0 for a single run)."""
    n = len(vals)
    if n < 2:
        return 0.0
    m = sum(vals) / n
    return (sum((v - m) ** 2 for v in vals) / (n - 1) / n) ** 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default="benchmarks/results/shapes_long")
    ap.add_argument("--labels", default="", help="comma-separated legend labels, one per run")
    ap.add_argument(
        "--gain", action="store_true", help="a second panel: change from each run's start"
    )
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [p.name for p in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    table = []
    for run, label in zip(args.runs, labels):
        for row in load_run(run):
            table.append({**row, "run": label, "run_dir": str(run)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    wr = max(24, *(len(r["run"]) for r in table))
    print(f"{'run':<{wr}} {'epoch':>5} {'minutes':>8} {'reward':>7} {'overall':>8}")
    for r in table:
        print(
            f"{r['run']:<{wr}} {r['epoch']:>5} {r['wall_s'] / 60:>8.1f} "
            f"{r['eval_reward']:>7.3f} {r['overall']:>8.3f}"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(dict.fromkeys(labels))  # first-seen order
    n_labels = len(order)
    if args.gain:  # left: accuracy as each run evaluates it; right: change from its start
        fig, (ax, ax_gain) = plt.subplots(1, 2, figsize=(12, 4.2))
    else:  # many runs: wider, the legend beside the axes (below)
        fig, ax = plt.subplots(figsize=(6.5 if n_labels <= 6 else 10, 4))
        ax_gain = None
    if n_labels > 10:  # the default cycle repeats after ten colours
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    summary = []
    for label in order:
        runs = [r for r in dict.fromkeys(x["run_dir"] for x in table if x["run"] == label)]
        per_run = [[r for r in table if r["run_dir"] == d] for d in runs]
        n_eval = min(len(rows) for rows in per_run)  # evaluations every run of the label has
        xs, mean, se = [], [], []
        for i in range(n_eval):
            vals = [rows[i]["overall"] for rows in per_run]
            xs.append(sum(rows[i]["wall_s"] for rows in per_run) / len(per_run) / 60)
            mean.append(sum(vals) / len(vals))
            se.append(_se(vals))
        (line,) = ax.plot(xs, mean, "o-", label=f"{label} (n={len(per_run)})")
        if len(per_run) > 1:
            lo = [m - e for m, e in zip(mean, se)]
            hi = [m + e for m, e in zip(mean, se)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        if ax_gain is not None:
            gains = [
                [100 * (rows[i]["overall"] - rows[0]["overall"]) for rows in per_run]
                for i in range(n_eval)
            ]
            g_mean = [sum(g) / len(g) for g in gains]
            g_se = [_se(g) for g in gains]
            ax_gain.plot(xs, g_mean, "o-", color=line.get_color(), label=label)
            if len(per_run) > 1:
                ax_gain.fill_between(
                    xs,
                    [m - e for m, e in zip(g_mean, g_se)],
                    [m + e for m, e in zip(g_mean, g_se)],
                    color=line.get_color(),
                    alpha=0.2,
                )
        summary.append(
            {
                "label": label,
                "runs": len(per_run),
                "start": round(mean[0], 4),
                "start_se": round(se[0], 4),
                "end": round(mean[-1], 4),
                "end_se": round(se[-1], 4),
                "change_pt": round(100 * (mean[-1] - mean[0]), 1),
                "end_minutes": round(xs[-1], 2),
            }
        )
    with open(out.parent / (out.name + "_summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    w = max(20, *(len(r["label"]) for r in summary))
    print(f"\n{'label':<{w}} {'runs':>4} {'start':>14} {'end':>14} {'change':>8} {'minutes':>8}")
    for r in summary:
        print(
            f"{r['label']:<{w}} {r['runs']:>4} {r['start']:>7.3f} ± {r['start_se']:.3f} "
            f"{r['end']:>7.3f} ± {r['end_se']:.3f} {r['change_pt']:>+7.1f} {r['end_minutes']:>8.1f}"
        )
    ax.set_xlabel("training wall time, minutes (evaluations excluded)")
    ax.set_ylabel("held-out strict accuracy (overall)")
    ax.set_title("shapes world: accuracy vs wall time (bands: ± 1 SE over seeds)")
    ax.grid(alpha=0.3)
    if ax_gain is None and n_labels > 6:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    else:
        ax.legend()
    if ax_gain is not None:
        ax.set_title("accuracy as each recipe evaluates it (bands: ± 1 SE over seeds)")
        ax_gain.set_xlabel("training wall time, minutes (evaluations excluded)")
        ax_gain.set_ylabel("change from the run's start, points")
        ax_gain.set_title("gain over the start evaluation")
        ax_gain.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
