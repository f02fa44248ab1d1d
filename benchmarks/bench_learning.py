"""Learning-speed benchmark: how fast does an RL recipe raise strict accuracy on training prompts
where the base already has reward spread?

    # 1. pick the training prompts whose base success rate (16 ODE seeds, CFG of the recipe)
    #    lies in [--low, --high]: a group of 8 then usually has both successes and failures
    python benchmarks/bench_learning.py select [--model shapes:base] [--seeds 16]

    # 2. one variant: `flowpo train` on those prompts for a fixed budget, evaluated on the same
    #    prompts with 16 seeds before and after; appends one row to the results CSV
    python benchmarks/bench_learning.py run NAME [--epochs 40] [-- --train.learning_rate=3e-4 ...]

    # 3. the table of every row so far (markdown), sorted by the rise in accuracy
    python benchmarks/bench_learning.py table

    # another base: its own prompt file and table (top-level options, before the subcommand)
    python benchmarks/bench_learning.py --prompts P.jsonl --csv T.csv select --model DIR

Each row: accuracy before and after with binomial standard errors (prompt-level samples are
independent seeds), the change in points, the training reward's mean over the first and the last
5 epochs (with their std over epochs) and its least-squares slope per epoch, the rollouts' strict
rate first vs last 5 epochs, the fraction of groups with zero reward spread, the epoch time and the
wall time. Results: benchmarks/results/learning_prompts.jsonl, learning_speed.csv.
Run it with OMP_NUM_THREADS=1 beside other jobs (the README says what ran beside what).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = RESULTS / "learning_prompts.jsonl"
CSV = RESULTS / "learning_speed.csv"
TAG_ORDER = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
DEFAULT_RECIPE = ROOT / "configs" / "shapes_nft.yaml"  # the default job (`flowpo train`)
FIELDS = [
    "name",
    "epochs",
    "overrides",
    "acc_before",
    "se_before",
    "acc_after",
    "se_after",
    "change_pt",
    "reward_first5",
    "reward_first5_std",
    "reward_last5",
    "reward_last5_std",
    "reward_slope",
    "strict_first5",
    "strict_last5",
    "zero_std_ratio",
    "epoch_s",
    "wall_s",
    "run_dir",
    "when",
]


def _flowpo(*args: str) -> None:
    """Run one flowpo command; if it fails, stop with its exit status (its own error, e.g. a
    config error naming the field, is already printed above) instead of a traceback."""
    cmd = [sys.executable, "-m", "flowpo.cli", *args]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc:
        sys.exit(f"bench_learning: `flowpo {args[0]}` failed (exit {rc}); see its message above")


def _seeds(n: int) -> str:
    return ",".join(str(s) for s in range(n))


def per_prompt_success(out_dir: Path) -> list[tuple[dict, float, int]]:
    """(metadata, strict success rate, samples) per prompt of a `flowpo eval --save-images`
    folder (GenEval's layout), re-scored with the shapes detector from the saved PNGs."""
    import numpy as np
    from PIL import Image

    from flowpo.tasks.shapes.detect import detect, score

    rows = []
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        pngs = sorted((folder / "samples").glob("*.png"))
        ok = [score(detect(np.asarray(Image.open(p).convert("RGB"))), meta)[0] for p in pngs]
        rows.append((meta, float(np.mean(ok)), len(ok)))
    return rows


def pick_stratified(rows: list[tuple[dict, float, int]], n: int, seed: int) -> list[dict]:
    """`n` prompts from `rows` (metadata, rate, samples), spread over the tags: the prompts of
    each tag in an order fixed by `seed`, then taken one tag at a time (tags in the world's
    order, `TAG_ORDER`) until `n` are picked. Rule fixed before any run, so the set is not
    chosen by how RL does on it."""
    import random

    by_tag: dict[str, list[dict]] = {}
    for m, _, _ in rows:
        by_tag.setdefault(m["tag"], []).append(m)
    rng = random.Random(seed)
    for t in sorted(by_tag):
        rng.shuffle(by_tag[t])
    order = [t for t in TAG_ORDER if t in by_tag] + sorted(set(by_tag) - set(TAG_ORDER))
    picked: list[dict] = []
    while len(picked) < n and any(by_tag[t] for t in order):
        for t in order:
            if by_tag[t] and len(picked) < n:
                picked.append(by_tag[t].pop(0))
    return picked


def cmd_select(args: argparse.Namespace) -> None:
    out = Path(args.work) / "select"
    if args.reuse and (out / "00000").is_dir():
        print(f"reusing the saved evaluation in {out}")
    else:
        _flowpo(
            "eval",
            "-c",
            str(args.recipe),
            "--model",
            args.model,
            "--out",
            str(out),
            "--save-images",
            "--eval.prompt_file=shapes:train",
            f"--eval.seeds={_seeds(args.seeds)}",
        )
    rows = per_prompt_success(out)
    inside = [r for r in rows if args.low <= r[1] <= args.high]
    picked = [m for m, _, _ in inside]
    if args.pick:
        picked = pick_stratified(inside, args.pick, args.pick_seed)
        rate = {m["prompt"]: p for m, p, _ in inside}
        for m in picked:
            print(f"  {m['tag']:<13} {rate[m['prompt']]:.3f}  {m['prompt']}")
    args.prompts.parent.mkdir(parents=True, exist_ok=True)
    args.prompts.write_text("".join(json.dumps(m) + "\n" for m in picked))
    tags: dict[str, int] = {}
    for m in picked:
        tags[m["tag"]] = tags.get(m["tag"], 0) + 1
    rates = [p for _, p, _ in rows]
    kept = f"; kept {len(picked)} (--pick, order seed {args.pick_seed})" if args.pick else ""
    print(
        f"{len(inside)} of {len(rows)} training prompts have a base success rate in "
        f"[{args.low}, {args.high}] ({args.seeds} seeds){kept}; per tag {tags}; mean rate over "
        f"all training prompts {sum(rates) / len(rates):.3f}. Wrote {args.prompts}"
    )


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))


