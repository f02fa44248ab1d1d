"""Rollout plans and the sampler.

A plan declares, for a rollout of T steps, which steps are stochastic (SDE), their noise level,
and which steps are stored and trained. The sampler follows the declaration; the trainer
consumes `StepPlan.trained` and never asks for the plan's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowpo.config import Config
from flowpo.trainer.sde import ode_step, sde_step_with_logprob


@dataclass
class StepPlan:
    sde: list[bool]  # (T,) step k is stochastic
    noise_level: list[float]  # (T,) a per step (0 on ODE steps)
    trained: list[int]  # (K,) indices of stored and trained steps (all SDE steps)

    def __post_init__(self) -> None:
        bad = [k for k in self.trained if not self.sde[k]]
        if bad:
            raise ValueError(f"rollout plan trains ODE steps {bad}: only SDE steps have a log-prob")


PLAN_REGISTRY: dict[str, Callable[[Config], RolloutPlan]] = {}


def register_plan(name: str):
    def deco(cls):
        PLAN_REGISTRY[name] = cls
        return cls

    return deco


class RolloutPlan:
    def step_plan(self, num_steps: int, epoch: int) -> StepPlan:
        raise NotImplementedError


@register_plan("full")
class FullPlan(RolloutPlan):
    """Flow-GRPO: SDE at every step but the last (its Gaussian is too sharp); trains the first
    floor(T * timestep_fraction) of them."""

    def __init__(self, cfg: Config):
        self.noise_level = cfg.sampling.noise_level
        self.fraction = cfg.rollout.timestep_fraction

    def step_plan(self, num_steps: int, epoch: int) -> StepPlan:
        sde = [k < num_steps - 1 for k in range(num_steps)]
        k_train = max(1, min(num_steps - 1, math.floor(num_steps * self.fraction)))
        return StepPlan(
            sde=sde,
            noise_level=[self.noise_level if s else 0.0 for s in sde],
            trained=list(range(k_train)),
        )


def build_plan(cfg: Config) -> RolloutPlan:
    if cfg.rollout.plan not in PLAN_REGISTRY:
        known = ", ".join(sorted(PLAN_REGISTRY))
        raise ValueError(f"rollout.plan '{cfg.rollout.plan}' is unknown; choose one of: {known}")
    return PLAN_REGISTRY[cfg.rollout.plan](cfg)


@dataclass
class Rollout:
    """Stored transitions of one sampling batch (B images, K trained steps)."""

    latents: torch.Tensor  # (B, K, ...) x at the trained steps
    next_latents: torch.Tensor  # (B, K, ...) x' drawn by the SDE (treated as constant)
    log_probs: torch.Tensor  # (B, K) log pi_old(x' | x)
    means: torch.Tensor  # (B, K, ...) rollout SDE mean (GRPO-Guard's mu_old)
    sigmas: torch.Tensor  # (B, K) sigma of each trained step
    sigmas_next: torch.Tensor  # (B, K)
    noise_levels: torch.Tensor  # (B, K)
    final_latents: torch.Tensor  # (B, ...)

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        return Rollout(
            **{f: torch.cat([getattr(p, f) for p in parts], 0) for f in Rollout.__annotations__}
        )

    def index(self, idx) -> Rollout:
        return Rollout(**{f: getattr(self, f)[idx] for f in Rollout.__annotations__})


@torch.no_grad()
def sample_rollout(
    adapter,
    embeds,
    plan: StepPlan,
    sigmas: torch.Tensor,
    cfg: Config,
    generator: torch.Generator,
    latents: torch.Tensor | None = None,
) -> Rollout:
    """Run one batch of trajectories under `plan`; store the trained steps' transitions.

    sigmas: (T+1,) the model's schedule. The log-probs stored here are recomputed at training
    with the same function, latents, sigmas and batch, so the first ratio is exactly 1.
    """
    s = cfg.sampling
    n = len(embeds)
    x = adapter.initial_noise(n, generator) if latents is None else latents
    sigma_max = float(sigmas[1])
    stored: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "xn", "lp", "mu")}
    trained = set(plan.trained)
    for k in range(len(sigmas) - 1):
        sig = sigmas[k].expand(n)
        sig_next = sigmas[k + 1].expand(n)
        v = adapter.velocity(x, sig, embeds)
        if plan.sde[k]:
            step = sde_step_with_logprob(
                x,
                v,
                sig,
                sig_next,
                plan.noise_level[k],
                sde_type=s.sde_type,
                generator=generator,
                reduce=s.logprob_reduce,
                sigma_max=sigma_max,
                cps_legacy_scale=s.cps_legacy_scale,
            )
            if k in trained:
                stored["x"].append(x)
                stored["xn"].append(step.prev_sample)
                stored["lp"].append(step.log_prob)
                stored["mu"].append(step.mean)
            x = step.prev_sample
        else:
            x = ode_step(x, v, sig, sig_next)
    ks = torch.tensor(plan.trained)
    return Rollout(
        latents=torch.stack(stored["x"], 1),
        next_latents=torch.stack(stored["xn"], 1),
        log_probs=torch.stack(stored["lp"], 1),
        means=torch.stack(stored["mu"], 1),
        sigmas=sigmas[ks].unsqueeze(0).expand(n, -1).clone(),
        sigmas_next=sigmas[ks + 1].unsqueeze(0).expand(n, -1).clone(),
        noise_levels=torch.tensor([plan.noise_level[k] for k in plan.trained])
        .unsqueeze(0)
        .expand(n, -1)
        .clone(),
        final_latents=x,
    )


@torch.no_grad()
def sample_ode(adapter, embeds, num_steps: int, seeds: list[int]) -> torch.Tensor:
    """Deterministic evaluation samples: ODE at every step, initial noise from per-image seeds.

    Returns images (B, 3, H, W) in [0, 1]; the same (prompt, seed) always gives the same image.
    """
    noise = torch.cat([adapter.initial_noise(1, torch.Generator().manual_seed(sd)) for sd in seeds])
    x = noise
    sigmas = adapter.sigmas(num_steps, x)
    n = x.shape[0]
    for k in range(num_steps):
        v = adapter.velocity(x, sigmas[k].expand(n), embeds)
        x = ode_step(x, v, sigmas[k].expand(n), sigmas[k + 1].expand(n))
    return adapter.decode(x)
