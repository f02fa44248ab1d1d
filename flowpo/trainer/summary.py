"""The end of a run: summary.json, the reward and accuracy curves, and the printed summary
(evaluation before -> after, first -> last training reward, per-tag accuracy table)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from flowpo.trainer.evaluation import EvalResult, accuracy_table, drawing_table
from flowpo.trainer.tracking import METRICS_FILE, plot_curves, print0


def eval_numbers(res: EvalResult) -> dict:
    """The JSON-able numbers of an evaluation (kept in the trainer state for resume)."""
    return res.numbers()


def reward_trend(per_epoch: list, k: int = 5) -> dict:
    """The training reward's trend over a run: the mean (and the std over epochs) of the
    per-epoch reward means over the first k and the last k epochs, k = min(k, epochs // 2) so
    the two windows never overlap; empty for a run of fewer than 2 epochs. per_epoch: (mean,
    std) per epoch, as the trainer's history keeps them."""
    k = min(k, len(per_epoch) // 2)
    if k < 1:
        return {}

    def mean_std(xs: list[float]) -> tuple[float, float]:
        return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0

    means = [float(e[0]) for e in per_epoch]
    f, fs = mean_std(means[:k])
    last, ls = mean_std(means[-k:])
    return {
        "train_reward_trend_k": k,
        "train_reward_first_k": f,
        "train_reward_first_k_std": fs,
        "train_reward_last_k": last,
        "train_reward_last_k_std": ls,
    }


def reward_decline(per_epoch: list, k: int = 5, threshold: float = 4.0) -> dict | None:
    """Whether the training reward has fallen from its best: the mean of the last k per-epoch
    reward means against the best mean of any earlier k consecutive epochs (not overlapping the
    last k), in standard errors of their difference (each window's std over its epochs / sqrt
    k). Returns {best_first_epoch, best, last, drop_se} when the drop exceeds `threshold` SE,
    else None (also for runs shorter than 2k epochs). per_epoch: (mean, std) per epoch.

    A policy that unlearns its task shows here before its evaluations do (they use the EMA
    weights and come every eval.every epochs): on the shapes world, 120 epochs of the long
    recipe lose their drawing after the reward's peak near epoch 20 (docs/results.md, "The
    binding base"). The best window is the maximum over many, so its SE understates the
    chance of a false alarm; hence 4 SE by default (on the runs of that section it flags the
    long recipe's declines and none of the default job's runs)."""
    means = [float(e[0]) for e in per_epoch]
    if k < 2 or len(means) < 2 * k:
        return None

    def window(i: int) -> tuple[float, float]:
        xs = means[i : i + k]
        return statistics.fmean(xs), statistics.stdev(xs)

    last, last_sd = window(len(means) - k)
    earlier = [window(i) for i in range(len(means) - 2 * k + 1)]
    best_i = max(range(len(earlier)), key=lambda i: earlier[i][0])
    best, best_sd = earlier[best_i]
    se = ((best_sd**2 + last_sd**2) / k) ** 0.5
    drop = best - last
    if drop <= 0 or drop <= threshold * max(se, 1e-12):
        return None
    return {"best_first_epoch": best_i, "best": best, "last": last, "drop_se": drop / se}


def finish_run(
    run_dir: Path,
    history: dict,
    end: EvalResult | None,
    seconds: float,
    *,
    reward_names: list[str],
    rank: int,
    rollouts: str = "SDE rollouts",
) -> dict:
    """The run's summary from its history (eval_start, eval_end, train_reward per epoch); rank 0
    also writes summary.json and the curves under run_dir and prints it. A run without a start
    or end evaluation (eval.at_start / eval.at_end false; `end` is None) has no such entry and
    prints no reward or accuracy comparison. rollouts: how the training images were sampled,
    for the printed training-reward line (the algorithm's `rollouts`)."""
    h = history
    start = h.get("eval_start")
    summary = {k: h[k] for k in ("eval_start", "eval_end") if k in h}
    summary["seconds"] = seconds
    if h.get("train_reward"):
        summary["train_reward_first"], summary["train_reward_first_std"] = h["train_reward"][0]
        summary["train_reward_last"], summary["train_reward_last_std"] = h["train_reward"][-1]
        summary.update(reward_trend(h["train_reward"]))
    if rank != 0:
        return summary
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        plot_curves(
            metrics,
            run_dir / "reward_curve.png",
            [("reward_mean", "reward_std"), ("eval/reward_mean", None)],
            title=f"reward ({', '.join(reward_names)})",
        )
        if end is not None and end.accuracy:
            tags = [k for k in end.accuracy if k != "overall"]
            keys = [("eval/acc/overall", "eval/acc_se/overall")]
            keys += [("eval_train/acc/overall", "eval_train/acc_se/overall")]
            keys += [(f"eval/acc/{k}", None) for k in tags]
            labels = {f"eval/acc/{k}": k for k in tags}
            labels["eval/acc/overall"] = "held-out overall (± SE)"
            labels["eval_train/acc/overall"] = "training prompts overall (± SE)"
            plot_curves(
                metrics,
                run_dir / "accuracy_curve.png",
                keys,
                title="strict accuracy (ODE, fixed seeds); tags held-out",
                labels=labels,
                bold=("eval/acc/overall",),
            )
    print0("\n== summary ==", rank=0)
    before = f"start {start['reward_mean']:.4f} ± {start['reward_std']:.4f}" if start else ""
    after = f"end {end.reward_mean:.4f} ± {end.reward_std:.4f}" if end is not None else ""
    if before or after:
        print0(
            f"eval reward (ODE, fixed seeds): {' -> '.join(filter(None, (before, after)))}", rank=0
        )
    if "train_reward_first" in summary:
        print0(
            f"train reward ({rollouts}): first epoch {summary['train_reward_first']:.4f} ± "
            f"{summary['train_reward_first_std']:.4f} -> last epoch "
            f"{summary['train_reward_last']:.4f} ± {summary['train_reward_last_std']:.4f}",
            rank=0,
        )
    if "train_reward_trend_k" in summary:
        k = summary["train_reward_trend_k"]
        print0(
            f"train reward, mean over the first {k} vs the last {k} epochs (± std over those "
            f"epochs): {summary['train_reward_first_k']:.4f} ± "
            f"{summary['train_reward_first_k_std']:.4f} -> {summary['train_reward_last_k']:.4f} ± "
            f"{summary['train_reward_last_k_std']:.4f}",
            rank=0,
        )
    if start is not None and end is not None and end.accuracy:
        before = EvalResult.from_numbers(start)
        print0(f"strict accuracy per tag ({end.num_samples} samples):", rank=0)
        print0(accuracy_table(before, end), rank=0)
        if end.train is not None and before.train is not None and end.train.accuracy:
            print0(
                f"training prompts, strict accuracy per tag ({end.train.num_samples} samples):",
                rank=0,
            )
            print0(accuracy_table(before.train, end.train), rank=0)
        if drawing := drawing_table(start, end):
            print0("drawing statistics (held-out), before -> after:", rank=0)
            print0(drawing, rank=0)
    print0(f"wall time {seconds:.0f}s; run directory: {run_dir}", rank=0)
    return summary