def _slope(ys: list[float]) -> float:
    n = len(ys)
    xm, ym = (n - 1) / 2, sum(ys) / n
    den = sum((i - xm) ** 2 for i in range(n))
    return sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / den if den else 0.0


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def cmd_run(args: argparse.Namespace) -> None:
    if not args.prompts.is_file():
        sys.exit(f"no {args.prompts}: run `python benchmarks/bench_learning.py select` first")
    run_name = f"bench_{args.name}"
    run_dir = Path(args.work) / run_name
    t0 = time.time()
    _flowpo(
        "train",
        "-c",
        str(args.recipe),
        f"--rollout.prompt_file={args.prompts}",
        f"--eval.prompt_file={args.prompts}",
        "--eval.num_prompts=0",
        f"--eval.seeds={_seeds(args.seeds)}",
        f"--eval.every={10**6}",
        f"--train.epochs={args.epochs}",
        f"--logging.run_dir={args.work}",
        f"--logging.run_name={run_name}",
        "--logging.progress=false",
        "--logging.wandb=off",
        *args.overrides,
    )
    wall = time.time() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"reward_mean"' in line and '"epoch"' in line
    ]
    rewards = [e["reward_mean"] for e in epochs]
    strict_key = next((k for k in epochs[0] if k.endswith("/strict_mean")), None)
    strict = [e[strict_key] for e in epochs] if strict_key else [float("nan")] * len(epochs)
    k = min(5, len(epochs))
    b, a = summary["eval_start"], summary["eval_end"]
    ab, aa = b["accuracy"]["overall"], a["accuracy"]["overall"]
    n = b["counts"]["overall"]
    r1, r1s = _mean_std(rewards[:k])
    r2, r2s = _mean_std(rewards[-k:])
    row = {
        "name": args.name,
        "epochs": len(epochs),
        "overrides": " ".join([f"-c {Path(args.recipe).name}", *args.overrides]),
        # the benchmark's accuracy is over samples (all prompts pooled), not GenEval's tag mean
        "acc_before": round(_pooled(b), 4),
        "se_before": round(_se(_pooled(b), n), 4),
        "acc_after": round(_pooled(a), 4),
        "se_after": round(_se(_pooled(a), n), 4),
        "change_pt": round(100 * (_pooled(a) - _pooled(b)), 1),
        "reward_first5": round(r1, 4),
        "reward_first5_std": round(r1s, 4),
        "reward_last5": round(r2, 4),
        "reward_last5_std": round(r2s, 4),
        "reward_slope": round(_slope(rewards), 5),
        "strict_first5": round(sum(strict[:k]) / k, 4),
        "strict_last5": round(sum(strict[-k:]) / k, 4),
        "zero_std_ratio": round(sum(e.get("zero_std_ratio", 0.0) for e in epochs) / len(epochs), 3),
        "epoch_s": round(sum(e.get("time/epoch_s", 0.0) for e in epochs) / len(epochs), 2),
        "wall_s": round(wall, 1),
        "run_dir": str(run_dir),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    del ab, aa  # GenEval's tag mean is in summary.json; the benchmark pools samples
    new = not args.csv.is_file()
    with args.csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    print(json.dumps(row, indent=1))


def _pooled(ev: dict) -> float:
    """Strict accuracy over all samples (every tag weighted by its samples)."""
    tags = [t for t in ev["accuracy"] if t != "overall"]
    tot = sum(ev["counts"][t] for t in tags)
    return sum(ev["accuracy"][t] * ev["counts"][t] for t in tags) / tot


def cmd_table(args: argparse.Namespace) -> None:
    rows = list(csv.DictReader(args.csv.open()))
    rows.sort(key=lambda r: -float(r["change_pt"]))
    print(
        "| name | overrides | epochs | before | after | change | reward first5 -> last5 "
        "| slope/epoch | zero-spread groups | epoch s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | `{r['overrides']}` | {r['epochs']} | {float(r['acc_before']):.3f} "
            f"± {float(r['se_before']):.3f} | {float(r['acc_after']):.3f} ± "
            f"{float(r['se_after']):.3f} | {float(r['change_pt']):+.1f} pt | "
            f"{float(r['reward_first5']):.3f} ± {float(r['reward_first5_std']):.3f} -> "
            f"{float(r['reward_last5']):.3f} ± {float(r['reward_last5_std']):.3f} | "
            f"{float(r['reward_slope']):+.4f} | {float(r['zero_std_ratio']):.2f} | "
            f"{float(r['epoch_s']):.1f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default=os.environ.get("FLOWPO_BENCH_WORK", "runs/bench_learning"))
    p.add_argument(
        "--prompts",
        type=Path,
        default=PROMPTS,
        help="the selected prompts (written by select, read by run); another file for another base",
    )
    p.add_argument("--csv", type=Path, default=CSV, help="the results table run appends to")
    sub = p.add_subparsers(dest="cmd", required=True)
    recipe_help = "recipe (default: the default job's, configs/shapes_nft.yaml)"
    s = sub.add_parser("select")
    s.add_argument("--recipe", default=str(DEFAULT_RECIPE), help=recipe_help)
    s.add_argument("--model", default="shapes:base")
    s.add_argument("--seeds", type=int, default=16)
    s.add_argument("--low", type=float, default=0.15)
    s.add_argument("--high", type=float, default=0.7)
    s.add_argument("--pick", type=int, default=0, help="keep N prompts, spread over the tags")
    s.add_argument("--pick-seed", type=int, default=0, help="the fixed order --pick draws in")
    s.add_argument("--reuse", action="store_true", help="reuse WORK/select if it is there")
    r = sub.add_parser("run")
    r.add_argument("--recipe", default=str(DEFAULT_RECIPE), help=recipe_help)
    r.add_argument("name")
    r.add_argument("--epochs", type=int, default=40)
    r.add_argument("--seeds", type=int, default=16)
    sub.add_parser("table")
    # config overrides follow a `--` (argparse would take `--train.x=1` for an option of its own)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.overrides = argv[cut + 1 :]
    if args.overrides and args.cmd != "run":
        p.error(f"config overrides after -- are for `run`, not `{args.cmd}`")
    {"select": cmd_select, "run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
