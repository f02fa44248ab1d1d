"""The margins of the two statistical RL tests on the committed base, for several seeds.

`tests/test_shapes_rl.py::test_nft_on_the_shapes_reward_raises_rollout_strict_accuracy_by_more_than_3_se`
runs the default recipe for 14 epochs on four training prompts with reward spread and asks the
rollouts' strict rate (first 3 vs last 3 epochs, 192 images each) to rise by more than 3 binomial
standard errors. The test runs one seed; this script runs the same command for each seed given
and prints the rise in standard errors, so a change of the base or the recipe can be checked
for margin, not only for a pass. With `--test jpeg` it does the same for
`test_short_rl_run_raises_training_reward_by_more_than_3_standard_errors` (Flow-GRPO, window
plan, 20 epochs, the dense jpeg_incompressibility reward on four prompts: the mean training
reward of the first epoch against the last 3 pooled).

    OMP_NUM_THREADS=1 python benchmarks/experiments/stat_test_margins.py WORK_DIR [--test jpeg] [SEED ...] [-- OVERRIDES]

Overrides after `--` are added to the test's command (to try a change before making it the test's).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import NO_EVAL  # noqa: E402
from tests.test_shapes_rl import (  # noqa: E402  (the tests' own prompts, arguments and measure)
    FOUR_WITH_SPREAD,
    JPEG_ARGS,
    JPEG_PROMPTS,
    jpeg_rise,
)


def run_test(work: Path, name: str, prompts: list[dict], args: list[str]) -> list[dict]:
    """`flowpo train` on the given prompts with a test's arguments; its metrics rows."""
    path = work / f"{name}_prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in prompts))
    subprocess.run(
        [sys.executable, "-m", "flowpo.cli", "train", f"--logging.run_dir={work}",
         f"--logging.run_name={name}", "--logging.wandb=off", f"--rollout.prompt_file={path}",
         *args],
        cwd=ROOT, check=True,
    )  # fmt: skip
    return [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]


def margin(work: Path, seed: int, extra: list[str]) -> tuple[list[float], float]:
    args = ["--rollout.batch_size=16", "--rollout.num_batches=4", "--train.epochs=14",
            "--eval.every=0", *NO_EVAL, f"--train.seed={seed}", *extra]  # fmt: skip
    rows = run_test(work, f"nft_seed{seed}", FOUR_WITH_SPREAD, args)
    strict = [r["reward/shapes/strict_mean"] for r in rows if "train/loss" in r]
    n = 3 * 64
    first, last = sum(strict[:3]) / 3, sum(strict[-3:]) / 3
    se = math.sqrt(first * (1 - first) / n + last * (1 - last) / n)
    return strict, (last - first) / se


def jpeg_margin(work: Path, seed: int, extra: list[str]) -> tuple[float, float]:
    args = [*JPEG_ARGS, *NO_EVAL, f"--train.seed={seed}", *extra]
    return jpeg_rise(run_test(work, f"jpeg_seed{seed}", JPEG_PROMPTS, args))


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    args = sys.argv[2:]
    extra = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    test = "nft"
    if args[:1] == ["--test"]:
        if len(args) < 2 or args[1] not in ("nft", "jpeg"):
            sys.exit("--test takes nft (the shapes-reward test, default) or jpeg")
        test, args = args[1], args[2:]
    seeds = [int(s) for s in args] or [0, 1, 2]
    for seed in seeds:
        if test == "jpeg":
            rise, se = jpeg_margin(work, seed, extra)
            print(f"seed {seed}: training reward rise {rise:.4f}, {rise / se:.1f} SE (bar 3)")
            continue
        strict, m = margin(work, seed, extra)
        first, last = sum(strict[:3]) / 3, sum(strict[-3:]) / 3
        print(f"seed {seed}: strict rate {first:.3f} -> {last:.3f}, rise {m:.1f} SE (bar 3)")


if __name__ == "__main__":
    main()
