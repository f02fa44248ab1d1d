"""Held-out strict accuracy of shapes-world runs against their training wall time.

    python benchmarks/plot_shapes_runs.py runs/NAME1 runs/NAME2 ... [--out benchmarks/results/shapes_long]

Reads each run's `metrics.jsonl` (written by `flowpo train`), puts every evaluation at the
cumulative wall time of the epochs before it (`time/epoch_s`: sampling, reward and training;
the evaluations themselves are left out, so runs with different `eval.every` compare fairly),
and writes OUT.csv (run, epoch, wall seconds, eval reward, overall and per-tag accuracy) and
OUT.png (overall accuracy against minutes, one line per run). It prints the table too.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default="benchmarks/results/shapes_long")
    ap.add_argument("--labels", default="", help="comma-separated legend labels, one per run")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [p.name for p in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    table = []
    for run, label in zip(args.runs, labels):
        for row in load_run(run):
            table.append({**row, "run": label})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print(f"{'run':<24} {'epoch':>5} {'minutes':>8} {'reward':>7} {'overall':>8}")
    for r in table:
        print(
            f"{r['run']:<24} {r['epoch']:>5} {r['wall_s'] / 60:>8.1f} "
            f"{r['eval_reward']:>7.3f} {r['overall']:>8.3f}"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label in labels:
        rows = [r for r in table if r["run"] == label]
        ax.plot([r["wall_s"] / 60 for r in rows], [r["overall"] for r in rows], "o-", label=label)
    ax.set_xlabel("training wall time, minutes (evaluations excluded)")
    ax.set_ylabel("held-out strict accuracy (overall)")
    ax.set_title("shapes world: accuracy vs wall time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
