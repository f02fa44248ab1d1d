"""Four RL algorithms on the shapes world, as held-out accuracy against training wall time.

    # the grid: Flow-GRPO (full plan, the shapes.yaml recipe), Flow-GRPO-Fast (window plan),
    # DiffusionNFT (shapes_nft.yaml, the default job) and AWM (shapes_awm.yaml), 3 seeds each;
    # finished runs are skipped, so it can be stopped and started again, or split over cores
    OMP_NUM_THREADS=1 python benchmarks/bench_algorithms.py run [--shard 0/2] [--only nft,awm]

    # CSV + PNG (mean over seeds with a band of +- 1 SE) and a summary table
    python benchmarks/bench_algorithms.py plot [--out benchmarks/results/algorithms]

    # every run's last checkpoint (and the base) evaluated both with CFG 1 and with CFG 3
    python benchmarks/bench_algorithms.py crosseval [--out benchmarks/results/algorithms]

    # the long grid (the learning issue's shapes_long): configs/shapes_long.yaml (DiffusionNFT)
    # against Flow-GRPO-Fast (window plan) and E-GRPO (entropy plan) of shapes_grpo_long.yaml,
    # 3 seeds each, all CFG-free on 527 held-out samples -> benchmarks/results/shapes_long.{csv,png}
    OMP_NUM_THREADS=1 python benchmarks/bench_algorithms.py --set long run [--shard 0/2]
    python benchmarks/bench_algorithms.py --set long plot
    python benchmarks/bench_algorithms.py --set long crosseval

Every run is `flowpo train` with its recipe as committed plus a shared evaluation: the held-out
prompts x 4 seeds (124 samples) at the start, every few epochs and at the end, without the
training-prompt evaluation. Each recipe samples and evaluates as it trains: the Flow-GRPO
recipes with CFG 3, the forward-process ones CFG-free, so their starting accuracies differ
(the same base scores higher with CFG 3 on this world). Wall time is the runs' own
`time/epoch_s` sum (sampling, reward, update), evaluations excluded; compare only runs made in
one sitting under the same load (docs/results.md says what ran beside what).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = "benchmarks/results/algorithms"
EVAL = ["--eval.seeds=0,1,2,3", "--eval.train_prompts=0", "--logging.progress=false"]
# name -> recipe and overrides (epochs as each recipe commits them; window: 40, where the
# fourth round measured that it matches the full plan's accuracy, docs/results.md)
ALGORITHMS: dict[str, list[str]] = {
    "nft": ["-c", "configs/shapes_nft.yaml", "--eval.every=5"],
    "awm": ["-c", "configs/shapes_awm.yaml", "--eval.every=5"],
    "grpo_window": [
        "-c",
        "configs/shapes.yaml",
        "--rollout.plan=window",
        "--train.epochs=40",
        "--eval.every=10",
    ],
    "grpo_full": ["-c", "configs/shapes.yaml", "--eval.every=10"],
}
# legend labels: each recipe's own evaluation samples as it trains (CFG 3 or CFG-free)
LABELS = {
    "nft": "DiffusionNFT (eval CFG 1)",
    "awm": "AWM (eval CFG 1)",
    "grpo_window": "Flow-GRPO-Fast window (eval CFG 3)",
    "grpo_full": "Flow-GRPO full (eval CFG 3)",
    "grpo_entropy": "E-GRPO entropy (eval CFG 3)",
    "nft_cfg3": "DiffusionNFT (eval CFG 3)",
}
OPTIONAL: dict[str, list[str]] = {
    # the nft runs again, evaluated with CFG 3 as the Flow-GRPO recipes sample (training is the
    # same: the evaluations draw from their own seeds)
    "nft_cfg3": ["-c", "configs/shapes_nft.yaml", "--eval.every=5", "--eval.guidance_scale=3"],
    "grpo_entropy": ["-c", "configs/shapes.yaml", "--rollout.plan=entropy", "--eval.every=10"],
}


# The long grid: each recipe for a budget of about 10 minutes of training on one core, with its
# own evaluation (the held-out prompts x 17 seeds = 527 samples, all CFG-free since the
# Flow-GRPO retune) and no training-prompt evaluation.
LONG: dict[str, list[str]] = {
    "nft_long": ["-c", "configs/shapes_long.yaml"],
    # Flow-GRPO retuned on the 4000-step base (CFG-free, the shapes_long reward, evaluation EMA,
    # lr 5e-4); until 2026-12-03 15:30 these two were configs/shapes.yaml (CFG 3, lr 1e-3) with
    # 60 epochs and --eval.every=20, which ended below the base (docs/results.md)
    "grpo_window_long": ["-c", "configs/shapes_grpo_long.yaml"],
    "grpo_entropy_long": ["-c", "configs/shapes_grpo_long.yaml", "--rollout.plan=entropy"],
}
LONG_EVAL = ["--eval.train_prompts=0", "--logging.progress=false"]
LABELS.update(
    {
        "nft_long": "DiffusionNFT shapes_long (eval CFG 1)",
        "grpo_window_long": "Flow-GRPO-Fast window (eval CFG 1)",
        "grpo_entropy_long": "E-GRPO entropy (eval CFG 1)",
    }
)


def recipes(args: argparse.Namespace) -> tuple[dict[str, list[str]], list[str]]:
    """The grid's recipes (name -> arguments) and the evaluation arguments shared by its runs."""
    if args.set == "long":
        return LONG, LONG_EVAL
    return {**ALGORITHMS, **OPTIONAL}, EVAL


def out_prefix(args: argparse.Namespace) -> str:
    """Where plot and crosseval write: --out, else the grid's own results name."""
    return args.out or ("benchmarks/results/shapes_long" if args.set == "long" else OUT)


