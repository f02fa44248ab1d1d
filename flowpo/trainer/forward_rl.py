"""Forward-process RL on clean samples: DiffusionNFT (docs/algorithms.md §7) and Advantage
Weighted Matching (§8), the `nft` and `awm` entries of the algorithm registry.

Written from the papers (Zheng et al., arXiv 2509.16117; Xue et al., arXiv 2509.25050) and the
descriptions of their published training scripts; no code was copied. Neither needs a
likelihood of the sampler: a rollout stores only the clean final latents (and the trainer keeps
the prompt embeddings and rewards), and training noises them again with the forward process
x_t = (1 - t) x0 + t eps at K training times per sample.

Shapes: B samples of a micro-batch, K training times per sample, D latent elements.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from flowpo.config import Config, ConfigError
from flowpo.sde import ode_step
from flowpo.trainer.algorithm import Algorithm, register_algorithm
from flowpo.trainer.ema import EMA
from flowpo.trainer.losses import clipped_policy_loss
from flowpo.trainer.update import StepLoss, reference_policy

_PUBLISHED_DECAY_MAX = {"nft": 0.5, "awm": 0.3}


def _mean_d(x: Tensor) -> Tensor:
    """Per-sample mean over the D latent elements: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def optimality_probability(adv: Tensor, adv_clip_max: float, positive_only: bool = False) -> Tensor:
    """§7 (1): r = 1/2 + 1/2 clip(A / c, -1, 1) in [0, 1], c = train.adv_clip_max; A is the
    group-normalised advantage of §3, so the paper's normaliser Z_c is c x the reward std.
    positive_only (forward.nft_positive_only): r clipped to [1/2, 1], no negative branch."""
    lo = 0.0 if positive_only else -1.0
    return (0.5 + 0.5 * (adv / adv_clip_max).clamp(lo, 1.0)).clamp(0.0, 1.0)


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    r: Tensor,
    *,
    beta: float,
    adaptive: bool = True,
    scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's policy loss (§7 (2)-(4)) of B samples at times t (B,).

    v_theta (differentiable) and v_old (constant) are the current and old policy's velocities
    at x_t = (1 - t) x0 + t noise; the flow-matching target is u = noise - x0. The implicit
    policies are v+ = v_old + beta (v_theta - v_old) and v- = v_old - beta (v_theta - v_old)
    (the paper's (1 - beta) v_old + beta v_theta and (1 + beta) v_old - beta v_theta, written
    around v_old so that v_theta == v_old gives v+ == v- bit for bit). Per sample

        L = [r l(v+) + (1 - r) l(v-)] / beta * scale,

    with l(v) = mean_D((x0_hat - x0)^2) / sg(mean_D |x0_hat - x0|), x0_hat = x_t - t v (the
    adaptive weighting; = t^2 mean_D((v - u)^2) / sg(t mean_D |v - u|)), or, with
    adaptive=False, l(v) = mean_D((v - u)^2). Returns (mean over B, detached stats).
    """
    tb = t.reshape(-1, *([1] * (x0.dim() - 1))).to(v_theta.dtype)
    xt = (1 - tb) * x0 + tb * noise
    v_old = v_old.detach()
    delta = v_theta - v_old
    v_pos, v_neg = v_old + beta * delta, v_old - beta * delta

    def branch(v: Tensor) -> Tensor:
        if not adaptive:
            return _mean_d((v - (noise - x0)) ** 2)
        err = xt - tb * v - x0
        with torch.no_grad():  # the weight is a constant (stop-gradient), clipped away from 0
            w = _mean_d(err.abs().double()).clamp_min(1e-5).to(err.dtype)
        return _mean_d(err**2) / w

    l_pos, l_neg = branch(v_pos), branch(v_neg)
    per = (r * l_pos + (1 - r) * l_neg) / beta * scale
    loss = per.mean()
    stats = {
        "policy_loss": loss.detach(),
        "positive_loss": l_pos.mean().detach(),
        "negative_loss": l_neg.mean().detach(),
        "old_deviation": _mean_d(delta.detach() ** 2).mean(),
        "r_mean": r.float().mean().detach(),
    }
    return loss, stats


def awm_log_likelihood(
    v: Tensor, x0: Tensor, noise: Tensor, t: Tensor, *, weighting: str, power: float = 0.25
) -> Tensor:
    """§8 (1): AWM's per-sample log-likelihood surrogate -w(t) mean_D((v - u)^2), u = noise - x0,
    with the published weightings uniform (1), t, t2 (t^2), huber ((sqrt(e + 1e-10) - 1e-5) t)
    and ghuber (the generalised Huber ((e + 1e-10)^p - 1e-10^p) t / p), e = mean_D((v - u)^2)."""
    err = _mean_d((v.double() - (noise.double() - x0.double())) ** 2)
    td = t.double().reshape(-1)
    if weighting == "uniform":
        return -err
    if weighting == "t":
        return -err * td
    if weighting == "t2":
        return -err * td**2
    if weighting == "huber":
        return -(torch.sqrt(err + 1e-10) - 1e-5) * td
    if weighting == "ghuber":
        floor = torch.tensor(1e-10, dtype=err.dtype, device=err.device)
        return -((err + 1e-10) ** power - floor**power) * td / power
    raise ValueError(f"forward.awm_weighting={weighting!r} is unknown")


def awm_policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """§8 (2): PPO-clip on AWM's log-likelihood surrogate (B,), advantages adv (B,) already
    scaled; returns (float32 loss, float32 detached stats with clipped_policy_loss's keys)."""
    loss, stats = clipped_policy_loss(logp, old_logp, adv, clip_range, clip_range)
    return loss.float(), {k: v.float() for k, v in stats.items()}


def old_policy_decay(cfg: Config, optimizer_steps: int) -> float:
    """§7 (5): eta = min(rate * max(n - delay, 0), max), n = optimizer steps so far."""
    f = cfg.forward
    cap = f.old_decay_max if f.old_decay_max >= 0 else _PUBLISHED_DECAY_MAX[cfg.train.algorithm]
    if optimizer_steps < f.old_decay_delay:
        return 0.0
    return min(f.old_decay_rate * (optimizer_steps - f.old_decay_delay), cap)


class OldPolicy:
    """The old policy: a float32 EMA of the trainable weights (this rank's shards under ZeRO-3,
    the LoRA weights under LoRA), switched into the engine's module inside `applied()` the way
    the reference policy is. Starts as a copy of the weights; `fold(eta)` after each epoch sets
    old <- eta old + (1 - eta) theta.

    refresh: the engine's `refresh_gathered`, run around each swap (see `EMA`)."""

    def __init__(self, module, refresh=None):
        self.ema = EMA(module, decay=0.0, update_interval=1, warmup=False, refresh=refresh)

    @torch.no_grad()
    def fold(self, eta: float) -> None:
        for n, p in self.ema.params.items():
            d = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            self.ema.shadow[n].mul_(eta).add_(d.float(), alpha=1.0 - eta)

    def applied(self):
        return self.ema.applied()

    def save(self, path) -> None:
        self.ema.save(path)

    def load(self, path) -> None:
        self.ema.load(path)


@dataclass
class CleanRollout:
    """What nft/awm store of a sampling batch: the clean final latents (B, 1, ...)."""

    final_latents: Tensor
    num_trained: int  # K training times per sample

    @property
    def images_per_sample(self) -> int:
        return 1

    def index(self, idx) -> CleanRollout:
        return CleanRollout(self.final_latents[idx], self.num_trained)

    @staticmethod
    def cat(parts: list[CleanRollout]) -> CleanRollout:
        return CleanRollout(torch.cat([p.final_latents for p in parts]), parts[0].num_trained)


class _ForwardRL(Algorithm):
    """Shared by nft and awm: ODE rollouts, K forward-process training times per sample, the
    old (EMA) policy folded after every epoch and checkpointed per rank."""

    default_times = "schedule"
    sample_with_old = True
    rollouts = "ODE rollouts of the old policy"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        t, r, name = cfg.train, cfg.rollout, cfg.train.algorithm
        grpo_only = [
            ("rollout.plan", r.plan != "full", "full"),
            ("train.ratio_norm", t.ratio_norm, "false"),
            ("train.gradient_reweight", t.gradient_reweight, "false"),
            ("train.clip_range_low", t.clip_range_low >= 0, "-1"),
            ("train.clip_range_high", t.clip_range_high >= 0, "-1"),
            ("train.kl_estimator", t.kl_estimator != "flow_grpo", "flow_grpo"),
            ("sampling.sde_type", cfg.sampling.sde_type != "flow", "flow"),
            ("sampling.logprob_reduce", cfg.sampling.logprob_reduce != "mean", "mean"),
            ("sampling.cps_legacy_scale", cfg.sampling.cps_legacy_scale, "false"),
        ]
        for key, bad, default in grpo_only:
            if bad:
                raise ConfigError(
                    f"{key} applies to train.algorithm=grpo only; with {name} leave it at "
                    f"{default} (nft/awm sample by ODE and train on the forward process)"
                )
        k, steps = cls.num_times(cfg), cfg.sampling.num_steps
        times = cls.times_mode_of(cfg)
        lim = int(steps * r.timestep_fraction) if times == "stratified" else steps + 1
        if not 1 <= k <= lim - 1:
            raise ConfigError(
                f"{name}: forward.num_times={cfg.forward.num_times} gives K={k} training times, "
                f"but {times} times allow 1..{lim - 1} (sampling.num_steps={steps}, "
                f"rollout.timestep_fraction={r.timestep_fraction}); set forward.num_times"
            )
        if cfg.forward.rollout_guidance_scale < 0:
            raise ConfigError(
                f"forward.rollout_guidance_scale ({cfg.forward.rollout_guidance_scale}) must be "
                ">= 0 (0 = sampling.guidance_scale, 1 = CFG-free rollouts)"
            )
        if cfg.forward.nft_beta <= 0:
            raise ConfigError(f"forward.nft_beta ({cfg.forward.nft_beta}) must be > 0")
        if cfg.forward.old_decay_rate < 0 or cfg.forward.old_decay_max >= 1:
            raise ConfigError(
                f"forward.old_decay_rate ({cfg.forward.old_decay_rate}) must be >= 0 and "
                f"forward.old_decay_max ({cfg.forward.old_decay_max}) < 1 (< 0: the published cap)"
            )

    @classmethod
    def times_mode_of(cls, cfg: Config) -> str:
        return cfg.forward.times if cfg.forward.times != "auto" else cls.default_times

    @classmethod
    def num_times(cls, cfg: Config) -> int:
        """K; forward.num_times = 0: floor(T * fraction) (schedule), one less (stratified)."""
        lim = int(cfg.sampling.num_steps * cfg.rollout.timestep_fraction)
        if cfg.forward.num_times:
            return cfg.forward.num_times
        return lim - 1 if cls.times_mode_of(cfg) == "stratified" else lim

    def __init__(self, trainer):
        super().__init__(trainer)
        self.k = self.num_times(self.cfg)
        self._old: OldPolicy | None = None
        self.times_mode = self.times_mode_of(self.cfg)
        self.rollout_guidance_scale = self.cfg.forward.rollout_guidance_scale or None

    @property
    def old(self) -> OldPolicy:
        """Built on first use from the engine's weights at that moment: before the first
        rollout (a copy of the initial policy), or after a resume's load (then overwritten by
        the checkpoint's old-policy state)."""
        if self._old is None:
            engine = self.trainer.engine
            self._old = OldPolicy(engine.module, refresh=engine.refresh_gathered)
        return self._old

    def plan_shape(self) -> tuple[int, int]:
        return self.k, 1

    def states(self) -> dict:
        return {"old_policy": self.old}

    def _sampling_scope(self):
        return self.old.applied() if self.sample_with_old else contextlib.nullcontext()

    @torch.no_grad()
    def sample_batch(self, embeds, epoch, batch, sigmas, gen):
        """Deterministic ODE samples of the (old) policy over the rollout schedule; only the
        clean final latents are stored."""
        adapter = self.trainer.adapter
        x = adapter.initial_noise(len(embeds), gen)
        n = x.shape[0]
        with self._sampling_scope(), adapter.guidance(self.rollout_guidance_scale):
            for k in range(len(sigmas) - 1):
                v = adapter.velocity(x, sigmas[k].expand(n), embeds)
                x = ode_step(x, v, sigmas[k].expand(n), sigmas[k + 1].expand(n))
        return CleanRollout(x.float().unsqueeze(1), self.k), {}

    def cat(self, parts):
        return CleanRollout.cat(parts)

    def begin_update(self, data, epoch):
        t = self.trainer
        self._reference = lambda: reference_policy(t.adapter, t.engine)
        self._sigmas = t.schedule()
        self._per_rank = data.rollout.final_latents.shape[0]
        self._draws: dict[int, tuple[Tensor, Tensor]] = {}

    def _times_and_noise(self, sub: CleanRollout, epoch: int, start: int):
        """(B, K) training times and (B, K, ...) noise of the micro-batch starting at row
        `start`. Each sample draws its own from (seed, epoch, its global index rank * N + row),
        so a rerun, a resumed run, another micro-batch size and another rank count draw the
        same ones for the same sample."""
        if start in self._draws:
            return self._draws[start]
        t = self.trainer
        x0 = sub.final_latents[:, 0]
        b, dev = x0.shape[0], x0.device
        sig = self._sigmas.to(dev)
        steps = len(sig) - 1
        lim = int(self.cfg.sampling.num_steps * self.cfg.rollout.timestep_fraction)
        bounds = torch.linspace(1, lim, self.k + 1, device=dev)
        lo, hi = bounds[:-1].long(), bounds[1:].long()
        times, noise = [], []
        for i in range(b):
            gen = t._generator(epoch, 17, t.rank * self._per_rank + start + i)
            if self.times_mode == "schedule":  # K of the T schedule sigmas, no repeats
                keys = torch.rand(steps, generator=gen, device=dev)
                times.append(sig[keys.argsort()[: self.k]])
            else:  # one step index in [1, lim) per stratum
                u = torch.rand(self.k, generator=gen, device=dev)
                times.append(sig[lo + (u * (hi - lo)).long()])
            noise.append(
                torch.randn((self.k, *x0.shape[1:]), generator=gen, device=dev, dtype=torch.float32)
            )
        self._draws = {start: (torch.stack(times).float(), torch.stack(noise))}
        return self._draws[start]

    def _velocities(self, sub, j, embeds, epoch, start, *, old: bool):
        """(x0, noise, t, x_t, v_theta, v_old or None, v_ref or None) of item j."""
        times, noise = self._times_and_noise(sub, epoch, start)
        adapter = self.trainer.adapter
        x0, eps, t = sub.final_latents[:, 0], noise[:, j], times[:, j]
        tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - tb) * x0 + tb * eps
        v_old = v_ref = None
        if old:
            with torch.no_grad(), self.old.applied():
                v_old = adapter.velocity(xt, t, embeds)
        if self.cfg.train.beta > 0:
            with torch.no_grad(), self._reference():
                v_ref = adapter.velocity(xt, t, embeds)
        v = adapter.velocity(xt, t, embeds)
        return x0, eps, t, v, v_old, v_ref

    def _with_kl(self, loss, stats, v, v_ref):
        if v_ref is not None:
            kl = _mean_d((v - v_ref) ** 2).mean()
            loss = loss + self.cfg.train.beta * kl
            stats["kl"] = kl.detach()
        stats["loss"] = loss.detach()
        return loss, stats

    def end_update(self, epoch):
        eta = old_policy_decay(self.cfg, self.trainer.engine.optimizer_steps)
        self.old.fold(eta)
        return {"train/old_policy_decay": eta}


