"""The policy update of one stored transition: re-score it under the current policy, then the
clipped objective (docs/algorithms.md §4) with GRPO-Guard's RatioNorm and gradient reweighting (§5)
and the KL to the reference policy. The trainer calls `step_loss` once per (micro-batch, trained
transition) and backpropagates its loss; the invariant tests call the same functions, so they
check the path that trains, kernel dispatch included.

Backends (train.kernels, resolved once by the trainer; docs/kernels.md): "torch" computes
everything with `flowpo.sde` and `trainer.losses`. "triton" re-scores through the fused log-prob
kernel and, with train.ratio_norm, computes GRPO-Guard's whole policy loss (RatioNorm, clipping,
gradient reweight; forward and backward) in the fused `guard_clipped_loss` kernel. The KL term
stays outside that kernel: it needs the reference policy's mean, a second forward.

Shapes: B samples of the micro-batch, K trained transitions (j indexes them), D latent elements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from flowpo.config import Config
from flowpo.sde import SDEStep, sde_step_with_logprob
from flowpo.trainer.losses import (
    clipped_policy_loss,
    gradient_reweight_factor,
    kl_to_reference,
    ratio_norm_log_ratio,
)
from flowpo.trainer.rollout import Rollout, shared_anchor_forward


def _backend(cfg: Config, ro: Rollout, backend: str | None) -> str:
    if backend is not None:
        return backend
    from flowpo.kernels import resolve_backend

    return resolve_backend(cfg.train.kernels, ro.latents.device)


def score_step(
    ro: Rollout,
    j: int,
    v: Tensor,
    cfg: Config,
    *,
    sigma_max: float,
    backend: str,
    mean_out: bool = True,
) -> SDEStep:
    """The SDE step's log-density of stored transition j's next latent under velocity v (B, ...):
    log_prob (B,), differentiable; mean (None when the triton backend is told mean_out=False);
    std. backend: "torch" (flowpo.sde) or "triton" (the fused kernel, one pass)."""
    s = cfg.sampling
    step = sde_step_with_logprob
    extra = {}
    if backend == "triton":
        from flowpo.kernels import fused_sde_step as step  # same numbers, one fused pass

        extra["mean_out"] = mean_out
    return step(
        ro.latents[:, j],
        v,
        ro.sigmas[:, j],
        ro.sigmas_next[:, j],
        ro.noise_levels[:, j],
        sde_type=s.sde_type,
        prev_sample=ro.next_latents[:, j],
        reduce=s.logprob_reduce,
        sigma_max=sigma_max,
        cps_legacy_scale=s.cps_legacy_scale,
        **extra,
    )


def rescore(
    adapter,
    ro: Rollout,
    j: int,
    embeds,
    cfg: Config,
    *,
    sigma_max: float,
    backend: str | None = None,
) -> SDEStep:
    """Re-score trained transition j of the stored rollout `ro` (B samples) under the adapter's
    current policy: one velocity forward, then the SDE step's log-density of the stored next
    latent (log_prob (B,), differentiable; mean, std).

    sigma_max: Flow-SDE's substitute for sigma == 1, sigmas[1] of the rollout schedule.
    backend: "torch" (flowpo.sde) or "triton" (the fused kernel, same numbers, one pass); None
        resolves train.kernels for the latents' device, as the trainer does at setup.
    """
    backend = _backend(cfg, ro, backend)
    v = adapter.velocity(ro.latents[:, j], ro.sigmas[:, j], embeds)
    # the mean is written only for its readers: the KL term and RatioNorm
    mean_out = cfg.train.beta > 0 or cfg.train.ratio_norm
    return score_step(ro, j, v, cfg, sigma_max=sigma_max, backend=backend, mean_out=mean_out)


def guard_kernel_loss(
    ro: Rollout, j: int, v: Tensor, adv: Tensor, cfg: Config, *, sigma_max: float
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """GRPO-Guard's policy loss of transition j through the fused kernel
    (`flowpo.kernels.guard_clipped_loss`): the numbers of the torch path of `step_loss`
    (`ratio_norm_log_ratio` into `clipped_policy_loss`, weighted by `gradient_reweight_factor`)
    with its backward into v. Returns (loss, the stats of `clipped_policy_loss`, the normalised
    log-ratio z (B,), detached)."""
    from flowpo.kernels import guard_clipped_loss

    s = cfg.sampling
    loss, st = guard_clipped_loss(
        v,
        ro.latents[:, j],
        ro.next_latents[:, j],
        ro.means[:, j],
        ro.sigmas[:, j],
        ro.sigmas_next[:, j],
        ro.noise_levels[:, j],
        adv,
        cfg.clip_low,
        cfg.clip_high,
        sde_type=s.sde_type,
        gradient_reweight=cfg.train.gradient_reweight,
        sigma_max=sigma_max,
        reduce=s.logprob_reduce,
    )
    z = st.pop("log_ratio")
    st.pop("clipped")  # per sample; the trainer logs 0-dim stats
    return loss, st, z


@dataclass
class StepLoss:
    loss: Tensor  # scalar, differentiable: what the trainer backpropagates
    stats: dict[str, Tensor]  # detached 0-dim: clipped_policy_loss's keys, loss, kl (beta > 0)
    # the policy's re-scored step (log_prob differentiable); None where nothing needs it: the
    # fused Guard kernel without a KL term, and the forward-process algorithms
    step: SDEStep | None
    # the log-probabilities the loss is made of (grpo: re-scored and stored; the fused Guard
    # kernel: its normalised log-ratio and the stored log-prob), which the trainer checks for
    # NaN/inf before the optimizer step (trainer/nonfinite.py)
    log_probs: tuple[Tensor, ...] = ()


def step_loss(
    adapter,
    ro: Rollout,
    j: int,
    embeds,
    adv: Tensor,
    cfg: Config,
    *,
    sigma_max: float,
    backend: str | None = None,
    reference: Callable[[], AbstractContextManager] | None = None,
) -> StepLoss:
    """Loss and stats of trained transition j of a micro-batch `ro` with advantages adv (B,).
    Rows sharing an anchor (branches off one latent) share one transformer forward.

    reference: a context-manager factory under which the adapter runs the reference policy
        (the trainer's `reference_policy`); needed when train.beta > 0 (the KL term).
    sigma_max, backend: as for `rescore`.
    """
    t = cfg.train
    if t.beta > 0 and reference is None:
        raise ValueError("train.beta > 0: step_loss needs `reference` for the KL term")
    backend = _backend(cfg, ro, backend)
    with shared_anchor_forward(adapter, ro.anchors[:, j]):
        v = adapter.velocity(ro.latents[:, j], ro.sigmas[:, j], embeds)
        if t.beta > 0:
            with torch.no_grad(), reference():
                ref = rescore(adapter, ro, j, embeds, cfg, sigma_max=sigma_max, backend=backend)
    dt = ro.sigmas_next[:, j] - ro.sigmas[:, j]
    if t.ratio_norm and backend == "triton":
        # GRPO-Guard in one fused kernel, forward and backward; the policy's step is scored
        # only for the KL term's mean
        loss, st, z = guard_kernel_loss(ro, j, v, adv, cfg, sigma_max=sigma_max)
        step = None
        if t.beta > 0:
            step = score_step(ro, j, v, cfg, sigma_max=sigma_max, backend=backend)
        log_probs = (z, ro.log_probs[:, j])
    else:
        step = score_step(ro, j, v, cfg, sigma_max=sigma_max, backend=backend,
                          mean_out=t.beta > 0 or t.ratio_norm)  # fmt: skip
        if t.ratio_norm:  # GRPO-Guard: ratio = exp(mean_D(eps * dmu)), old log-ratio 0
            logp = ratio_norm_log_ratio(
                ro.next_latents[:, j],
                step.mean,
                ro.means[:, j],
                step.std,
                reduce=cfg.sampling.logprob_reduce,
            )
            old = torch.zeros_like(logp)
        else:
            logp, old = step.log_prob, ro.log_probs[:, j]
        weight = gradient_reweight_factor(dt).expand_as(adv) if t.gradient_reweight else None
        loss, st = clipped_policy_loss(logp, old, adv, cfg.clip_low, cfg.clip_high, weight=weight)
        log_probs = (step.log_prob, ro.log_probs[:, j])
    if t.beta > 0:
        kl = kl_to_reference(
            step.mean,
            ref.mean,
            step.std,
            dt,
            estimator=t.kl_estimator,
            # the published estimator is defined on per-element means
            reduce="mean" if t.kl_estimator == "flow_grpo" else cfg.sampling.logprob_reduce,
            sde_type=cfg.sampling.sde_type,  # flow_grpo's std differs per SDE type
        ).mean()
        loss = loss + t.beta * kl
        st["kl"] = kl.detach()
    st["loss"] = loss.detach()
    return StepLoss(loss=loss, stats=st, step=step, log_probs=log_probs)


@contextlib.contextmanager
def reference_policy(adapter, engine):
    """The adapter runs the engine's frozen reference policy inside the block (LoRA adapters
    disabled, or the frozen copy of full fine-tuning); the policy is restored on exit."""
    with engine.reference() as ref_module:
        policy = adapter.trainable_module
        adapter.set_trainable_module(ref_module)
        try:
            yield
        finally:
            adapter.set_trainable_module(policy)