def grid(seeds: list[int], only: list[str], known: dict | None = None) -> list[tuple[str, int]]:
    """(algorithm, seed) in seed-major order, so that a stopped grid has every algorithm."""
    known = known if known is not None else {**ALGORITHMS, **OPTIONAL}
    names = only or [n for n in known if n not in OPTIONAL]
    for n in names:
        if n not in known:
            sys.exit(f"--only: unknown algorithm {n!r}; known: {', '.join(known)}")
    return [(n, s) for s in seeds for n in names]


def cmd_run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    k, n = (int(x) for x in args.shard.split("/"))
    known, shared_eval = recipes(args)
    todo = grid(args.seeds, args.only, known)[k::n]
    for name, seed in todo:
        run = work / f"{name}_seed{seed}"
        if (run / "summary.json").is_file():
            print(f"= {run.name}: done", flush=True)
            continue
        if run.exists():  # an interrupted run: start it again (runs are short)
            shutil.rmtree(run)
        cmd = [
            sys.executable,
            "-m",
            "flowpo.cli",
            "train",
            *known[name],
            *shared_eval,
            f"--train.seed={seed}",
            f"--logging.run_dir={work}",
            f"--logging.run_name={run.name}",
        ]
        print("+", " ".join(cmd), flush=True)
        with open(work / f"{run.name}.log", "w") as log:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def cmd_plot(args: argparse.Namespace) -> None:
    work = Path(args.work)
    runs, labels = [], []
    for name in recipes(args)[0]:
        for seed in args.seeds:
            run = work / f"{name}_seed{seed}"
            if (run / "summary.json").is_file():
                runs.append(str(run))
                labels.append(LABELS[name])
    if not runs:
        sys.exit(f"no finished runs under {work}: run `bench_algorithms.py run` first")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plot_shapes_runs import main as plot

    plot([*runs, "--out", out_prefix(args), "--labels", ",".join(labels), "--gain"])


def cmd_crosseval(args: argparse.Namespace) -> None:
    """Each finished run's last checkpoint evaluated at CFG 1 and at CFG 3 (held-out prompts x
    8 seeds), the weights its own evaluations used (the EMA where the run kept one): the
    Flow-GRPO recipes sample with CFG 3 and the forward-process ones without, so their own
    curves start from different accuracies of the same base."""
    import json

    work = Path(args.work)
    rows = []
    names = list(LONG) if args.set == "long" else [*ALGORITHMS, "grpo_entropy"]
    for name in names:
        for seed in args.seeds:
            run = work / f"{name}_seed{seed}"
            if not (run / "summary.json").is_file():
                continue
            ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
            ema = ["--ema"] if (ckpt / "trainable_ema.safetensors").is_file() else []
            for cfg_scale in (1.0, 3.0):
                out = work / "crosseval" / f"{run.name}_cfg{cfg_scale:g}"
                if not (out / "eval.json").is_file():
                    cmd = [sys.executable, "-m", "flowpo.cli", "eval", "--checkpoint", str(ckpt)]
                    cmd += [*ema, "--out", str(out), f"--sampling.guidance_scale={cfg_scale}"]
                    cmd += ["--eval.seeds=0,1,2,3,4,5,6,7", "--eval.num_prompts=0"]
                    print("+", " ".join(cmd), flush=True)
                    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                res = json.loads((out / "eval.json").read_text())
                rows.append((name, seed, cfg_scale, res["eval/acc/overall"], res["num_samples"]))
    base = {}
    for cfg_scale in (1.0, 3.0):
        out = work / "crosseval" / f"base_cfg{cfg_scale:g}"
        if not (out / "eval.json").is_file():
            cmd = [sys.executable, "-m", "flowpo.cli", "eval", "--out", str(out)]
            cmd += [f"--sampling.guidance_scale={cfg_scale}", "--eval.seeds=0,1,2,3,4,5,6,7"]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        base[cfg_scale] = json.loads((out / "eval.json").read_text())["eval/acc/overall"]
    path = Path(out_prefix(args) + "_crosseval.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("algorithm,seed,guidance_scale,overall,samples\n")
        for cfg_scale, acc in base.items():
            f.write(f"base,,{cfg_scale},{acc:.4f},248\n")
        for r in rows:
            f.write(f"{r[0]},{r[1]},{r[2]},{r[3]:.4f},{r[4]}\n")
    print(f"base: CFG 1 {base[1.0]:.3f}, CFG 3 {base[3.0]:.3f}")
    print(f"{'algorithm':<14} {'CFG 1 (mean ± SE over seeds)':>30} {'CFG 3':>20}")
    for name in dict.fromkeys(r[0] for r in rows):
        cells = []
        for cfg_scale in (1.0, 3.0):
            v = [r[3] for r in rows if r[0] == name and r[2] == cfg_scale]
            m = sum(v) / len(v)
            se = (sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v)) ** 0.5 if len(v) > 1 else 0
            cells.append(f"{m:.3f} ± {se:.3f} (n={len(v)})")
        print(f"{name:<14} {cells[0]:>30} {cells[1]:>20}")
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default=os.environ.get("FLOWPO_BENCH_WORK", "runs/bench_algorithms"))
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--set", choices=("four", "long"), default="four", help="which grid")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--shard", default="0/1", help="i/n: run every n-th grid entry from the i-th")
    r.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=[])
    q = sub.add_parser("plot")
    q.add_argument("--out", default="", help=f"default {OUT}, or benchmarks/results/shapes_long")
    c = sub.add_parser("crosseval")
    c.add_argument("--out", default="", help=f"default {OUT}, or benchmarks/results/shapes_long")
    args = p.parse_args()
    {"run": cmd_run, "plot": cmd_plot, "crosseval": cmd_crosseval}[args.cmd](args)


if __name__ == "__main__":
    main()
