"""Clipped policy objective and KL to the reference policy (docs/algorithms.md §4), plain torch.

Shapes: B samples (one trained step of one image each), D latent elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowpo.sde import reduce_d

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
    sde_type: str = "flow",
) -> Tensor:
    """KL(pi_theta || pi_ref) of one SDE step whose Gaussians share `std`; returns (B,).

    mean, ref_mean: (B, ...) step means; std: (B,) or float, the step's std (> 0);
    dt: (B,) or float, sigma_next - sigma (< 0); sde_type: the step's SDE (flow | cps | dance).
    "exact":     reduce_D((mu - mu_ref)^2) / (2 std^2); reduce="sum" is the true KL,
                 "mean" the per-element mean (the scale of reduce="mean" log-probs).
    "flow_grpo": mean_D((mu - mu_ref)^2) / (2 s^2) with s the std Flow-GRPO's step function
                 returns for that SDE (docs/algorithms.md §4): for flow (and dance, which has
                 no published KL) the diffusion coefficient sigma_t = std / sqrt(-dt), so the
                 value is exact-with-mean times -dt; for cps the step's actual std, so it
                 equals exact-with-mean. Its beta values (0.04, 0.01) only carry over with it;
                 it is defined with a per-element mean, so reduce must be "mean".
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r} is not supported; choose one of {list(KL_ESTIMATORS)}"
        )
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r} is not supported; choose one of ['mean', 'sum']")
    if sde_type not in ("flow", "cps", "dance"):
        raise ValueError(f"sde_type={sde_type!r} is not supported; choose flow, cps or dance")
    if estimator == "flow_grpo" and reduce != "mean":
        raise ValueError(
            "estimator='flow_grpo' is defined with a per-element mean; use reduce='mean', "
            "or estimator='exact' for reduce='sum'"
        )
    if mean.shape != ref_mean.shape:
        raise ValueError(f"ref_mean {tuple(ref_mean.shape)} must match mean {tuple(mean.shape)}")
    # float32: the difference of two bf16 means would be mostly rounding noise
    sq = reduce_d((mean.float() - ref_mean.detach().float()).square(), reduce)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if estimator == "exact" or sde_type == "cps":
        # Flow-GRPO's CPS step returns its actual std, sigma' sin(a pi / 2)
        return sq / (2 * std_t.square())
    dt_t = torch.as_tensor(dt, dtype=torch.float32, device=mean.device)
    sigma_t = std_t / torch.sqrt(-dt_t)
    return sq / (2 * sigma_t.square())


# -- GRPO-Guard (docs/algorithms.md §5) ------------------------------------------------------------


def ratio_norm_log_ratio(
    prev_sample: Tensor,
    mean: Tensor,
    old_mean: Tensor,
    std: Tensor,
    *,
    reduce: str = "mean",
) -> Tensor:
    """RatioNorm's normalised log-ratio, closed form: reduce_D(eps * (mu_theta - mu_old)).

    prev_sample: (B, ...) the stored x'; mean: (B, ...) mu_theta, differentiable; old_mean:
    (B, ...) mu_old stored at sampling; std: (B,) the step's std s (policy-independent).
    eps = (x' - mu_old) / s is the rollout's own standard noise, so the result is zero-mean
    under the rollout and of a scale that does not depend on the step's noise level. It equals
    (logp_theta - logp_old + reduce_D(dmu^2) / (2 s^2)) * s for the Gaussian step with the same
    `reduce` (`ratio_norm_long_form`), and is exactly 0 when mu_theta == mu_old. Returns (B,).
    """
    if not prev_sample.shape == mean.shape == old_mean.shape:
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)}, mean {tuple(mean.shape)} and old_mean "
            f"{tuple(old_mean.shape)} must match"
        )
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r} is not supported; choose one of ['mean', 'sum']")
    # float32: dmu is tiny next to x; the product must not round it away
    old = old_mean.detach().float()
    eps = (prev_sample.detach().float() - old) / std.detach().float().reshape(
        (-1,) + (1,) * (mean.ndim - 1)
    )
    return reduce_d(eps * (mean.float() - old), reduce)


def ratio_norm_long_form(
    log_prob: Tensor,
    old_log_prob: Tensor,
    mean: Tensor,
    old_mean: Tensor,
    std: Tensor,
    *,
    reduce: str = "mean",
) -> Tensor:
    """(logp_theta - logp_old + reduce_D((mu_theta - mu_old)^2) / (2 s^2)) * s, (B,), in
    float64: the definition RatioNorm's closed form is tested against (not used in training:
    it cancels two large terms)."""
    s = std.double()
    dmu2 = reduce_d((mean.double() - old_mean.double()).square(), reduce)
    return (log_prob.double() - old_log_prob.double() + dmu2 / (2 * s.square())) * s


def gradient_reweight_factor(dt: Tensor) -> Tensor:
    """GRPO-Guard's per-step weight 1/|dt|, with |dt| of a batch taken as mean_B(sqrt|dt|)^2
    (= |dt| when every sample shares the step). dt: (B,) sigma_next - sigma. Returns 0-dim."""
    return 1.0 / torch.sqrt(dt.detach().float().abs()).mean().square()