@register_algorithm("nft")
class NFT(_ForwardRL):
    """DiffusionNFT (§7): sampling and v_old from the old policy, loss `nft_loss`."""

    def loss(self, sub, j, embeds, adv, *, epoch, start) -> StepLoss:
        c = self.cfg.train.adv_clip_max
        x0, eps, t, v, v_old, v_ref = self._velocities(sub, j, embeds, epoch, start, old=True)
        r = optimality_probability(
            adv[:, 0].to(v.device).float(), c, positive_only=self.cfg.forward.nft_positive_only
        )
        loss, stats = nft_loss(
            v, v_old, x0, eps, t, r, beta=self.cfg.forward.nft_beta,
            adaptive=self.cfg.forward.adaptive_weighting, scale=c,
        )  # fmt: skip
        loss, stats = self._with_kl(loss, stats, v, v_ref)
        return StepLoss(loss=loss, stats=stats, step=None)


@register_algorithm("awm")
class AWM(_ForwardRL):
    """Advantage Weighted Matching (§8): on-policy ODE samples; the clipped ratio of AWM's
    flow-matching log-likelihood, KL to the reference and to the EMA (old) policy."""

    default_times = "stratified"
    sample_with_old = False
    rollouts = "ODE rollouts"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.train.steps_per_epoch != 1:
            raise ConfigError(
                "train.algorithm=awm takes one optimizer step per epoch (the published "
                f"on-policy setting; old log-likelihoods = the epoch's first pass), got "
                f"train.steps_per_epoch={cfg.train.steps_per_epoch}; set it to 1"
            )

    def loss(self, sub, j, embeds, adv, *, epoch, start) -> StepLoss:
        f, c = self.cfg.forward, self.cfg.train.adv_clip_max
        use_ema = f.awm_ema_beta > 0
        x0, eps, t, v, v_ema, v_ref = self._velocities(sub, j, embeds, epoch, start, old=use_ema)
        logp = awm_log_likelihood(
            v, x0, eps, t, weighting=f.awm_weighting, power=f.awm_ghuber_power
        )
        # one optimizer step per epoch: no step has been taken yet, so the old policy's value
        # is this forward's own, detached (ratio exactly 1, the gradient A * grad log p)
        a = adv[:, 0].to(v.device).double() / c * f.awm_adv_scale
        loss, stats = awm_policy_loss(logp, logp.detach(), a, f.awm_clip_range)
        stats["policy_loss"] = loss.detach()
        if use_ema:
            ema_kl = _mean_d((v - v_ema) ** 2).mean()
            loss = loss + f.awm_ema_beta * ema_kl
            stats["ema_kl"] = ema_kl.detach()
        loss, stats = self._with_kl(loss, stats, v, v_ref)
        return StepLoss(loss=loss, stats=stats, step=None)
