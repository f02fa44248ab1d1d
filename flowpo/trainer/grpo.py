"""The epoch loop: rollout -> rewards -> advantages -> update -> eval / checkpoint.

Each stage is a named method that fits on a screen. Model specifics live in the adapter, the
rollout plan declares the trained steps, DeepSpeed lives in the Engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from flowpo.config import Config
from flowpo.rewards.base import (
    RewardError,
    WeightedReward,
    check_reward_services,
    group_normalized_total,
)
from flowpo.rewards.client import RewardServiceError
from flowpo.trainer.advantages import compute_advantages, zero_std_mask
from flowpo.trainer.data import KRepeatSampler, load_prompt_items
from flowpo.trainer.ema import EMA
from flowpo.trainer.evaluation import EvalResult, accuracy_table, run_eval, save_eval_grid
from flowpo.trainer.logging import RunLogger, plot_curves, print0, progress
from flowpo.trainer.losses import (
    clipped_policy_loss,
    gradient_reweight_factor,
    kl_to_reference,
    ratio_norm_log_ratio,
)
from flowpo.trainer.rollout import (
    Rollout,
    build_plan,
    rollout_sigmas,
    sample_rollout,
    shared_anchor_forward,
)
from flowpo.trainer.sde import sde_step_with_logprob

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EpochData:
    items: list  # (N,) PromptItem of this rank
    embeds: object  # PromptEmbeds, N rows
    rollout: Rollout  # N samples x K trained transitions, R images each
    rewards: torch.Tensor  # (N*R,) weighted reward per image, sample-major
    details: dict[str, torch.Tensor]  # reward name -> (N*R,)
    group_ids: torch.Tensor  # (N*R,) advantage groups: prompt draw x R (E-GRPO: branch point)
    metrics: dict[str, float] = field(default_factory=dict)  # phase times, plan placement


SHAPES_BASE = Path(__file__).resolve().parents[1] / "tasks" / "shapes" / "base_model"


def resolve_model_path(cfg: Config, run_dir: Path, build: bool = True) -> str:
    """`shapes:base` -> the committed shapes-world base model; `tiny:FAMILY` -> a tiny random
    model built under run_dir/base_model (by the caller that passes build=True); else the path."""
    path = cfg.model.path
    if path == "shapes:base":
        return str(SHAPES_BASE)
    if not path.startswith("tiny:"):
        return path
    from flowpo.models.tiny import make_tiny

    out = run_dir / "base_model"
    # diffusers layout (model_index.json) or the official Bagel layout (llm_config.json)
    built = any((out / f).is_file() for f in ("model_index.json", "llm_config.json"))
    if build and not built:
        make_tiny(path.split(":", 1)[1], str(out), seed=cfg.train.seed)
    return str(out)


def asdict_eval(res: EvalResult) -> dict:
    """The JSON-able numbers of an evaluation (kept in the trainer state for resume)."""
    return {
        "reward_mean": res.reward_mean,
        "reward_std": res.reward_std,
        "num_samples": res.num_samples,
        "accuracy": res.accuracy,
        "counts": res.counts,
    }


def resolve_run_dir(cfg: Config, rank: int, broadcast) -> Path:
    name = cfg.logging.run_name
    if not name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S") if rank == 0 else None
        name = f"{cfg.recipe}-{broadcast(stamp)}"
    return Path(cfg.logging.run_dir) / name


MANIFEST = "manifest.json"


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT reached the trainer: the state was checkpointed and the run stopped."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum, self.checkpoint = signum, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no epoch finished)"
        super().__init__(f"stopped by {signal.Signals(signum).name}; {where}")


def write_manifest(ckpt: Path) -> None:
    """Name and size of every file of a finished checkpoint; written last, inside it."""
    files = {
        str(f.relative_to(ckpt)): f.stat().st_size
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps(files, indent=0))


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` is not a complete checkpoint (missing manifest, file missing or truncated),
    or None when every file the manifest lists is there with its size."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    for name, size in json.loads(manifest.read_text()).items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def find_checkpoint(spec: str, run_dir: Path) -> Path:
    """`latest` -> the newest complete checkpoint of run_dir (the `latest` pointer's, else the
    newest whose manifest checks out); else a checkpoint directory, which must be complete."""
    if spec == "latest":
        root = run_dir / "checkpoints"
        pointer = root / "latest"
        candidates = [root / pointer.read_text().strip()] if pointer.is_file() else []
        candidates += sorted(
            (p for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
            key=lambda p: int(p.name.split("-")[1]),
            reverse=True,
        )
        for ckpt in candidates:
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            print(f"warning: skipping {ckpt}: {problem}", flush=True)
        raise FileNotFoundError(
            f"checkpoint.resume=latest: no complete checkpoint in {run_dir}; set "
            "logging.run_name to the run to continue, or pass a checkpoint directory"
        )
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"checkpoint.resume '{spec}' is not a flowpo checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"checkpoint.resume '{spec}' is incomplete: {problem}")
    return path


class GRPOTrainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from flowpo.kernels import resolve_backend
        from flowpo.models.base import load_adapter
        from flowpo.trainer.engine import Engine, init_distributed

        cfg = self.cfg
        self.rank, self.world, local_rank = init_distributed()
        cfg.validate(self.world)
        # the same seed on every rank: LoRA's Gaussian init and any other global-RNG draw agree
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)
        torch.manual_seed(cfg.train.seed)
        self._check_same_config()
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        self.kernel_backend = resolve_backend(cfg.train.kernels, self.device)  # re-scoring path
        self.show = cfg.logging.progress and self.rank == 0
        self.run_dir = resolve_run_dir(cfg, self.rank, self._broadcast)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        self._check_reward_services()  # before any model loads
        model_path = self._model_path()
        self.adapter = load_adapter(
            cfg.model.family,
            model_path,
            device=self.device,
            dtype=DTYPES[cfg.model.dtype],
            resolution=cfg.model.resolution or None,
            guidance_scale=cfg.sampling.guidance_scale,
            **cfg.model.options,
        )
        self.adapter.freeze_frozen_parts()
        prompts, metas = load_prompt_items(cfg.rollout.prompt_file, cfg.rollout.prompts)
        self.sampler = KRepeatSampler(
            prompts,
            group_size=cfg.rollout.group_size,
            images_per_rank=cfg.samples_per_rank(),
            world_size=self.world,
            rank=self.rank,
            seed=cfg.train.seed,
            metadata=metas,
        )
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
        self.plan = build_plan(cfg)
        self.num_trained, self.images_per_sample = self._plan_shape()
        self.sizes = cfg.derived_sizes(self.world, self.num_trained, self.images_per_sample)
        self.engine = Engine(
            cfg,
            self.adapter.trainable_module,
            lora_targets=self.adapter.lora_targets,
            full_trainable=self.adapter.full_trainable,
            grad_accum=self.sizes["gradient_accumulation_steps"],
            rank=self.rank,
            world_size=self.world,
        )
        self.adapter.set_trainable_module(self.engine.module)
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
            self._resume(find_checkpoint(cfg.checkpoint.resume, self.run_dir))
        self._install_signal_handlers()
        print0(f"run directory: {self.run_dir}", rank=self.rank)
        print0(
            "sizes: "
            + ", ".join(f"{k}={v}" for k, v in self.sizes.items())
            + f", trainable_params={self.engine.num_trainable:,}",
            rank=self.rank,
        )

    def _check_reward_services(self) -> None:
        """Every rank scores its own images, so every rank checks the services it will call;
        the outcome is shared so that all ranks stop together (one rank stopping alone would
        leave the others waiting at the next barrier)."""
        try:
            check_reward_services(self.cfg.reward.weights, self.cfg.reward.options)
            mine = ""
        except RewardServiceError as e:
            mine = str(e)
        if self.world == 1:
            failed = [(0, mine)] if mine else []
        else:
            everyone: list = [None] * self.world
            torch.distributed.all_gather_object(everyone, mine)
            failed = [(r, m) for r, m in enumerate(everyone) if m]
        if failed:
            where = "" if self.world == 1 else f" (rank(s) {', '.join(str(r) for r, _ in failed)})"
            raise RewardServiceError(failed[0][1] + where)

    def _check_same_config(self) -> None:
        """Every rank must run the same config (each node parses its own command line)."""
        if self.world == 1:
            return
        mine = json.dumps(self.cfg.to_dict(), sort_keys=True, default=str)
        everyone: list = [None] * self.world
        torch.distributed.all_gather_object(everyone, mine)
        for rank, theirs in enumerate(everyone):
            if theirs != mine:
                a, b = json.loads(everyone[0]), json.loads(theirs)
                diff = [
                    f"{sec}.{k}: {a[sec][k]!r} (rank 0) vs {b[sec].get(k)!r} (rank {rank})"
                    for sec in a
                    for k in a[sec]
                    if a[sec][k] != b[sec].get(k)
                ]
                raise RuntimeError(
                    "ranks were started with different configs; give every node the same "
                    "recipe and overrides. Differences: " + "; ".join(diff[:5])
                )

    # -- signals: SIGTERM/SIGINT -> checkpoint at the next safe point, then stop --------------------
    def _install_signal_handlers(self) -> None:
        self._stop_signal = 0
        self._old_handlers = {}

        def handler(signum, frame):
            if self._stop_signal:  # a second signal: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._stop_signal = signum
            print(
                f"[rank {self.rank}] {signal.Signals(signum).name}: checkpointing at the next "
                "safe point (end of this rollout or update); send it again to stop at once",
                flush=True,
            )

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (embedded use): leave signals alone
                pass

    def _stop_requested(self) -> int:
        """The signal any rank received (0 = none); collective, so all ranks stop together."""
        flag = int(getattr(self, "_stop_signal", 0))
        if self.world > 1:
            t = torch.tensor([flag], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def _stop(self, signum: int, last_done: int) -> None:
        """Checkpoint the state after epoch `last_done` (unless it is on disk) and stop."""
        ckpt = None
        if last_done >= 0:
            ckpt = self.run_dir / "checkpoints" / f"checkpoint-{last_done}"
            if checkpoint_problem(ckpt) is not None:
                ckpt = self.save_checkpoint(last_done)
        raise TrainingInterrupted(signum, ckpt)

    def _broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _model_path(self) -> str:
        out = resolve_model_path(self.cfg, self.run_dir, build=self.rank == 0)
        if self.world > 1:
            torch.distributed.barrier()
        return out

    # -- one epoch --------------------------------------------------------------------------------
    def _generator(self, *keys: int) -> torch.Generator:
        seed = self.cfg.train.seed
        for k in keys:  # deterministic mix of (seed, epoch, rank, ...): all ranks agree
            seed = (seed * 1_000_003 + k + 7) % (2**61 - 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _schedule(self) -> torch.Tensor:
        """(T+1,) sigmas of training rollouts; sets Flow-SDE's sigma_max (used by _rescore)."""
        probe = self.adapter.initial_noise(1, self._generator(-1))
        sigmas = rollout_sigmas(self.adapter, self.cfg, probe)
        # Flow-SDE's substitute for sigma == 1 (used again when re-scoring in update())
        self.sigma_max = float(sigmas[1])
        return sigmas

    def _plan_shape(self) -> tuple[int, int]:
        """(K trained transitions, R images) per sample; the same for every epoch and batch."""
        plan = self.plan.step_plan(self._schedule(), 0, 0)
        return len(plan.trained), plan.images_per_sample

    def _score(self, images, prompts, metadata):
        """The reward on a worker thread, timed: (RewardOutput, seconds)."""
        t0 = time.perf_counter()
        out = self.reward(images, prompts, metadata)
        return out, time.perf_counter() - t0

    def rollout(self, epoch: int) -> EpochData:
        """Sample the epoch's batches under the plan's declaration; score images on workers."""
        cfg = self.cfg
        items = self.sampler.epoch_items(epoch, contiguous_groups=self.plan.shares_prefix)
        embeds = self.adapter.encode_prompts([it.prompt for it in items])
        bs = cfg.rollout.batch_size
        gen = self._generator(epoch, self.rank)
        sigmas = self._schedule()
        self.engine.module.eval()
        parts, futures, t_sample, t_decode, firsts = [], [], 0.0, 0.0, []
        batches = progress(
            range(cfg.rollout.num_batches), desc=f"sample {epoch}", enabled=self.show
        )
        for b in batches:
            idx = list(range(b * bs, (b + 1) * bs))
            step_plan = self.plan.step_plan(sigmas, epoch, b)
            firsts.append(step_plan.trained[0])
            t0 = time.perf_counter()
            ro = sample_rollout(self.adapter, embeds.index(idx), step_plan, sigmas, cfg, gen)
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
            rollout=Rollout.cat(parts),
            rewards=torch.cat([o.scores for o in outs]),
            details=details,
            group_ids=torch.tensor([it.group_id * r + i for it in items for i in range(r)]),
            metrics={
                "time/sample_s": t_sample,
                "time/decode_s": t_decode,
                "time/reward_s": float(sum(secs)),  # on workers, overlapping sampling
                "time/reward_wait_s": time.perf_counter() - t_wait,
                "rollout/first_trained_step": float(np.mean(firsts)),
            },
        )

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

    @contextlib.contextmanager
    def _reference_policy(self):
        with self.engine.reference() as ref_module:
            policy = self.adapter.trainable_module
            self.adapter.set_trainable_module(ref_module)
            try:
                yield
            finally:
                self.adapter.set_trainable_module(policy)

    def _rescore(self, ro: Rollout, j: int, embeds) -> object:
        s = self.cfg.sampling
        v = self.adapter.velocity(ro.latents[:, j], ro.sigmas[:, j], embeds)
        step = sde_step_with_logprob
        extra = {}
        if getattr(self, "kernel_backend", "torch") == "triton":
            from flowpo.kernels import fused_sde_step as step  # same numbers, one fused pass

            # the mean is written only for its readers: the KL term and RatioNorm
            extra["mean_out"] = self.cfg.train.beta > 0 or self.cfg.train.ratio_norm
        return step(
            ro.latents[:, j],
            v,
            ro.sigmas[:, j],
            ro.sigmas_next[:, j],
            ro.noise_levels[:, j],
            sde_type=s.sde_type,
            prev_sample=ro.next_latents[:, j],
            reduce=s.logprob_reduce,
            sigma_max=self.sigma_max,
            cps_legacy_scale=s.cps_legacy_scale,
            **extra,
        )

    def _loss(self, sub: Rollout, j: int, emb, adv: torch.Tensor):
        """Loss and stats of trained transition j of a micro-batch. Rows sharing an anchor
        (branches off one latent) share one transformer forward."""
        cfg, t = self.cfg, self.cfg.train
        with shared_anchor_forward(self.adapter, sub.anchors[:, j]):
            step = self._rescore(sub, j, emb)
            if t.beta > 0:
                with torch.no_grad(), self._reference_policy():
                    ref = self._rescore(sub, j, emb)
        dt = sub.sigmas_next[:, j] - sub.sigmas[:, j]
        if t.ratio_norm:  # GRPO-Guard: ratio = exp(mean_D(eps * dmu)), old log-ratio 0
            logp = ratio_norm_log_ratio(
                sub.next_latents[:, j],
                step.mean,
                sub.means[:, j],
                step.std,
                reduce=cfg.sampling.logprob_reduce,
            )
            old = torch.zeros_like(logp)
        else:
            logp, old = step.log_prob, sub.log_probs[:, j]
        weight = gradient_reweight_factor(dt).expand_as(adv) if t.gradient_reweight else None
        loss, st = clipped_policy_loss(logp, old, adv, cfg.clip_low, cfg.clip_high, weight=weight)
        if t.beta > 0:
            kl = kl_to_reference(
                step.mean,
                ref.mean,
                step.std,
                dt,
                estimator=t.kl_estimator,
                # the published estimator is defined on per-element means
                reduce="mean" if t.kl_estimator == "flow_grpo" else cfg.sampling.logprob_reduce,
            ).mean()
            loss = loss + t.beta * kl
            st["kl"] = kl.detach()
        st["loss"] = loss.detach()
        return loss, st

    def update(self, data: EpochData, adv: torch.Tensor, epoch: int) -> dict[str, float]:
        """Re-score every stored transition under the current policy; one backward per
        (micro-batch, trained transition), so DeepSpeed steps at each accumulation boundary."""
        t0 = time.perf_counter()
        ro = data.rollout
        self._ema_update()  # builds the EMA from the weights before this epoch's first step
        self.engine.module.train()
        n, r = ro.log_probs.shape[0], ro.images_per_sample
        adv = adv.reshape(n, r)  # transition j of a sample is judged by its image min(j, R-1)
        mb = self.sizes["micro_batch_size"]
        acc: dict[str, list[float]] = {}
        first_dev = 0.0
        steps = progress(range(0, n, mb), desc=f"train {epoch}", enabled=self.show)
        for start in steps:
            idx = list(range(start, start + mb))
            sub, emb = ro.index(idx), data.embeds.index(idx)
            for j in range(ro.num_trained):
                a = adv[idx, min(j, r - 1)].to(self.device)
                loss, st = self._loss(sub, j, emb, a)
                self.engine.backward(loss)
                self.engine.step()
                self._ema_update()
                for k, v in st.items():
                    acc.setdefault(k, []).append(float(v))
                if start == 0:  # no optimizer step yet: the ratio must be exactly 1
                    first_dev = max(first_dev, float(st["ratio_max_dev"]))
        out = {f"train/{k}": float(np.mean(v)) for k, v in acc.items()}
        out["train/first_ratio_max_dev"] = first_dev
        out = self._reduce_metrics(out, maxed=("train/first_ratio_max_dev",))
        out["train/grad_norm"] = self.engine.grad_norm()
        out["time/train_s"] = time.perf_counter() - t0
        out.update(data.metrics)
        return out

    def _reduce_metrics(self, metrics: dict[str, float], maxed=()) -> dict[str, float]:
        """Mean over ranks (max for the keys in `maxed`), so logs describe the global batch."""
        if self.world == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        m = torch.tensor([metrics[k] if k in maxed else 0.0 for k in keys], dtype=torch.float64)
        m = m.to(self.device)
        torch.distributed.all_reduce(t)
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
        return {k: float(m[i] if k in maxed else t[i] / self.world) for i, k in enumerate(keys)}

    # -- EMA (train.ema) --------------------------------------------------------------------------
    @property
    def ema(self) -> EMA | None:
        """EMA of the trainable weights when train.ema is on (built on first use), else None."""
        t = self.cfg.train
        if not t.ema:
            return None
        if getattr(self, "_ema", None) is None:
            self._ema = EMA(
                self.engine.module,
                decay=t.ema_decay,
                update_interval=t.ema_update_interval,
                warmup=t.ema_warmup,
            )
            self._ema_seen = self.engine.optimizer_steps
        return self._ema

    def ema_scope(self):
        """Context manager: the EMA weights inside the block (evaluation, export); a no-op
        without train.ema. Usage: `with self.ema_scope(): res = run_eval(...)`."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _ema_update(self) -> None:
        """Fold the weights into the EMA after each optimizer step (DeepSpeed steps only at the
        accumulation boundary, so the step counter, not the call, decides)."""
        if self.ema is None:
            return
        steps = self.engine.optimizer_steps
        if steps != self._ema_seen:
            self._ema_seen = steps
            self.ema.update(steps)

    def _save_ema(self, ckpt_dir: Path) -> None:
        if self.ema is not None:
            self.ema.save_checkpoint(ckpt_dir, self.rank, self.engine.trainable_state_dict)

    def _load_ema(self, ckpt_dir: Path) -> None:
        if self.ema is not None and self.ema.load_checkpoint(ckpt_dir, self.rank):
            self._ema_seen = self.engine.optimizer_steps

    # -- evaluation, checkpoints -------------------------------------------------------------------
    def evaluate(self, tag: str, epoch: int) -> EvalResult:
        """ODE samples for the fixed (prompt, seed) pairs: reward, per-tag accuracy, grid PNG."""
        self.engine.module.eval()
        with self.ema_scope():  # EMA weights (when train.ema) for evaluation
            res = run_eval(self.adapter, self.reward, self.cfg, show_progress=self.show)
        if self.rank == 0:
            path = save_eval_grid(res, self.run_dir / f"samples_{tag}.png")
            if path is not None:
                self.logger.log_image(f"samples/{tag}", path, step=epoch)
            self.logger.log(res.metrics(), step=epoch)
        acc = res.accuracy.get("overall")
        print0(
            f"eval [{tag}] reward {res.reward_mean:.4f} ± {res.reward_std:.4f}"
            + (
                f" | strict accuracy {acc:.3f} ({res.num_samples} samples)"
                if acc is not None
                else ""
            ),
            rank=self.rank,
        )
        return res

    def save_checkpoint(self, epoch: int) -> Path:
        root = self.run_dir / "checkpoints"
        final = root / f"checkpoint-{epoch}"
        tmp = root / f".tmp-checkpoint-{epoch}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.world > 1:
            torch.distributed.barrier()
        self.engine.save(tmp, client_state={"epoch": epoch})
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(rng, tmp / f"rng_rank{self.rank}.pt")
        self._save_ema(tmp)
        trainable = self.engine.trainable_state_dict()
        if self.rank == 0:
            from safetensors.torch import save_file

            save_file(trainable, str(tmp / "trainable.safetensors"))
            state = {
                "epoch": epoch,
                "lora": self.cfg.train.lora,
                # full fine-tuning of a subset (Bagel's moe_gen): the file holds only that subset
                "partial": not self.cfg.train.lora
                and any(not p.requires_grad for p in self.engine.module.module.parameters()),
                "history": self.history,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            self.cfg.save(tmp / "config.yaml")
        if self.world > 1:
            torch.distributed.barrier()
        if self.rank == 0:
            write_manifest(tmp)  # last file in: a checkpoint without it is incomplete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = root / ".latest.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, root / "latest")  # updated last: a partial save is never latest
            self._prune(root)
        if self.world > 1:
            torch.distributed.barrier()
        return final

    def _prune(self, root: Path) -> None:
        keep = self.cfg.checkpoint.keep_last_n
        ckpts = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self, ckpt: Path) -> None:
        client = self.engine.load(ckpt)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        rng_file = ckpt / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.start_epoch = int(client.get("epoch", state["epoch"])) + 1
        self.history = state.get("history", {})
        self._load_ema(ckpt)
        print0(f"resumed from {ckpt} at epoch {self.start_epoch}", rank=self.rank)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.time()
        if "eval_start" not in self.history:
            self.history["eval_start"] = asdict_eval(self.evaluate("start", self.start_epoch))
        last = None
        for epoch in range(self.start_epoch, cfg.train.epochs):
            te = time.time()
            data = self.rollout(epoch)
            if sig := self._stop_requested():  # weights are still those after epoch - 1
                self._stop(sig, epoch - 1)
            adv, stats = self.advantages(data)
            metrics = self.update(data, adv, epoch)
            metrics.update(stats)
            metrics["time/epoch_s"] = time.time() - te
            self.history["epoch"] = epoch
            self.history.setdefault("train_reward", []).append(
                [stats["reward_mean"], stats["reward_std"]]
            )
            self.logger.log(metrics, step=epoch)
            print0(
                f"epoch {epoch:3d} | reward {stats['reward_mean']:.4f} ± {stats['reward_std']:.4f}"
                f" | loss {metrics['train/loss']:+.2e} | clipfrac "
                f"{metrics['train/clipfrac_high'] + metrics['train/clipfrac_low']:.3f}"
                f" | {metrics['time/epoch_s']:.1f}s",
                rank=self.rank,
            )
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
        end = self.evaluate("end", cfg.train.epochs - 1)
        self.history["eval_end"] = asdict_eval(end)
        return self._finish(time.time() - t0, end)

    def _finish(self, seconds: float, end: EvalResult) -> dict:
        h = self.history
        start = h["eval_start"]
        summary = {"eval_start": start, "eval_end": h["eval_end"], "seconds": seconds}
        if h.get("train_reward"):
            summary["train_reward_first"], summary["train_reward_first_std"] = h["train_reward"][0]
            summary["train_reward_last"], summary["train_reward_last_std"] = h["train_reward"][-1]
        if self.rank != 0:
            return summary
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            plot_curves(
                metrics,
                self.run_dir / "reward_curve.png",
                [("reward_mean", "reward_std"), ("eval/reward_mean", None)],
                title=f"reward ({', '.join(self.cfg.reward.weights)})",
            )
            if end.accuracy:
                plot_curves(
                    metrics,
                    self.run_dir / "accuracy_curve.png",
                    [(f"eval/acc/{k}", None) for k in end.accuracy],
                    title="held-out strict accuracy (ODE, fixed seeds)",
                )
        print0("\n== summary ==", rank=0)
        print0(
            f"eval reward (ODE, fixed seeds): start {start['reward_mean']:.4f} ± "
            f"{start['reward_std']:.4f} -> end {end.reward_mean:.4f} ± {end.reward_std:.4f}",
            rank=0,
        )
        if "train_reward_first" in summary:
            print0(
                f"train reward (SDE rollouts): first epoch {summary['train_reward_first']:.4f} ± "
                f"{summary['train_reward_first_std']:.4f} -> last epoch "
                f"{summary['train_reward_last']:.4f} ± {summary['train_reward_last_std']:.4f}",
                rank=0,
            )
        if end.accuracy:
            before = EvalResult(
                start["reward_mean"],
                start["reward_std"],
                start["num_samples"],
                start["accuracy"],
                start["counts"],
            )
            print0(f"strict accuracy per tag ({end.num_samples} samples):", rank=0)
            print0(accuracy_table(before, end), rank=0)
        print0(f"wall time {seconds:.0f}s; run directory: {self.run_dir}", rank=0)
        return summary

    def close(self, clean: bool = True) -> None:
        """Release workers, sinks and the process group (no barrier after a failure: the other
        ranks may never reach it)."""
        from flowpo.trainer.engine import close_distributed

        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=True)
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        close_distributed(barrier=clean)
