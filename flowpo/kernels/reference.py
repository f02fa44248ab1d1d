"""Torch references of the fused ops: what the kernels must compute, in float32 or float64.

The step formulas are `flowpo.sde`'s (docs/algorithms.md §1), the same functions the trainer's torch
path calls; this module puts them behind the kernels' arguments (prev_sample given, `sample`
broadcastable from (S, ...)), checks, errors and dtypes: it computes in float32, or in float64
when an input is float64, so tests compare the kernels against it in float32 and against
float64, and `gradcheck` runs on it. Benchmarks import their eager and compiled baselines from
here.

Shapes: B batch, S = B or B / G or 1 rows of `sample`, D latent elements per image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowpo.kernels._args import (
    Scalar,
    check_guard,
    check_reduce,
    check_step,
    expand_sample,
)
from flowpo.sde import (
    bcast,
    log_density,
    reduce_d,
    sde_step_with_logprob,  # noqa: F401  (the trainer's eager path)
    step_increment,
)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision overflows in the mean)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
    resid = (x_next - x) - delta  # x' - mu, formed from the increment (see step_increment)
    log_prob = log_density(resid, std, reduce=reduce, cps_legacy_scale=cps_legacy_scale)
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


# --- GRPO-Guard (docs/algorithms.md §5) -----------------------------------------------------------


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
    eps = (x_next - mean_old) / bcast(std, x)
    log_ratio = reduce_d(eps * ((x + delta) - mean_old), reduce)
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
