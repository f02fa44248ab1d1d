"""engine.compile on this machine: epoch time with and without regional compilation, and the
compile time, side by side in one invocation.

    python benchmarks/bench_compile.py                 # tiny SD3 recipe, 2 off/on pairs, 5 epochs
    python benchmarks/bench_compile.py --cache warm    # inductor's default on-disk cache
    python benchmarks/bench_compile.py --epochs 3 --sampling.num_steps=4   # + recipe overrides
    python benchmarks/bench_compile.py --recipe configs/shapes.yaml --epochs 4 --pairs 1 \
        --out benchmarks/results/compile_shapes.json          # the shapes default job's recipe

Each setting is a `python -m flowpo train -c RECIPE` (default configs/tiny_sd3_jpeg.yaml) run in its own process
(LoRA, ZeRO-0, fp32; no evaluation, no checkpoints), alternating compile off and on, `--pairs`
times, so both see the same load. Epoch time, wall (`time/epoch_s`) and CPU (the process's and
its finished children's CPU seconds, read from /proc at each epoch's metrics row: on a shared
machine the one to compare): the median of epochs 1.. (epoch 0 pays the first calls and,
compiled, the compilation), median over the runs. Compile time of a
compiled run: how much longer its epoch 0 takes than its steady epochs, minus the same for the
eager runs (first-call costs both pay). `--cache cold` (default) gives the invocation one empty
inductor cache (TORCHINDUCTOR_CACHE_DIR): the first compiled run compiles from scratch, the later
ones find its kernels on disk, so the runs show both costs; `warm` uses torch's default cache.
The first ratio of each run is reported (exactly 1 expected with and without compile).

Writes benchmarks/results/compile.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "compile.json"
RECIPE = "configs/tiny_sd3_jpeg.yaml"


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its finished children (g++ under inductor), from
    /proc/PID/stat: utime + stime + cutime + cstime."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run(
    compile_on: bool,
    epochs: int,
    threads: int,
    cache: str | None,
    extra: list[str],
    recipe: str = RECIPE,
) -> dict:
    """One training run in a fresh process (inductor cache `cache`, None = torch's default);
    its per-epoch wall and CPU times, metrics and first ratios. CPU seconds per epoch are read
    from /proc whenever metrics.jsonl gains a row (polled every 50 ms): on a shared machine
    they move much less with the other jobs than wall time does."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
        env["HF_HUB_OFFLINE"] = "1"
        if cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        # compile in this process (no worker pool): its g++ children count in its CPU time
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        name = "on" if compile_on else "off"
        cmd = [
            sys.executable,
            "-m",
            "flowpo",
            "train",
            "-c",
            recipe,
            f"--train.epochs={epochs}",
            f"--engine.compile={str(compile_on).lower()}",
            "--eval.at_start=false",
            "--eval.at_end=false",
            "--eval.every=0",
            "--logging.wandb=off",
            "--logging.progress=false",
            f"--logging.run_dir={tmp}",
            f"--logging.run_name={name}",
            *extra,
        ]
        metrics = Path(tmp) / name / "metrics.jsonl"
        with open(Path(tmp) / "log.txt", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
            cpu_marks = [cpu_seconds(proc.pid)]  # at start; then at each epoch's row
            while proc.poll() is None:
                rows = metrics.read_text().count("\n") if metrics.is_file() else 0
                if rows >= len(cpu_marks):
                    cpu_marks.append(cpu_seconds(proc.pid))
                time.sleep(0.05)
        if proc.returncode:
            raise SystemExit(
                f"run failed ({' '.join(cmd)}):\n{(Path(tmp) / 'log.txt').read_text()[-3000:]}"
            )
        rows = [json.loads(x) for x in metrics.read_text().split("\n") if x]
        rows = [r for r in rows if "time/epoch_s" in r]
    epoch_s = [r["time/epoch_s"] for r in rows]
    return {
        "compile": compile_on,
        "epoch_s": epoch_s,
        # epoch 0's CPU time includes the process start (imports, model, DeepSpeed)
        "epoch_cpu_s": [b - a for a, b in zip(cpu_marks, cpu_marks[1:])],
        "sample_s": [r["time/sample_s"] for r in rows],
        "train_s": [r["time/train_s"] for r in rows],
        "first_ratio_max_dev": [r.get("train/first_ratio_max_dev") for r in rows],
        "loss": [r["train/loss"] for r in rows],
    }


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("epoch_s", "epoch_cpu_s"):
        steady = [statistics.median(r[key][1:]) for r in runs]
        out[f"steady_{key}"] = statistics.median(steady)
        out[f"epoch0_extra_{key}"] = [r[key][0] - s for r, s in zip(runs, steady)]
    out["steady_sample_s"] = statistics.median(statistics.median(r["sample_s"][1:]) for r in runs)
    out["steady_train_s"] = statistics.median(statistics.median(r["train_s"][1:]) for r in runs)
    devs = [d for r in runs for d in r["first_ratio_max_dev"] if d is not None]
    out["max_first_ratio_dev"] = max(devs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=RECIPE, help="the recipe trained (path from the root)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (>= 2)")
    p.add_argument("--pairs", type=int, default=2, help="off/on run pairs, alternating")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold", help="inductor cache")
    p.add_argument("--out", default=str(RESULT), help="results JSON ('' = do not write)")
    args, args.extra = p.parse_known_args(argv)  # the rest: --section.field=value overrides
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (epoch 0 holds the compilation)")
    load_start = os.getloadavg()
    runs = {False: [], True: []}
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = str(Path(cache_dir) / "inductor") if args.cache == "cold" else None
        for _ in range(args.pairs):
            for on in (False, True):
                runs[on].append(run(on, args.epochs, args.threads, cache, args.extra, args.recipe))
                last = runs[on][-1]
                print(f"compile {'on ' if on else 'off'}: epochs (wall / CPU s) " + ", ".join(
                    f"{w:.1f}/{c:.1f}" for w, c in zip(last["epoch_s"], last["epoch_cpu_s"])),
                    flush=True)  # fmt: skip
    off, on = summary(runs[False]), summary(runs[True])
    # compile time: a compiled run's epoch-0 excess over its steady epochs, less the eager runs'
    compile_s = {
        key: [x - statistics.median(off[f"epoch0_extra_{key}"]) for x in on[f"epoch0_extra_{key}"]]
        for key in ("epoch_s", "epoch_cpu_s")
    }
    result = {
        "recipe": args.recipe,
        "overrides": args.extra,
        "epochs": args.epochs,
        "pairs": args.pairs,
        "threads": args.threads,
        "inductor_cache": (
            "cold: one empty cache for the invocation (run 1 compiles, later runs reuse it)"
            if args.cache == "cold"
            else "warm: torch's default cache"
        ),
        "eager": off,
        "compiled": on,
        "speedup_steady_epoch_wall": off["steady_epoch_s"] / on["steady_epoch_s"],
        "speedup_steady_epoch_cpu": off["steady_epoch_cpu_s"] / on["steady_epoch_cpu_s"],
        "compile_wall_s_per_compiled_run": compile_s["epoch_s"],
        "compile_cpu_s_per_compiled_run": compile_s["epoch_cpu_s"],
        "runs": runs[False] + runs[True],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    import torch

    result["torch"] = torch.__version__
    result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    result["load_average_at_start"], result["load_average_at_end"] = load_start, os.getloadavg()
    print(
        f"{'':10s} {'epoch s':>9s} {'epoch cpu s':>12s} {'sample s':>9s} {'train s':>9s} {'ratio dev':>10s}"
    )
    for label, m in (("eager", off), ("compiled", on)):
        print(
            f"{label:10s} {m['steady_epoch_s']:9.3f} {m['steady_epoch_cpu_s']:12.3f} "
            f"{m['steady_sample_s']:9.3f} {m['steady_train_s']:9.3f} {m['max_first_ratio_dev']:10.2e}"
        )
    print(
        f"steady epoch speed-up: wall {result['speedup_steady_epoch_wall']:.2f}x, CPU "
        f"{result['speedup_steady_epoch_cpu']:.2f}x; compile time per compiled run: wall "
        + ", ".join(f"{c:.0f}" for c in compile_s["epoch_s"])
        + " s, CPU "
        + ", ".join(f"{c:.0f}" for c in compile_s["epoch_cpu_s"])
        + f" s ({args.cache} cache)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
