"""Torch references of the fused ops: what the kernels must compute, in float32 or float64.

The step math is `flowpo.trainer.sde` (ALGORITHMS.md §1) written once more so that it also runs
in float64 (the trainer's version computes in float32 whatever the input): tests compare the
kernels against it in float32 and against float64, and `gradcheck` runs on it. It takes the
kernels' arguments (prev_sample given, `sample` broadcastable from (S, ...)) and raises the same
errors. Benchmarks import their eager and compiled baselines from here.

Shapes: B batch, S = B or B / G or 1 rows of `sample`, D latent elements per image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowpo.kernels._args import (
    Scalar,
    check_guard,
    check_reduce,
    check_step,
    expand_sample,
)
from flowpo.trainer.sde import sde_step_with_logprob  # noqa: F401  (the trainer's eager path)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision overflows in the mean)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _col(t: Tensor) -> Tensor:
    """(B,) -> (B, 1): per-sample scalars against (B, D) rows."""
    return t.unsqueeze(1)


def step_std(
    sigma: Tensor, sigma_next: Tensor, noise_level: Tensor, *, sde_type: str, sigma_max: float
) -> Tensor:
    """(B,) std of the step (`trainer.sde.sde_std` without its checks and host syncs)."""
    dt = sigma_next - sigma
    if sde_type == "flow":
        s_tilde = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
        return noise_level * torch.sqrt(sigma / (1 - s_tilde)) * torch.sqrt(-dt)
    if sde_type == "dance":
        return noise_level * torch.sqrt(-dt)
    return sigma_next * torch.sin(noise_level * (math.pi / 2))


def step_increment(
    x: Tensor,
    v: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: Tensor,
    *,
    sde_type: str,
    sigma_max: float,
) -> tuple[Tensor, Tensor]:
    """mu - x (B, D) and std (B,), in x's dtype; x, v (B, D), the rest (B,). No checks, no host
    sync (so torch.compile sees one graph). Same formulas, in the same order, as
    `trainer.sde._mean_parts`: the increment is kept apart from x so that x' - mu is formed as
    (x' - x) - (mu - x), whose rounding error scales with the step, not with |x|."""
    s, s_next, a = (t.to(x.dtype) for t in (sigma, sigma_next, noise_level))
    dt = s_next - s
    x1_hat = x + _col(1 - s) * v  # predicted noise eps
    if sde_type == "flow":
        s_tilde = torch.where(s == 1, torch.full_like(s, sigma_max), s)
        sigma_t = a * torch.sqrt(s / (1 - s_tilde))
        std = sigma_t * torch.sqrt(-dt)
        delta = (v + _col(sigma_t.square() / (2 * s)) * x1_hat) * _col(dt)
    elif sde_type == "dance":
        std = a * torch.sqrt(-dt)
        delta = v * _col(dt) + 0.5 * _col(a.square()) * (x1_hat / _col(s)) * _col(dt)
    else:  # cps; c - s' = -std^2 / (c + s') has no cancellation (see trainer.sde)
        std = s_next * torch.sin(a * (math.pi / 2))
        c = torch.sqrt((s_next.square() - std.square()).clamp_min(0))
        denom = c + s_next
        c_minus = torch.where(denom > 0, -std.square() / denom.clamp_min(1e-30), 0.0)
        delta = _col(c_minus) * x + (_col(c_minus * (1 - s)) + _col(dt)) * v
    return delta, std


def sde_logprob_math(
    x: Tensor,
    v: Tensor,
    x_next: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: Tensor,
    *,
    sde_type: str = "flow",
    reduce: str = "mean",
    sigma_max: float = 0.5,
    cps_legacy_scale: bool = False,
) -> tuple[Tensor, Tensor]:
    """(log_prob (B,), mean (B, D)) from flat (B, D) tensors of one dtype; no checks.

    The sync-free core of `sde_step_logprob_ref`, also the `torch.compile` baseline."""
    delta, std = step_increment(
        x, v, sigma, sigma_next, noise_level, sde_type=sde_type, sigma_max=sigma_max
    )
    resid = (x_next - x) - delta
    sq = resid.square()
    sq = sq.mean(dim=1) if reduce == "mean" else sq.sum(dim=1)
    if cps_legacy_scale:
        log_prob = -sq
    else:
        n = 1 if reduce == "mean" else x.shape[1]  # per-element constants summed over D
        log_prob = -sq / (2 * std.square()) - n * (torch.log(std) + _HALF_LOG_2PI)
    return log_prob, x + delta


def sde_step_logprob_ref(
    sample: Tensor,
    velocity: Tensor,
    prev_sample: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sde_type: str = "flow",
    reduce: str = "mean",
    sigma_max: float | Tensor | None = None,
    mean_out: bool = False,
    cps_legacy_scale: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference of `flowpo.kernels.sde_step_logprob` (same arguments, same results).

    sample (S, ...), S in {1, B/G, B}; velocity, prev_sample (B, ...). Computes in float32, or
    float64 when an input is float64. Returns log_prob (B,) and, with mean_out, mean (B, ...).
    Differentiable w.r.t. sample and velocity; prev_sample is a constant.
    """
    check_reduce(reduce, sde_type, cps_legacy_scale)
    a = check_step(
        sample,
        velocity,
        prev_sample,
        sigma,
        sigma_next,
        noise_level,
        sde_type=sde_type,
        sigma_max=sigma_max,
    )
    dtype = _compute_dtype(sample, velocity, prev_sample)
    b = a.batch
    x = expand_sample(sample, b).reshape(b, -1).to(dtype)
    v = velocity.reshape(b, -1).to(dtype)
    xn = prev_sample.detach().reshape(b, -1).to(dtype)
    log_prob, mean = sde_logprob_math(
        x,
        v,
        xn,
        a.sigma,
        a.sigma_next,
        a.noise_level,
        sde_type=sde_type,
        reduce=reduce,
        sigma_max=a.sigma_max,
        cps_legacy_scale=cps_legacy_scale,
    )
    return (log_prob, mean.reshape(velocity.shape)) if mean_out else log_prob


# --- GRPO-Guard (ALGORITHMS.md §5) -------------------------------------------------------------


def guard_math(
    x: Tensor,
    v: Tensor,
    x_next: Tensor,
    mean_old: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    *,
    sde_type: str = "flow",
    gradient_reweight: bool = True,
    sigma_max: float = 0.5,
    reduce: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, log_ratio (B,), clipped (B,) bool) from flat (B, D) tensors of one dtype; no checks.

    log_ratio = reduce_D(eps * (mu_theta - mu_old)), eps = (x' - mu_old) / std: the RatioNorm
    normalised log-ratio in closed form (reduce as the step's log-probs: "mean" published). Per sample l = max(-A r, -A clip(r, 1-lo, 1+hi)),
    r = exp(log_ratio); loss = mean_B(l), divided by (mean_B sqrt|dt|)^2 (= |dt| when the batch
    shares its step) with gradient_reweight. clipped: the clipped branch is active (no gradient).
    """
    delta, std = step_increment(
        x, v, sigma, sigma_next, noise_level, sde_type=sde_type, sigma_max=sigma_max
    )
    eps = (x_next - mean_old) / _col(std)
    prod = eps * ((x + delta) - mean_old)
    log_ratio = prod.mean(dim=1) if reduce == "mean" else prod.sum(dim=1)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(x.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped).mean()
    if gradient_reweight:
        dt = (sigma_next - sigma).to(x.dtype)
        loss = loss / dt.abs().sqrt().mean().square()
    return loss, log_ratio, clipped > unclipped


def guard_stats(
    log_ratio: Tensor, clipped: Tensor, loss: Tensor, clip_low: float, clip_high: float
) -> dict[str, Tensor]:
    """Detached diagnostics, the keys of `trainer.losses.clipped_policy_loss` plus the per-sample
    normalised log-ratio and clipped flag."""
    with torch.no_grad():
        z = log_ratio.detach()
        r = torch.exp(z)
        return {
            "log_ratio": z,  # (B,) normalised log-ratio
            "clipped": clipped.detach(),  # (B,) bool: the clipped branch is active
            "ratio_mean": r.mean(),
            "ratio_std": r.std(correction=0),
            "ratio_max_dev": (r - 1).abs().max(),
            "clipfrac_high": (r > 1.0 + clip_high).float().mean(),
            "clipfrac_low": (r < 1.0 - clip_low).float().mean(),
            "approx_kl": 0.5 * z.square().mean(),
            "policy_loss": loss.detach(),
        }


def guard_clipped_loss_ref(
    velocity: Tensor,
    sample: Tensor,
    prev_sample: Tensor,
    mean_old: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    *,
    sde_type: str = "flow",
    gradient_reweight: bool = True,
    sigma_max: float | Tensor | None = None,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference of `flowpo.kernels.guard_clipped_loss`: (scalar loss, stats) — see guard_math.

    velocity, prev_sample, mean_old (B, ...); sample (S, ...); advantages (B,). reduce: that of
    the step's log-probs, for which the RatioNorm identity holds (published: "mean"). Computes in float32, or float64 when an input is float64; differentiable w.r.t. velocity
    (and sample); prev_sample, mean_old and advantages are constants.
    """
    a = check_step(
        sample,
        velocity,
        prev_sample,
        sigma,
        sigma_next,
        noise_level,
        sde_type=sde_type,
        sigma_max=sigma_max,
        extra={"mean_old": mean_old},
    )
    check_reduce(reduce, sde_type, False)
    adv = check_guard(advantages, a.batch, clip_low, clip_high, velocity.device)
    dtype = _compute_dtype(sample, velocity, prev_sample, mean_old, advantages)
    b = a.batch
    loss, log_ratio, clipped = guard_math(
        expand_sample(sample, b).reshape(b, -1).to(dtype),
        velocity.reshape(b, -1).to(dtype),
        prev_sample.detach().reshape(b, -1).to(dtype),
        mean_old.detach().reshape(b, -1).to(dtype),
        a.sigma,
        a.sigma_next,
        a.noise_level,
        adv,
        clip_low,
        clip_high,
        sde_type=sde_type,
        gradient_reweight=gradient_reweight,
        sigma_max=a.sigma_max,
        reduce=reduce,
    )
    return loss, guard_stats(log_ratio, clipped, loss, clip_low, clip_high)


def ratio_norm_long_form(
    log_prob: Tensor,
    old_log_prob: Tensor,
    mean: Tensor,
    mean_old: Tensor,
    std: Tensor,
    reduce: str = "mean",
) -> Tensor:
    """RatioNorm as GRPO-Guard writes it: (logp - logp_old + reduce_D(dmu^2) / (2 s^2)) * s,
    with log-probs of the same x' under mu and mu_old reduced the same way; (B,)."""
    b = mean.shape[0]
    dmu_sq = (mean - mean_old).reshape(b, -1).square()
    dmu_sq = dmu_sq.mean(dim=1) if reduce == "mean" else dmu_sq.sum(dim=1)
    return (log_prob - old_log_prob + dmu_sq / (2 * std.square())) * std
