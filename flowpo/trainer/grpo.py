"""The epoch loop: rollout -> score -> advantages -> update -> evaluate -> checkpoint.

Each stage is a named method that fits on a screen, and `train` calls them in that order. Model
specifics live in the adapter, the rollout plan declares the trained steps, DeepSpeed and every
collective live in the Engine, the checkpoint format in `checkpoint`, one transition's loss in
`update`.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from flowpo.config import Config, ConfigError
from flowpo.models.resolve import resolve_model_path, torch_dtype
from flowpo.rewards.base import RewardError, WeightedReward, group_normalized_total
from flowpo.trainer.advantages import compute_advantages, zero_std_mask
from flowpo.trainer.algorithms import build_algorithm
from flowpo.trainer.checkpoint import (
    checkpoint_dir,
    checkpoint_problem,
    find_checkpoint,
    resume,
    save_checkpoint,
)
from flowpo.trainer.data import KRepeatSampler, load_prompt_items, tag_strata
from flowpo.trainer.ema import TrainingEMA
from flowpo.trainer.engine import Collectives, Engine, close_distributed, init_distributed
from flowpo.trainer.evaluation import (
    TRAIN_EVAL_SEEDS,
    EvalResult,
    run_eval,
    save_eval_grid,
    train_eval_items,
)
from flowpo.trainer.nonfinite import NonFiniteGuard
from flowpo.trainer.preflight import preflight
from flowpo.trainer.rollout import Rollout, build_plan, rollout_sigmas
from flowpo.trainer.signals import StopSignals, TrainingInterrupted
from flowpo.trainer.startup import check_reward_services_on_every_rank, check_same_config
from flowpo.trainer.summary import eval_numbers, finish_run, reward_decline
from flowpo.trainer.tracking import METRICS_FILE, RunLogger, print0, progress, resolve_run_dir

__all__ = ["EpochData", "GRPOTrainer", "TrainingInterrupted", "keyed_generator"]


def keyed_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a deterministic mix of (seed, keys...), e.g. (run seed, epoch,
    rank, ...): every rank, rerun and resumed run derives the same one for the same keys."""
    for k in keys:
        seed = (seed * 1_000_003 + k + 7) % (2**61 - 1)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class EpochData:
    items: list  # (N,) PromptItem of this rank
    embeds: object  # PromptEmbeds, N rows
    rollout: Rollout  # N samples x K trained items, R images each (nft/awm: CleanRollout)
    rewards: torch.Tensor  # (N*R,) weighted reward per image, sample-major
    details: dict[str, torch.Tensor]  # reward name -> (N*R,)
    group_ids: torch.Tensor  # (N*R,) advantage groups: prompt draw x R (E-GRPO: branch point)
    metrics: dict[str, float] = field(default_factory=dict)  # phase times, plan placement


class GRPOTrainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from flowpo.kernels import resolve_backend
        from flowpo.models.base import load_adapter

        cfg = self.cfg
        self.rank, self.world, local_rank = init_distributed()
        preflight(cfg, self.world)
        # the same seed on every rank: LoRA's Gaussian init and any other global-RNG draw agree
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)
        torch.manual_seed(cfg.train.seed)
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        dist = Collectives(self.rank, self.world, self.device)  # until the Engine exists
        check_same_config(cfg, dist)
        self.kernel_backend = resolve_backend(cfg.train.kernels, self.device)  # re-scoring path
        self.show = cfg.logging.progress and self.rank == 0
        self.run_dir = resolve_run_dir(cfg, self.rank, dist.broadcast_object)
        # a new run into a folder that holds one would append to its metrics (rank 0 decides)
        taken = self.rank == 0 and (self.run_dir / METRICS_FILE).is_file()
        if not cfg.checkpoint.resume and dist.broadcast_object(taken):
            name = self.run_dir.name
            raise ConfigError(
                f"logging.run_name '{name}': {self.run_dir} already holds a run (its "
                f"{METRICS_FILE}); give another logging.run_name, continue that run with "
                f"--resume latest --logging.run_name={name}, or delete the folder"
            )
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        check_reward_services_on_every_rank(cfg, dist)  # before any model loads
        # tiny:* models are built by rank 0 in the run directory; the others wait for it
        model_path = resolve_model_path(
            cfg.model.path, self.run_dir, seed=cfg.train.seed, build=dist.is_rank0
        )
        dist.barrier()
        self.adapter = load_adapter(
            cfg.model.family,
            model_path,
            device=self.device,
            dtype=torch_dtype(cfg.model.dtype),
            resolution=cfg.model.resolution or None,
            guidance_scale=cfg.sampling.guidance_scale,
            **cfg.model.options,
        )
        self.adapter.freeze_frozen_parts()
        if cfg.model.attn_backend != "native":  # preflight checked that it runs here
            self.adapter.set_attention_backend(cfg.model.attn_backend)
        prompts, metas = load_prompt_items(cfg.rollout.prompt_file, cfg.rollout.prompts)
        self.sampler = KRepeatSampler(
            prompts,
            group_size=cfg.rollout.group_size,
            images_per_rank=cfg.samples_per_rank(),
            world_size=self.world,
            rank=self.rank,
            seed=cfg.train.seed,
            metadata=metas,
            strata=tag_strata(metas, cfg.rollout.tag_weights, source=cfg.rollout.prompt_file),
        )
        self._decline_warned = -(10**9)  # epoch of the last reward-decline warning
        self.anchor = None
        if cfg.train.anchor_weight > 0:  # train.anchor_*: the drawing anchor beside the RL loss
            from flowpo.trainer.anchor import DrawingAnchor

            self.anchor = DrawingAnchor(self)
        self._prepare_frozen_parts(prompts + (self.anchor.prompts() if self.anchor else []))
        self.plan = build_plan(cfg)
        self.algo = build_algorithm(self)  # train.algorithm: the few methods the loop calls
        self.num_trained, self.images_per_sample = self.algo.plan_shape()
        self.sizes = cfg.derived_sizes(self.world, self.num_trained, self.images_per_sample)
        self.engine = Engine(
            cfg,
            self.adapter.trainable_module,
            lora_targets=self.adapter.lora_targets,
            full_trainable=self.adapter.full_trainable,
            grad_accum=self.sizes["gradient_accumulation_steps"],
            rank=self.rank,
            world_size=self.world,
            device=self.device,
        )
        self.adapter.set_trainable_module(self.engine.module)
        self.ema = TrainingEMA(self.engine, cfg.train)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)  # skipped non-finite steps
        self.reward = WeightedReward(cfg.reward.weights, cfg.reward.options)
        self.pool = ThreadPoolExecutor(max_workers=cfg.reward.num_workers)
        self.logger = RunLogger(
            self.run_dir,
            rank=self.rank,
            wandb_mode=cfg.logging.wandb,
            tensorboard=cfg.logging.tensorboard,
            config=cfg,
        )
        self.start_epoch, self.history = 0, {}
        if cfg.checkpoint.resume:
            ckpt = find_checkpoint(cfg.checkpoint.resume, self.run_dir)
            self.start_epoch, self.history = resume(
                ckpt, self.engine, ema=self.ema.get, states=self.algo.states
            )
        self.signals = StopSignals(self.rank)
        self.signals.install()
        print0(f"run directory: {self.run_dir}", rank=self.rank)
        print0(
            "sizes: "
            + ", ".join(f"{k}={v}" for k, v in self.sizes.items())
            + f", trainable_params={self.engine.num_trainable:,}",
            rank=self.rank,
        )

    def _prepare_frozen_parts(self, prompts: list[str]) -> None:
        """engine.shard_frozen: ZeRO-3 shards of the frozen modules; with it or with
        model.drop_text_encoders, every prompt's embedding cached up front."""
        cfg = self.cfg
        if cfg.engine.shard_frozen:
            from flowpo.trainer.engine import shard_frozen_modules

            self._frozen_engines = shard_frozen_modules(
                cfg, self.adapter.frozen_modules(), self.world
            )
        if cfg.model.drop_text_encoders or cfg.engine.shard_frozen:
            # ZeRO-3 gathers are collective: sharded encoders must run the same calls on every
            # rank, so every prompt is encoded up front, in the same chunks everywhere
            from flowpo.trainer.evaluation import eval_items

            drop = cfg.model.drop_text_encoders
            n = self.adapter.cache_prompts(
                prompts + eval_items(cfg)[0],
                drop_encoders=drop,
                reason="model.drop_text_encoders=true" if drop else "engine.shard_frozen=true",
            )
            print0(
                f"cached {n} prompt embeddings" + ("; text encoders freed" if drop else ""),
                rank=self.rank,
            )

    # -- schedule and plan ------------------------------------------------------------------------
    def _generator(self, *keys: int) -> torch.Generator:
        return keyed_generator(self.cfg.train.seed, *keys, device=self.device)

    def schedule(self) -> torch.Tensor:
        """(T+1,) sigmas of training rollouts; sets Flow-SDE's sigma_max (used to re-score)."""
        probe = self.adapter.initial_noise(1, self._generator(-1))
        sigmas = rollout_sigmas(self.adapter, self.cfg, probe)
        # Flow-SDE's substitute for sigma == 1 (used again when re-scoring in update())
        self.sigma_max = float(sigmas[1])
        return sigmas

    # -- rollout and score ------------------------------------------------------------------------
    def _score(self, images, prompts, metadata):
        """The reward on a worker thread, timed: (RewardOutput, seconds)."""
        t0 = time.perf_counter()
        out = self.reward(images, prompts, metadata)
        return out, time.perf_counter() - t0

    def rollout(self, epoch: int) -> EpochData:
        """Sample the epoch's batches (the algorithm decides how and what is stored); score
        images on workers."""
        cfg = self.cfg
        items = self.sampler.epoch_items(epoch, contiguous_groups=self.plan.shares_prefix)
        # with the negative prompt too when the rollouts use CFG and the policy does not
        with self.adapter.guidance(self.algo.rollout_guidance_scale):
            embeds = self.adapter.encode_prompts([it.prompt for it in items])
        bs = cfg.rollout.batch_size
        gen = self._generator(epoch, self.rank)
        sigmas = self.schedule()
        self.engine.module.eval()
        parts, futures, t_sample, t_decode, batch_metrics = [], [], 0.0, 0.0, []
        batches = progress(
            range(cfg.rollout.num_batches), desc=f"sample {epoch}", enabled=self.show
        )
        for b in batches:
            idx = list(range(b * bs, (b + 1) * bs))
            t0 = time.perf_counter()
            ro, m = self.algo.sample_batch(embeds.index(idx), epoch, b, sigmas, gen)
            batch_metrics.append(m)
            t1 = time.perf_counter()
            images = self.adapter.decode(ro.final_latents.flatten(0, 1))  # (bs*R, 3, H, W)
            t_sample, t_decode = t_sample + t1 - t0, t_decode + time.perf_counter() - t1
            sub = [items[i] for i in idx for _ in range(ro.images_per_sample)]
            # score on a worker thread while the next batch samples
            futures.append(
                self.pool.submit(
                    self._score, images, [it.prompt for it in sub], [it.metadata for it in sub]
                )
            )
            parts.append(ro)
        t_wait = time.perf_counter()
        outs, secs = zip(*[f.result() for f in futures])
        r = parts[0].images_per_sample
        # union of detail keys: a batch masked under failure=mask lacks its reward's extras
        keys = dict.fromkeys(k for o in outs for k in o.details)
        nan = float("nan")
        details = {
            k: torch.cat([o.details.get(k, torch.full_like(o.scores, nan)) for o in outs])
            for k in keys
        }
        return EpochData(
            items=items,
            embeds=embeds,
            rollout=self.algo.cat(parts),
            rewards=torch.cat([o.scores for o in outs]),
            details=details,
            group_ids=torch.tensor([it.group_id * r + i for it in items for i in range(r)]),
            metrics={
                "time/sample_s": t_sample,
                "time/decode_s": t_decode,
                "time/reward_s": float(sum(secs)),  # on workers, overlapping sampling
                "time/reward_wait_s": time.perf_counter() - t_wait,
                # per-batch numbers of the algorithm (grpo: rollout/first_trained_step)
                **{k: float(np.mean([m[k] for m in batch_metrics])) for k in batch_metrics[0]},
            },
        )

    # -- advantages -------------------------------------------------------------------------------
    def advantages(self, data: EpochData) -> tuple[torch.Tensor, dict[str, float]]:
        """Gather rewards of all ranks (groups may span ranks), normalise, keep this rank's part."""
        t = self.cfg.train
        all_r = self.engine.all_gather(data.rewards.to(self.device)).cpu()
        all_g = self.engine.all_gather(data.group_ids.to(self.device)).cpu()
        # every rank has these keys (each reward's score; `<name>/failed` under failure=mask),
        # so the gathers match across ranks; extra details are averaged on this rank only
        shared = sorted(
            k for k in data.details if k in self.reward.weights or k.endswith("/failed")
        )
        gathered = {
            name: self.engine.all_gather(data.details[name].to(self.device)).cpu()
            for name in shared
        }
        if self.cfg.reward.group_normalize:
            all_r = group_normalized_total(gathered, self.cfg.reward.weights, all_g)
        # failure policy `mask`: NaN marks samples a reward could not score; they get advantage
        # 0 and stay out of the group statistics (counted in reward/masked)
        ok = torch.isfinite(all_r)
        if not ok.any():
            raise RewardError(
                "no sample of this epoch could be scored (reward.options.*.failure=mask masked "
                "them all); check the reward services"
            )
        adv = torch.zeros_like(all_r, dtype=torch.float32)
        adv[ok], stats = compute_advantages(
            all_r[ok], all_g[ok], global_std=t.global_std, adv_clip_max=t.adv_clip_max
        )
        if t.drop_zero_std:
            adv[ok] = adv[ok] * (~zero_std_mask(all_r[ok], all_g[ok])).float()
        stats["reward/masked"] = float((~ok).sum())
        n = data.rewards.numel()
        for name, values in data.details.items():
            values = gathered.get(name, values)
            stats[f"reward/{name}_mean"] = float(values.nanmean())  # masked samples are NaN
        return adv[self.rank * n : (self.rank + 1) * n], stats

    # -- update -----------------------------------------------------------------------------------
    def update(self, data: EpochData, adv: torch.Tensor, epoch: int) -> dict[str, float]:
        """One loss per (micro-batch, trained item) from the algorithm (grpo: re-score stored
        transition j; nft/awm: training time j) and one backward each, so DeepSpeed steps at
        each accumulation boundary."""
        t0 = time.perf_counter()
        ro = data.rollout
        self.ema.after_step()  # builds the EMA from the weights before this epoch's first step
        self.engine.module.train()
        n, r = ro.final_latents.shape[0], ro.images_per_sample
        adv = adv.reshape(n, r)  # (N, R): one advantage per image
        mb = self.sizes["micro_batch_size"]
        acc: dict[str, list[float]] = {}
        first_dev = None
        steps = progress(range(0, n, mb), desc=f"train {epoch}", enabled=self.show)
        self.algo.begin_update(data, epoch)
        self.guard.begin_epoch()
        overflows = self.engine.overflow_steps
        for start in steps:
            idx = list(range(start, start + mb))
            sub, emb = ro.index(idx), data.embeds.index(idx)
            for j in range(ro.num_trained):
                term = self.algo.loss(sub, j, emb, adv[idx], epoch=epoch, start=start)
                loss = term.loss
                if self.anchor is not None:
                    extra, st = self.anchor.loss(epoch, start, j)
                    loss = loss + extra
                    term.stats.update(st)
                # NaN/inf loss or log-prob: NaN gradients, so every rank skips this step
                self.engine.backward(self.guard.check(loss, term.log_probs))
                code = self.engine.step(self.guard.window)
                self.guard.after_step(code, epoch)  # raises after too many skips in a row
                self.ema.after_step()
                for k, v in term.stats.items():
                    acc.setdefault(k, []).append(float(v))
                if start == 0 and "ratio_max_dev" in term.stats:
                    # grpo: no optimizer step yet, so the ratio must be exactly 1
                    first_dev = max(first_dev or 0.0, float(term.stats["ratio_max_dev"]))
        out = {f"train/{k}": float(np.mean(v)) for k, v in acc.items()}
        if first_dev is not None:
            out["train/first_ratio_max_dev"] = first_dev
        out.update(self.algo.end_update(epoch))
        out = self.engine.mean_over_ranks(out, maxed=("train/first_ratio_max_dev",))
        out["train/grad_norm"] = self.engine.grad_norm()
        out.update(self.guard.metrics())  # the same on every rank: skips are agreed
        if self.engine.fp16:  # the loss scaler's skips: normal work, not counted as divergence
            out["train/overflow_steps"] = float(self.engine.overflow_steps - overflows)
            out["train/overflow_steps_total"] = float(self.engine.overflow_steps)
            out["train/loss_scale"] = self.engine.loss_scale
        out["time/train_s"] = time.perf_counter() - t0
        out.update(data.metrics)
        return out

    # -- evaluate, checkpoint, stop ---------------------------------------------------------------
    def evaluate(self, tag: str, epoch: int) -> EvalResult:
        """ODE samples for the fixed (prompt, seed) pairs: reward, per-tag accuracy, grid PNG."""
        self.engine.module.eval()
        with self.ema.scope():  # EMA weights (when train.ema) for evaluation
            res = run_eval(self.adapter, self.reward, self.cfg, show_progress=self.show)
            if n := self.cfg.eval.train_prompts:
                res.train = run_eval(
                    self.adapter,
                    self.reward,
                    self.cfg,
                    items=train_eval_items(self.cfg, n),
                    seeds=self.cfg.eval.seeds[:TRAIN_EVAL_SEEDS],
                )
        if self.rank == 0:
            path = save_eval_grid(res, self.run_dir / f"samples_{tag}.png")
            if path is not None:
                self.logger.log_image(f"samples/{tag}", path, step=epoch)
            self.logger.log(res.metrics(), step=epoch)
        acc = res.accuracy.get("overall")
        train_acc = res.train.accuracy.get("overall") if res.train is not None else None
        print0(
            f"eval [{tag}] reward {res.reward_mean:.4f} ± {res.reward_std:.4f}"
            + (
                f" | strict accuracy {acc:.3f} ({res.num_samples} samples)"
                if acc is not None
                else ""
            )
            + (f" | training prompts {train_acc:.3f}" if train_acc is not None else ""),
            rank=self.rank,
        )
        return res

    def save_checkpoint(self, epoch: int):
        """checkpoint-{epoch} of this run (collective); see `trainer.checkpoint`."""
        return save_checkpoint(
            self.run_dir,
            epoch,
            engine=self.engine,
            cfg=self.cfg,
            history=self.history,
            ema=self.ema.get(),
            states=self.algo.states(),
        )

    def _stop_requested(self) -> int:
        """The signal any rank received (0 = none); collective, so all ranks stop together."""
        return self.engine.max_over_ranks(self.signals.received)

    def _stop(self, signum: int, last_done: int) -> None:
        """Checkpoint the state after epoch `last_done` (unless it is on disk) and stop."""
        ckpt = None
        if last_done >= 0:
            ckpt = checkpoint_dir(self.run_dir, last_done)
            if checkpoint_problem(ckpt) is not None:
                ckpt = self.save_checkpoint(last_done)
        raise TrainingInterrupted(signum, ckpt)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.time()
        if cfg.eval.at_start and "eval_start" not in self.history:
            self.history["eval_start"] = eval_numbers(self.evaluate("start", self.start_epoch))
        last = None
        for epoch in range(self.start_epoch, cfg.train.epochs):
            te = time.time()
            data = self.rollout(epoch)  # sampled and scored
            if sig := self._stop_requested():  # weights are still those after epoch - 1
                self._stop(sig, epoch - 1)
            adv, stats = self.advantages(data)
            metrics = self.update(data, adv, epoch)
            metrics.update(stats)
            metrics["time/epoch_s"] = time.time() - te
            self._log_epoch(epoch, metrics, stats)
            last = epoch
            done = epoch + 1 == cfg.train.epochs
            if cfg.eval.every and (epoch + 1) % cfg.eval.every == 0 and not done:
                self.evaluate(f"epoch{epoch}", epoch)
            every = cfg.checkpoint.every
            if every and (epoch + 1) % every == 0 and not done:
                self.save_checkpoint(epoch)
            if sig := self._stop_requested():
                self._stop(sig, epoch)
        if last is not None:
            self.save_checkpoint(last)
        end = self.evaluate("end", cfg.train.epochs - 1) if cfg.eval.at_end else None
        if end is not None:
            self.history["eval_end"] = eval_numbers(end)
        return finish_run(
            self.run_dir,
            self.history,
            end,
            time.time() - t0,
            reward_names=list(self.cfg.reward.weights),
            rank=self.rank,
            rollouts=self.algo.rollouts,
        )

    def _log_epoch(self, epoch: int, metrics: dict, stats: dict) -> None:
        self.history["epoch"] = epoch
        self.history.setdefault("train_reward", []).append(
            [stats["reward_mean"], stats["reward_std"]]
        )
        self.logger.log(metrics, step=epoch)
        zero = stats.get("zero_std_ratio", 0.0)
        clip = ""
        if "train/clipfrac_high" in metrics:  # grpo and awm: the clipped ratio
            clipped = metrics["train/clipfrac_high"] + metrics["train/clipfrac_low"]
            clip = f" | clipfrac {clipped:.3f}"
        skipped = int(metrics.get("train/skipped_steps", 0))
        overflows = int(metrics.get("train/overflow_steps", 0))
        print0(
            f"epoch {epoch:3d} | reward {stats['reward_mean']:.4f} ± {stats['reward_std']:.4f}"
            f" | loss {metrics['train/loss']:+.2e}{clip}"
            f" | no-spread groups {zero:.0%} | {metrics['time/epoch_s']:.1f}s"
            + (f" | {skipped} optimizer step(s) skipped: non-finite values" if skipped else "")
            + (
                f" | {overflows} fp16 overflow step(s) skipped, loss scale "
                f"{metrics['train/loss_scale']:g}"
                if overflows
                else ""
            ),
            rank=self.rank,
        )
        # groups whose rewards are all equal have advantage 0: when (nearly) every group is
        # like that, the update has no signal and only the optimizer's momentum moves weights
        if zero >= 0.9:
            print0(
                f"warning: epoch {epoch}: {zero:.0%} of the groups have no reward spread, so "
                "their advantages are 0 and this epoch teaches nothing; the reward cannot tell "
                "this policy's samples apart (a denser reward, more samples per group, or more "
                "sampling noise help)",
                rank=self.rank,
            )
        # a policy that unlearns its task: the reward falls from its best 5-epoch mean (warned at
        # most every 10 epochs while it lasts)
        decline = reward_decline(self.history["train_reward"])
        if decline and epoch - self._decline_warned >= 10:
            self._decline_warned = epoch
            first = decline["best_first_epoch"]
            print0(
                f"warning: epoch {epoch}: the training reward fell from {decline['best']:.4f} "
                f"(mean of epochs {first}-{first + 4}) to {decline['last']:.4f} (the last 5), "
                f"{decline['drop_se']:.1f} standard errors: the policy may be unlearning its task. "
                "Checkpoints from before the drop keep the better policy; fewer epochs, a lower "
                "learning rate or a larger train.beta (KL to the base) hold it back",
                rank=self.rank,
            )

    def close(self, clean: bool = True) -> None:
        """Release workers, sinks and the process group (no barrier after a failure: the other
        ranks may never reach it)."""
        if getattr(self, "signals", None) is not None:
            self.signals.restore()
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=True)
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        close_distributed(barrier=clean)
