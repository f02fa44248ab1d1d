"""Evaluation: deterministic ODE samples for fixed (prompt, seed) pairs, the reward on them and,
when the reward reports strict correctness (`<reward>/strict` details, e.g. `shapes`), the
accuracy per GenEval tag and overall. Shared by the trainer and `flowpo eval`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowpo.config import Config
from flowpo.trainer.data import load_prompt_items
from flowpo.trainer.logging import progress, save_grid
from flowpo.trainer.rollout import sample_ode


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

    def metrics(self) -> dict[str, float]:
        out = {"eval/reward_mean": self.reward_mean, "eval/reward_std": self.reward_std}
        out.update({f"eval/acc/{k}": v for k, v in self.accuracy.items()})
        return out


def eval_items(cfg: Config) -> tuple[list[str], list[dict]]:
    e = cfg.eval
    if e.prompt_file or e.prompts:
        prompts, metas = load_prompt_items(e.prompt_file, e.prompts, field="eval.prompt_file")
    else:
        prompts, metas = load_prompt_items(cfg.rollout.prompt_file, cfg.rollout.prompts)
    if e.num_prompts:
        prompts, metas = prompts[: e.num_prompts], metas[: e.num_prompts]
    return prompts, metas


@torch.no_grad()
def run_eval(adapter, reward, cfg: Config, *, show_progress: bool = False) -> EvalResult:
    """Sample every eval prompt once per seed with the ODE and score the images."""
    prompts, metas = eval_items(cfg)
    seeds = list(cfg.eval.seeds)
    pairs = [(i, s) for i in range(len(prompts)) for s in seeds]
    steps = cfg.sampling.eval_num_steps or cfg.sampling.num_steps
    bs = max(cfg.rollout.batch_size, 16)
    scores, strict, images = [], [], []
    grid_n, cols = min(cfg.eval.grid_prompts, len(prompts)), min(8, len(seeds))
    chunks = progress(range(0, len(pairs), bs), desc="eval", enabled=show_progress)
    for start in chunks:
        chunk = pairs[start : start + bs]
        emb = adapter.encode_prompts([prompts[i] for i, _ in chunk])
        imgs = sample_ode(adapter, emb, steps, [s for _, s in chunk])
        out = reward(imgs, [prompts[i] for i, _ in chunk], [metas[i] for i, _ in chunk])
        scores.append(out.scores)
        keys = [k for k in out.details if k.endswith("/strict")]
        if keys:
            strict.append(out.details[keys[0]])
        keep = [j for j, (i, s) in enumerate(chunk) if i < grid_n and s in seeds[:cols]]
        if keep:
            images.append(imgs[keep].cpu())
    all_scores = torch.cat(scores)
    res = EvalResult(
        reward_mean=float(all_scores.mean()),
        reward_std=float(all_scores.std()) if all_scores.numel() > 1 else 0.0,
        num_samples=len(pairs),
        grid=torch.cat(images) if images else None,
        grid_rows=prompts[:grid_n],
        grid_cols=cols,
    )
    if strict:
        ok = torch.cat(strict)
        tags = [metas[i].get("tag", "all") for i, _ in pairs]
        for tag in dict.fromkeys(tags):
            sel = torch.tensor([t == tag for t in tags])
            res.accuracy[tag] = float(ok[sel].mean())
            res.counts[tag] = int(sel.sum())
        # GenEval's overall score is the mean of the per-tag accuracies (tags weigh equally)
        res.accuracy["overall"] = sum(res.accuracy.values()) / len(res.accuracy)
        res.counts["overall"] = len(pairs)
    return res


def save_eval_grid(res: EvalResult, path: Path) -> Path | None:
    if res.grid is None:
        return None
    return save_grid(res.grid, path, nrow=res.grid_cols, captions=res.grid_rows)


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
    return "\n".join(lines)
