"""Evaluation: deterministic ODE samples for fixed (prompt, seed) pairs, the reward on them and,
when the reward reports strict correctness (`<reward>/strict` details, e.g. `shapes`), the
accuracy per GenEval tag and overall. Shared by the trainer and `flowpo eval`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowpo.config import Config
from flowpo.trainer.data import load_prompt_items
from flowpo.trainer.engine import process_group
from flowpo.trainer.rollout import sample_ode
from flowpo.trainer.tracking import progress, save_grid


@dataclass
class EvalResult:
    reward_mean: float
    reward_std: float
    num_samples: int
    accuracy: dict[str, float] = field(default_factory=dict)  # tag -> strict accuracy; "overall"
    counts: dict[str, int] = field(default_factory=dict)  # tag -> samples
    grid: torch.Tensor | None = None  # (rows * cols, 3, H, W) images of the grid
    grid_rows: list[str] = field(default_factory=list)
    grid_cols: int = 0
    detail_means: dict[str, float] = field(default_factory=dict)  # e.g. each reward's mean
    masked: int = 0  # samples a reward could not score (failure=mask), left out of the means
    # fraction of prompts whose rewards over their first min(8, seeds) seeds are not all equal:
    # how many groups of a GRPO epoch on these prompts would carry a signal (NaN: < 2 seeds)
    spread: float = float("nan")
    train: EvalResult | None = None  # the training-prompt evaluation (eval.train_prompts)

    def overall_se(self) -> float:
        """Standard error of the overall accuracy (GenEval's mean over tags): binomial per tag,
        sqrt(p (1 - p) / n), the tags independent, so se = sqrt(sum se_t^2) / #tags. NaN
        without per-tag accuracies."""
        tags = [t for t in self.accuracy if t != "overall"]
        if not tags:
            return float("nan")
        var = sum(self.accuracy[t] * (1 - self.accuracy[t]) / self.counts[t] for t in tags)
        return math.sqrt(var) / len(tags)

    def metrics(self) -> dict[str, float]:
        out = {"eval/reward_mean": self.reward_mean, "eval/reward_std": self.reward_std}
        out.update({f"eval/acc/{k}": v for k, v in self.accuracy.items()})
        if self.accuracy:
            out["eval/acc_se/overall"] = self.overall_se()
        out.update({f"eval/{k}_mean": v for k, v in self.detail_means.items()})
        if math.isfinite(self.spread):
            out["eval/group_spread"] = self.spread
        if self.masked:
            out["eval/masked"] = float(self.masked)
        if self.train is not None:
            out.update(
                {"eval_train/" + k[len("eval/") :]: v for k, v in self.train.metrics().items()}
            )
        return out

    def numbers(self) -> dict:
        """The JSON-able numbers (kept in the run history and summary.json)."""
        out = {
            "reward_mean": self.reward_mean,
            "reward_std": self.reward_std,
            "num_samples": self.num_samples,
            "accuracy": self.accuracy,
            "counts": self.counts,
            "detail_means": self.detail_means,
            "spread": self.spread,
        }
        if self.train is not None:
            out["train"] = self.train.numbers()
        return out

    @classmethod
    def from_numbers(cls, d: dict) -> EvalResult:
        res = cls(
            d["reward_mean"],
            d["reward_std"],
            d["num_samples"],
            dict(d.get("accuracy", {})),
            dict(d.get("counts", {})),
            detail_means=dict(d.get("detail_means", {})),
            spread=d.get("spread", float("nan")),
        )
        if "train" in d:
            res.train = cls.from_numbers(d["train"])
        return res


def eval_items(cfg: Config) -> tuple[list[str], list[dict]]:
    e = cfg.eval
    if e.prompt_file or e.prompts:
        prompts, metas = load_prompt_items(e.prompt_file, e.prompts, field="eval.prompt_file")
    else:
        prompts, metas = load_prompt_items(cfg.rollout.prompt_file, cfg.rollout.prompts)
    if e.num_prompts:
        prompts, metas = prompts[: e.num_prompts], metas[: e.num_prompts]
    return prompts, metas


TRAIN_EVAL_SEEDS = 8  # seeds per training prompt in the training-prompt evaluation


def train_eval_items(cfg: Config, n: int) -> tuple[list[str], list[dict]]:
    """n training prompts spread evenly over the training set (which lists prompts tag by tag,
    so every tag is represented), for reporting training-prompt accuracy beside held-out."""
    prompts, metas = load_prompt_items(cfg.rollout.prompt_file, cfg.rollout.prompts)
    if n and n < len(prompts):
        pick = [round(i * (len(prompts) - 1) / max(1, n - 1)) for i in range(n)]
        prompts, metas = [prompts[i] for i in pick], [metas[i] for i in pick]
    return prompts, metas


def write_geneval_layout(save_dir: Path, prompts: list[str], metas: list[dict]) -> None:
    """GenEval's folder layout: save_dir/{i:05}/metadata.jsonl (+ samples/ filled later)."""
    for i, (prompt, meta) in enumerate(zip(prompts, metas)):
        folder = save_dir / f"{i:05}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps({**meta, "prompt": prompt}) + "\n")


def save_sample(save_dir: Path, i: int, k: int, image: torch.Tensor) -> None:
    """(3, H, W) float [0, 1] -> save_dir/{i:05}/samples/{k:05}.png."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    Image.fromarray(arr.permute(1, 2, 0).cpu().numpy()).save(
        save_dir / f"{i:05}" / "samples" / f"{k:05}.png"
    )


@torch.no_grad()
def run_eval(
    adapter,
    reward,
    cfg: Config,
    *,
    show_progress: bool = False,
    save_dir: Path | None = None,
    items: tuple[list[str], list[dict]] | None = None,
    seeds: list[int] | None = None,
) -> EvalResult:
    """Sample every eval prompt once per seed with the ODE and score the images; with
    `save_dir`, also write every image in GenEval's layout (sample k = the k-th seed).
    items / seeds: other (prompts, metadata) and seeds than the config's eval set (e.g. the
    training-prompt evaluation)."""
    prompts, metas = items if items is not None else eval_items(cfg)
    if save_dir is not None:
        write_geneval_layout(Path(save_dir), prompts, metas)
    seeds = list(cfg.eval.seeds if seeds is None else seeds)
    pairs = [(i, s) for i in range(len(prompts)) for s in seeds]
    steps = cfg.sampling.eval_num_steps or cfg.sampling.num_steps
    bs = max(cfg.rollout.batch_size, 16)
    grid_n, cols = min(cfg.eval.grid_prompts, len(prompts)), min(8, len(seeds))
    starts = list(range(0, len(pairs), bs))
    # several ranks: chunk c on rank c % world (the same batches as on one rank, so the same
    # numbers); every rank runs the same number of chunks (ZeRO-3 gathers are collective),
    # a rank short of one repeats its last chunk and drops the result
    dist = process_group()
    world, rank = dist.world_size, dist.rank
    per_rank = -(-len(starts) // world)
    mine = list(range(rank, len(starts), world))
    real = len(mine)
    mine += [mine[-1] if mine else 0] * (per_rank - real)
    results: dict[int, tuple] = {}
    # eval.guidance_scale: this evaluation's CFG (0: the rollouts' sampling.guidance_scale)
    with adapter.guidance(cfg.eval.guidance_scale or None):
        for n, c in enumerate(progress(mine, desc="eval", enabled=show_progress)):
            chunk = pairs[starts[c] : starts[c] + bs]
            emb = adapter.encode_prompts([prompts[i] for i, _ in chunk])
            imgs = sample_ode(adapter, emb, steps, [s for _, s in chunk])
            out = reward(imgs, [prompts[i] for i, _ in chunk], [metas[i] for i, _ in chunk])
            if n >= real:
                continue  # padding
            if save_dir is not None:
                for j, (i, s) in enumerate(chunk):
                    save_sample(Path(save_dir), i, seeds.index(s), imgs[j])
            keys = [k for k in out.details if k.endswith("/strict")]
            # NaN where a batch was masked (failure=mask) and its reward's details are missing
            st = out.details[keys[0]] if keys else torch.full_like(out.scores, torch.nan)
            keep = [j for j, (i, s) in enumerate(chunk) if i < grid_n and s in seeds[:cols]]
            grid = imgs[keep].cpu() if keep else None
            results[c] = (
                out.scores.cpu(),
                {k: v.cpu() for k, v in out.details.items()},
                st.cpu(),
                grid,
            )
    if world > 1:
        results = {c: r for part in dist.all_gather_object(results) for c, r in part.items()}
    ordered = [results[c] for c in range(len(starts))]
    scores = [r[0] for r in ordered]
    details = [r[1] for r in ordered]
    strict = [r[2] for r in ordered]
    images = [r[3] for r in ordered if r[3] is not None]
    all_scores = torch.cat(scores)
    ok = torch.isfinite(all_scores)  # NaN: masked by a reward's failure=mask policy
    kept = all_scores[ok]
    res = EvalResult(
        reward_mean=float(kept.mean()) if kept.numel() else float("nan"),
        reward_std=float(kept.std()) if kept.numel() > 1 else 0.0,
        masked=int((~ok).sum()),
        detail_means={
            k: float(torch.cat([d[k] for d in details if k in d]).nanmean())
            for k in dict.fromkeys(k for d in details for k in d)
        },
        num_samples=len(pairs),
        grid=torch.cat(images) if images else None,
        grid_rows=prompts[:grid_n],
        grid_cols=cols,
    )
    if len(seeds) >= 2:  # pairs are prompt-major: row i holds prompt i's seeds
        per = all_scores.reshape(len(prompts), len(seeds))[:, : min(8, len(seeds))]
        rows = per[torch.isfinite(per).all(1)]
        if rows.numel():
            res.spread = float((rows.amax(1) > rows.amin(1)).float().mean())
    ok = torch.cat(strict)
    if torch.isfinite(ok).any():  # the reward reports strict correctness
        tags = [metas[i].get("tag", "all") for i, _ in pairs]
        for tag in dict.fromkeys(tags):
            sel = torch.tensor([t == tag for t in tags]) & torch.isfinite(ok)
            if sel.any():
                res.accuracy[tag] = float(ok[sel].mean())
                res.counts[tag] = int(sel.sum())
        # GenEval's overall score is the mean of the per-tag accuracies (tags weigh equally)
        res.accuracy["overall"] = sum(res.accuracy.values()) / len(res.accuracy)
        res.counts["overall"] = int(torch.isfinite(ok).sum())
    return res


def save_eval_grid(res: EvalResult, path: Path) -> Path | None:
    if res.grid is None:
        return None
    return save_grid(res.grid, path, nrow=res.grid_cols, captions=res.grid_rows)


def drawing_numbers(detail_means: dict[str, float]) -> dict[str, float]:
    """What a detector-based reward says about the drawings (the `shapes` reward's details):
    `recognised` = recognised shapes / detected components, `excess_objects` = objects drawn per
    image minus the objects asked for, `quality` = drawn pixels inside recognised shapes.
    Empty for rewards without these details."""
    out = {}
    for key, mean in detail_means.items():
        name = key.rsplit("/", 1)[-1]
        if name in ("excess_objects", "quality"):
            out[name] = mean
        elif name == "recognised" and detail_means.get(key[: -len(name)] + "components"):
            out["recognised"] = mean / detail_means[key[: -len(name)] + "components"]
    return out


def drawing_table(before: dict[str, float] | None, after: EvalResult) -> str:
    """Lines for the drawing statistics and the group spread, before -> after (`before` as
    kept in the run history: detail means and spread), or one column."""
    rows = [
        ("recognised", "detected objects recognised as shapes", "{:.1%}"),
        ("excess_objects", "objects drawn - objects asked (per image)", "{:+.3f}"),
        ("quality", "drawn pixels inside recognised shapes", "{:.1%}"),
    ]
    now = drawing_numbers(after.detail_means)
    was = drawing_numbers(before.get("detail_means", {})) if before else {}
    lines = []
    for key, label, fmt in rows:
        if key in now:
            b = f"{fmt.format(was[key])} -> " if key in was else ""
            lines.append(f"{label:<44}{b}{fmt.format(now[key])}")
    if math.isfinite(after.spread):
        b = before.get("spread", float("nan")) if before else float("nan")
        prev = f"{b:.1%} -> " if math.isfinite(b) else ""
        lines.append(f"{'prompts with reward spread across seeds':<44}{prev}{after.spread:.1%}")
    return "\n".join(lines)


def accuracy_table(before: EvalResult | None, after: EvalResult) -> str:
    """Per-tag strict accuracy, before -> after (or one column when `before` is None)."""
    if not after.accuracy:
        return ""
    lines = []
    head = f"{'tag':<15}{'n':>5}  " + ("before   after   change" if before else "accuracy")
    lines.append(head)
    for tag, acc in after.accuracy.items():
        n = after.counts[tag]
        if before and tag in before.accuracy:
            b = before.accuracy[tag]
            lines.append(f"{tag:<15}{n:>5}  {b:6.3f}  {acc:6.3f}  {100 * (acc - b):+6.1f} pt")
        else:
            lines.append(f"{tag:<15}{n:>5}  {acc:6.3f}")
    # one fixed-seed evaluation of a few hundred samples moves by a few points between
    # neighbouring checkpoints; say how much the overall number itself can be trusted
    se = after.overall_se()
    if before and before.accuracy:
        lines.append(
            f"standard error of overall (binomial per tag): before {before.overall_se():.3f}, "
            f"after {se:.3f}"
        )
    else:
        lines.append(f"standard error of overall (binomial per tag): {se:.3f}")
    return "\n".join(lines)
