"""Group-normalised advantages (docs/algorithms.md §3).

A group is the G images of one prompt (or the G branches of one branch point). Rewards come in
already gathered across ranks: with `global_std` the std is over everything passed in, so the
caller must pass the whole rollout batch of all ranks to match the published behaviour.

Shapes: N rewards (all groups of the rollout batch, flattened).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_inputs(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids {tuple(group_ids.shape)} must have the shape of rewards "
            f"{tuple(rewards.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf; fix the reward function before normalising")


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Arbitrary integer ids -> dense index 0..n_groups-1 (N,) and n_groups."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def zero_std_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(N,) bool: True for samples whose group's rewards are all equal (no learning signal).

    Exact equality (max == min), not a std threshold, so the mask does not depend on eps or on
    rounding in the mean."""
    _check_inputs(rewards, group_ids)
    idx, n = _group_index(group_ids)
    r = rewards.float()
    gmax = torch.full((n,), -torch.inf, device=r.device).scatter_reduce(0, idx, r, "amax")
    gmin = torch.full((n,), torch.inf, device=r.device).scatter_reduce(0, idx, r, "amin")
    return (gmax == gmin)[idx]


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    global_std: bool = True,
    adv_clip_max: float = 5.0,
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, float]]:
    """A_i = (r_i - mean_group(r)) / (std + eps), clipped to +-adv_clip_max.

    rewards: (N,) float; group_ids: (N,) integer, any values (samples with equal ids form a
    group). std is the group's std, or with `global_std` (the published default) the std of
    all N rewards. Returns advantages (N,) float32 and stats (python floats): adv_mean,
    adv_std, adv_abs_max (after clipping), zero_std_ratio (share of groups whose rewards are
    all equal), reward_mean, reward_std.
    """
    _check_inputs(rewards, group_ids)
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    idx, n = _group_index(group_ids)
    # float64: N is a few hundred, and it keeps the advantages of equal rewards at exactly 0
    # up to the final cast.
    r = rewards.double()
    count = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    gmean = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, idx, r) / count
    centred = r - gmean[idx]
    # Population std (ddof = 0), as Flow-GRPO's PerPromptStatTracker uses np.std; torch.std
    # would default to the unbiased (ddof = 1) estimate and differ for small groups.
    if global_std:
        std = r.std(correction=0).expand_as(r)
    else:
        gvar = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, idx, centred.square())
        std = (gvar / count).sqrt()[idx]
    adv = (centred / (std + eps)).clamp(-adv_clip_max, adv_clip_max)

    zero = zero_std_mask(rewards, group_ids)
    zero_groups = torch.zeros(n, dtype=torch.bool, device=r.device).index_fill_(0, idx[zero], True)
    stats = {
        "adv_mean": adv.mean().item(),
        "adv_std": adv.std(correction=0).item(),
        "adv_abs_max": adv.abs().max().item(),
        "zero_std_ratio": zero_groups.double().mean().item(),
        "reward_mean": r.mean().item(),
        "reward_std": r.std(correction=0).item(),
    }
    return adv.float(), stats
