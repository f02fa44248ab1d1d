"""One update (GRPO, or train.algorithm nft/awm on the same samples' clean latents) of a fixed
global batch, under a list of engine layouts, in one process group.

For each case every rank builds the trainer (real DeepSpeed engine), samples the same global
rollout of 8 trajectories (identical on every rank: same weights, same generator), keeps its
contiguous slice, and runs `GRPOTrainer.update` with fixed advantages; the result holds the
trained weights (gathered), the global gradient norm and, per rank, the ZeRO partition report.

The one-rank references run in the test's own process (`run_cases` under conftest's
`as_fresh_process`). Every 2-rank case of the session (the test modules' `TwoRankGroup`s:
sd3 GRPO and nft/awm, Qwen-Image, Bagel, and bench_memory's per-rank measurements) runs in one
torchrun launch of this script, started once by conftest's `two_rank` fixture:

    torchrun --nproc_per_node 2 tests/dist_update.py OUT_DIR CASES.json

CASES.json is a list of cases, each {"name", "kind", ...}:

- "update" ("model", "recipe", "overrides"): `run_case`; rank 0 writes OUT_DIR/NAME.pt.
- "bench_memory": bench_memory's per-rank worker; every rank writes OUT_DIR/NAME.rank{R}.json
  (bench_memory.measure_one's rows, the file bench_memory's own worker writes).
- "train" ("args", optional "poison": [RANK, EPOCHS]): `flowpo ARGS` (flowpo.cli.main, a whole
  training run) on every rank, in the launch's process group, which stays open between cases
  (the trainer's closing close_distributed is a barrier here); every rank writes its stdout,
  stderr and exit status to OUT_DIR/NAME.rank{R}.{out,err,rc}. With "poison", GRPO's loss is
  NaN on rank RANK alone in the epochs EPOCHS (`poisoned`; tests/test_robustness.py).

Each rank prints `[dist_update] rank R: case NAME` before a case starts, so a crash names its
case; a case that crashes or exits non-zero ends the launch (torchrun stops the other rank).
Each case computes as it would alone in a fresh launch (torch.nn.functional.linear is put back
before it: a ZeRO-3 engine replaces it process-wide).
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


def bench_memory_rows(rank: int, world: int) -> list[dict]:
    """bench_memory's per-rank worker (`bench_memory.worker`) without its own process group:
    measure_one for every (LoRA / full, ZeRO case)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    return [
        bench_memory.measure_one(lora, case, rank, world)
        for lora in (True, False)
        for case in bench_memory.CASES
    ]


def poisoned(rank_to_poison: int, epochs: list[int]):
    """A context in which GRPO's loss is made NaN on ONE rank only (RANK_TO_POISON) in EPOCHS:
    the other ranks see finite values, and the skip must still be agreed by all."""
    import contextlib

    from flowpo.trainer.algorithms import GRPO

    real = GRPO.loss

    def loss(self, sub, j, embeds, adv, *, epoch, start):
        term = real(self, sub, j, embeds, adv, epoch=epoch, start=start)
        if epoch in epochs and int(os.environ["RANK"]) == int(rank_to_poison):
            term.loss = term.loss * torch.tensor(float("nan"))
        return term

    @contextlib.contextmanager
    def patched():
        GRPO.loss = loss
        try:
            yield
        finally:
            GRPO.loss = real

    return patched()


def train_run(args: list[str], out: Path, rank: int, poison: list | None = None) -> int:
    """`flowpo ARGS` on this rank (GRPO's loss `poisoned(*POISON)` when given), its output
    written to OUT.rank{R}.{out,err,rc}."""
    import contextlib
    import io
    import traceback

    from flowpo.cli import main as flowpo_main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 1
    try:
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            poisoned(*poison) if poison else contextlib.nullcontext(),
        ):
            code = flowpo_main(args)
    except BaseException:
        stderr.write(traceback.format_exc())
        raise
    finally:
        for ext, text in (("out", stdout.getvalue()), ("err", stderr.getvalue())):
            Path(f"{out}.rank{rank}.{ext}").write_text(text)
        Path(f"{out}.rank{rank}.rc").write_text(str(code))
    return code


def keep_group_open() -> None:
    """Training runs end with the trainer's close_distributed; here the launch's group serves
    every case, so a run's close is a barrier only (a failed run ends the launch anyway)."""
    import flowpo.trainer.grpo as grpo

    def close_distributed(barrier: bool = True) -> None:
        if barrier:
            torch.distributed.barrier()

    grpo.close_distributed = close_distributed


def main() -> None:
    from flowpo.trainer.engine import close_distributed, init_distributed

    out, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    rank, world, _ = init_distributed()
    keep_group_open()
    for case in cases:
        name, kind = case["name"], case["kind"]
        print(f"[dist_update] rank {rank}: case {name}", flush=True)
        # every case starts with a fresh process's torch.nn.functional.linear: a ZeRO-3 engine
        # swaps in DeepSpeed's own for the rest of the process, which rounds some layers
        # differently (a later ZeRO-2 case would not compute what it computes on its own)
        torch.nn.functional.linear = torch._C._nn.linear
        if kind == "bench_memory":
            rows = bench_memory_rows(rank, world)
            (out / f"{name}.rank{rank}.json").write_text(json.dumps(rows))
        elif kind == "train":
            code = train_run(case["args"], out / name, rank, case.get("poison"))
            if code:  # the other rank may be waiting at a collective: end the launch
                print(f"[dist_update] rank {rank}: case {name} exited {code}", flush=True)
                sys.stdout.flush()
                os._exit(code)
        else:
            result = run_case(name, case["overrides"], case["model"], out / "runs", case["recipe"])
            if rank == 0:  # written whole, then renamed: a file that exists is a finished case
                torch.save(result, out / f"{name}.pt.part")
                (out / f"{name}.pt.part").rename(out / f"{name}.pt")
    close_distributed()
    # everything is written: skip the interpreter's teardown of torch / DeepSpeed (seconds)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
