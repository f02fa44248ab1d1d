"""One update (GRPO, or train.algorithm nft/awm on the same samples' clean latents) of a fixed
global batch, under a list of engine layouts, in one process group.

Launched by tests/test_distributed.py with torchrun (1 or 2 ranks, gloo). For each case every
rank builds the trainer (real DeepSpeed engine), samples the same global rollout of 8
trajectories (identical on every rank: same weights, same generator), keeps its contiguous
slice, and runs `GRPOTrainer.update` with fixed advantages. Rank 0 writes, per case, the
trained weights (gathered), the global gradient norm and, per rank, the ZeRO partition report.

    torchrun --standalone --nproc_per_node 2 tests/dist_update.py MODEL_DIR OUT.pt CASES_JSON [RECIPE]

RECIPE (a configs/ stem, default tiny_sd3_jpeg) picks the model family's tiny recipe; the
cases' overrides apply on top of it. The one-rank reference runs in the test's own process
(`run_cases` under conftest's `as_fresh_process`); several ranks need torchrun.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8


def run_case(
    name: str,
    overrides: list[str],
    model_dir: str,
    run_root: Path,
    recipe: str = "tiny_sd3_jpeg",
) -> dict:
    from flowpo.config import load_config
    from flowpo.trainer.data import PromptItem
    from flowpo.trainer.forward_rl import CleanRollout
    from flowpo.trainer.grpo import EpochData, GRPOTrainer
    from flowpo.trainer.rollout import sample_rollout

    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    per_rank = GLOBAL_BATCH // world
    cfg = load_config(
        str(ROOT / "configs" / f"{recipe}.yaml"),
        [
            f"--model.path={model_dir}",
            f"--logging.run_dir={run_root}",
            f"--logging.run_name={name}-w{world}",
            "--logging.wandb=off",
            "--logging.progress=false",
            f"--rollout.batch_size={per_rank}",
            "--rollout.num_batches=1",
            "--rollout.group_size=4",
            "--sampling.num_steps=3",
            "--sampling.guidance_scale=4.5",
            "--train.beta=0.04",
            "--train.learning_rate=1e-3",
            *overrides,
        ],
    )
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    report = trainer.engine.partition_report()
    adapter = trainer.adapter
    evaluation = None
    if any(o.startswith("--eval.seeds") for o in overrides):  # the base policy's evaluation,
        from flowpo.trainer.evaluation import run_eval  # chunks split across the ranks

        res = run_eval(adapter, trainer.reward, cfg)
        evaluation = (res.reward_mean, res.reward_std, res.num_samples)
    prompts = [cfg.rollout.prompts[i % len(cfg.rollout.prompts)] for i in range(GLOBAL_BATCH)]
    embeds = adapter.encode_prompts(prompts)
    sigmas = trainer.schedule()
    plan = trainer.plan.step_plan(sigmas, 0, 0)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        ro = sample_rollout(adapter, embeds, plan, sigmas, cfg, gen)
    adv = torch.randn(GLOBAL_BATCH, generator=torch.Generator().manual_seed(99))
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    stored = ro.index(mine)
    if cfg.train.algorithm != "grpo":  # nft / awm train on the clean final latents only
        stored = trainer.algo.cat([CleanRollout(ro.final_latents[mine], trainer.num_trained)])
    data = EpochData(
        items=[PromptItem(prompts[i], i // 4, {}) for i in mine],
        embeds=embeds.index(mine),
        rollout=stored,
        rewards=torch.zeros(per_rank),
        details={},
        group_ids=torch.tensor([i // 4 for i in mine]),
    )
    metrics = trainer.update(data, adv[mine], epoch=0)
    weights = trainer.engine.trainable_state_dict()
    reports: list = [None] * world
    torch.distributed.all_gather_object(reports, report)
    trainer.pool.shutdown(wait=True)
    trainer.logger.close()
    trainer.signals.restore()
    return {
        "weights": weights,
        "grad_norm": metrics["train/grad_norm"],
        "loss": metrics["train/loss"],
        "reports": reports,
        "sizes": trainer.sizes,
        "eval": evaluation,
        "ref_is_engine": type(trainer.engine.ref_module).__name__,
        "activation_checkpointing": bool(
            getattr(trainer.engine.module.module, "gradient_checkpointing", False)
        ),
    }


def run_cases(
    model_dir: str, cases: dict[str, list[str]], run_root: Path, recipe: str = "tiny_sd3_jpeg"
) -> dict:
    """Every case in one process group (started here, or the launcher's); closed after."""
    from flowpo.trainer.engine import close_distributed, init_distributed

    init_distributed()
    results = {}
    for name, overrides in cases.items():
        results[name] = run_case(name, overrides, model_dir, run_root, recipe)
    close_distributed()
    return results


def main() -> None:
    model_dir, out, cases = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    recipe = sys.argv[4] if len(sys.argv) > 4 else "tiny_sd3_jpeg"
    results = run_cases(model_dir, cases, out.parent / "runs", recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
