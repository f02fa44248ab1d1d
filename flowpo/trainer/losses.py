"""Clipped policy objective and KL to the reference policy (ALGORITHMS.md §4), plain torch.

Shapes: B samples (one trained step of one image each), D latent elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("flow_grpo", "exact")


def clipped_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss: mean_B( max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) ).

    log_prob: (B,) log pi_theta, differentiable; old_log_prob: (B,) log pi_old from the rollout;
    advantages: (B,). Both of the latter are treated as constants (detached).
    clip_low / clip_high: tiny (1e-4 .. 2e-6) because log-probs are per-element means.
    weight: optional (B,) per-sample factor (GRPO-Guard reweight, zero-std masking). The
        weighted sum is divided by B, not by sum(weight), so weights rescale gradients rather
        than renormalise them, and micro-batch accumulation stays linear; a 0/1 mask thus scales
        the loss by the kept share.
    Returns the scalar loss and detached 0-dim stats (unweighted, over all B): ratio_mean,
    ratio_std, ratio_max_dev, clipfrac_high, clipfrac_low, approx_kl, policy_loss.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.ndim != 1:
        raise ValueError(
            "log_prob, old_log_prob and advantages must all be (B,), got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if weight is not None and weight.shape != log_prob.shape:
        raise ValueError(
            f"weight must be (B,) = {tuple(log_prob.shape)}, got {tuple(weight.shape)}"
        )
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low ({clip_low}) and clip_high ({clip_high}) must be >= 0")

    # float32: log-probs are O(1) per-element means, the ratio lives within ~1e-5 of 1
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_sample = torch.maximum(unclipped, clipped)
    if weight is not None:
        per_sample = per_sample * weight.detach().float()
    loss = per_sample.mean()

    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "ratio_mean": r.mean(),
            "ratio_std": r.std(correction=0),  # population: defined for B = 1
            "ratio_max_dev": (r - 1).abs().max(),
            "clipfrac_high": (r > 1.0 + clip_high).float().mean(),
            "clipfrac_low": (r < 1.0 - clip_low).float().mean(),
            "approx_kl": 0.5 * log_ratio.detach().square().mean(),
            "policy_loss": loss.detach(),
        }
    return loss, stats


def kl_to_reference(
    mean: Tensor,
    ref_mean: Tensor,
    std: Tensor | float,
    dt: Tensor | float,
    *,
    estimator: str = "flow_grpo",
    reduce: str = "mean",
) -> Tensor:
    """KL(pi_theta || pi_ref) of one SDE step whose Gaussians share `std`; returns (B,).

    mean, ref_mean: (B, ...) step means; std: (B,) or float, the step's std (> 0);
    dt: (B,) or float, sigma_next - sigma (< 0).
    "exact":     reduce_D((mu - mu_ref)^2) / (2 std^2); reduce="sum" is the true KL,
                 "mean" the per-element mean (the scale of reduce="mean" log-probs).
    "flow_grpo": mean_D((mu - mu_ref)^2) / (2 sigma_t^2), sigma_t = std / sqrt(-dt): the
                 published estimator, which drops the sqrt(-dt) factor (so it equals
                 exact-with-mean times -dt). Its beta values (0.04, 0.01) only carry over
                 with it; it is defined with a per-element mean, so reduce must be "mean".
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r} is not supported; choose one of {list(KL_ESTIMATORS)}"
        )
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r} is not supported; choose one of ['mean', 'sum']")
    if estimator == "flow_grpo" and reduce != "mean":
        raise ValueError(
            "estimator='flow_grpo' is defined with a per-element mean; use reduce='mean', "
            "or estimator='exact' for reduce='sum'"
        )
    if mean.shape != ref_mean.shape:
        raise ValueError(f"ref_mean {tuple(ref_mean.shape)} must match mean {tuple(mean.shape)}")
    b = mean.shape[0]
    # float32: the difference of two bf16 means would be mostly rounding noise
    sq = (mean.float() - ref_mean.detach().float()).square().reshape(b, -1)
    sq = sq.mean(dim=1) if reduce == "mean" else sq.sum(dim=1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if estimator == "exact":
        return sq / (2 * std_t.square())
    dt_t = torch.as_tensor(dt, dtype=torch.float32, device=mean.device)
    sigma_t = std_t / torch.sqrt(-dt_t)
    return sq / (2 * sigma_t.square())
