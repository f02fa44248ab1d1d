"""Advantages (docs/algorithms.md §3) and the clipped objective / KL (§4) against hand
computations."""

from __future__ import annotations

import math

import pytest
import torch

from flowpo.trainer.advantages import compute_advantages, zero_std_mask
from flowpo.trainer.losses import clipped_policy_loss, kl_to_reference

# two groups of 3 (ids need not be contiguous or sorted) and one constant group of 2
REWARDS = torch.tensor([1.0, 2.0, 6.0, 0.5, 0.5, 3.0, 0.0, 4.0])
GROUPS = torch.tensor([7, 7, 7, 2, 2, 3, 3, 3])
GROUP_OF = {7: [0, 1, 2], 2: [3, 4], 3: [5, 6, 7]}


def _population_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _hand_advantages(global_std: bool, eps: float = 1e-4) -> list[float]:
    r = REWARDS.tolist()
    out = [0.0] * len(r)
    for members in GROUP_OF.values():
        vals = [r[i] for i in members]
        mean = sum(vals) / len(vals)
        std = _population_std(r) if global_std else _population_std(vals)
        for i in members:
            out[i] = (r[i] - mean) / (std + eps)
    return out


@pytest.mark.parametrize("global_std", [True, False])
def test_advantages_match_hand_computation(global_std):
    adv, stats = compute_advantages(REWARDS, GROUPS, global_std=global_std, adv_clip_max=100.0)
    expected = torch.tensor(_hand_advantages(global_std))
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-6)
    assert adv.dtype == torch.float32
    assert stats["reward_mean"] == pytest.approx(REWARDS.mean().item())
    assert stats["reward_std"] == pytest.approx(_population_std(REWARDS.tolist()))
    assert stats["adv_mean"] == pytest.approx(expected.mean().item(), abs=1e-6)
    assert stats["adv_std"] == pytest.approx(expected.std(correction=0).item(), rel=1e-6)
    assert stats["adv_abs_max"] == pytest.approx(expected.abs().max().item(), rel=1e-6)


def test_constant_group_has_zero_advantage_and_is_counted():
    adv, stats = compute_advantages(REWARDS, GROUPS, global_std=False)
    assert adv[3].item() == 0.0 and adv[4].item() == 0.0
    assert stats["zero_std_ratio"] == pytest.approx(1 / 3)  # a share of groups, not samples
    mask = zero_std_mask(REWARDS, GROUPS)
    assert mask.tolist() == [False, False, False, True, True, False, False, False]


def test_advantages_are_clipped():
    adv, stats = compute_advantages(REWARDS, GROUPS, global_std=False, adv_clip_max=1.2)
    unclipped = torch.tensor(_hand_advantages(False))
    torch.testing.assert_close(adv, unclipped.clamp(-1.2, 1.2), rtol=1e-6, atol=1e-6)
    assert unclipped.abs().max() > 1.2 and stats["adv_abs_max"] == pytest.approx(1.2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=torch.tensor([1.0, float("nan")])), "NaN"),
        (dict(group_ids=torch.tensor([0.0, 1.0])), "group_ids"),
        (dict(group_ids=torch.tensor([0, 1, 2])), "group_ids"),
        (dict(adv_clip_max=0.0), "adv_clip_max"),
    ],
)
def test_advantage_arguments_are_validated(kwargs, match):
    args = dict(rewards=torch.tensor([1.0, 2.0]), group_ids=torch.tensor([0, 0])) | kwargs
    with pytest.raises(ValueError, match=match):
        compute_advantages(args.pop("rewards"), args.pop("group_ids"), **args)


# ---- clipped objective ----------------------------------------------------------------------


def _hand_loss(logp, old, adv, lo, hi):
    total = 0.0
    for lp, o, a in zip(logp, old, adv):
        r = math.exp(lp - o)
        total += max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    return total / len(logp)


def test_clipped_loss_matches_hand_formula_with_asymmetric_clip():
    # ratios exp(+-0.3), exp(+-0.05) against clip [0.9, 1.2]: every branch of max/clip is hit
    old = torch.zeros(6)
    logp = torch.tensor([0.3, 0.3, -0.3, -0.3, 0.05, -0.05])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -0.5])
    lo, hi = 0.1, 0.2
    loss, stats = clipped_policy_loss(logp, old, adv, lo, hi)
    expected = _hand_loss(logp.tolist(), old.tolist(), adv.tolist(), lo, hi)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    ratio = torch.exp(logp)
    assert stats["clipfrac_high"].item() == pytest.approx(2 / 6)
    assert stats["clipfrac_low"].item() == pytest.approx(2 / 6)
    assert stats["ratio_mean"].item() == pytest.approx(ratio.mean().item(), rel=1e-6)
    assert stats["ratio_std"].item() == pytest.approx(ratio.std(correction=0).item(), rel=1e-6)
    assert stats["ratio_max_dev"].item() == pytest.approx(math.exp(0.3) - 1, rel=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (logp**2).mean().item(), rel=1e-6)
    assert stats["policy_loss"].item() == loss.item()
    assert all(not t.requires_grad for t in stats.values())


def test_loss_at_ratio_one_is_minus_mean_advantage_with_gradient_minus_a_over_n():
    old = torch.tensor([-1.3, 0.2, 0.7, -0.1])
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([0.5, -2.0, 1.5, 0.25])
    loss, stats = clipped_policy_loss(logp, old, adv, 1e-4, 1e-4)
    assert loss.item() == pytest.approx(-adv.mean().item(), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / len(adv))
    assert stats["ratio_max_dev"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_weight_scales_per_sample_losses_and_divides_by_batch():
    old = torch.zeros(4)
    logp = torch.tensor([0.01, -0.02, 0.0, 0.03], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    weight = torch.tensor([1.0, 0.0, 2.0, 0.5])
    loss, _ = clipped_policy_loss(logp, old, adv, 0.2, 0.2, weight=weight)
    ratio = torch.exp(logp.detach())
    assert loss.item() == pytest.approx((weight * -adv * ratio).sum().item() / 4, rel=1e-6)
    loss.backward()
    assert logp.grad[1].item() == 0.0  # a masked sample contributes no gradient


def test_clipped_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="log_prob"):
        clipped_policy_loss(torch.zeros(3), torch.zeros(4), torch.zeros(3), 0.1, 0.1)
    with pytest.raises(ValueError, match="weight"):
        clipped_policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.1, 0.1, torch.ones(2))


# ---- KL to the reference --------------------------------------------------------------------


def _means():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=g)
    ref = mean + 0.1 * torch.randn(3, 2, 4, 4, generator=g)
    return mean, ref


def test_kl_estimators_match_hand_formulas():
    mean, ref = _means()
    std = torch.tensor([0.3, 0.1, 0.05])
    dt = torch.tensor([-0.05, -0.02, -0.1])
    sq = ((mean - ref) ** 2).double().reshape(3, -1)
    exact_sum = sq.sum(1) / (2 * std.double() ** 2)  # true KL of N(mu, std^2 I) || N(mu_ref, .)
    exact_mean = sq.mean(1) / (2 * std.double() ** 2)
    sigma_t = std.double() / torch.sqrt(-dt.double())
    flow_grpo = sq.mean(1) / (2 * sigma_t**2)
    got_sum = kl_to_reference(mean, ref, std, dt, estimator="exact", reduce="sum")
    got_mean = kl_to_reference(mean, ref, std, dt, estimator="exact")
    got_fg = kl_to_reference(mean, ref, std, dt)  # flow_grpo is the default
    torch.testing.assert_close(got_sum.double(), exact_sum, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_mean.double(), exact_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_fg.double(), flow_grpo, rtol=1e-5, atol=0)
    # the published estimator drops sqrt(-dt): flow_grpo = exact (per-element mean) * (-dt)
    torch.testing.assert_close(got_fg, got_mean * -dt, rtol=1e-5, atol=0)
    assert got_sum.shape == (3,)


def test_kl_accepts_float_std_and_dt():
    mean, ref = _means()
    got = kl_to_reference(mean, ref, 0.2, -0.04)
    want = kl_to_reference(mean, ref, torch.full((3,), 0.2), torch.full((3,), -0.04))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("estimator", ["flow_grpo", "exact"])
def test_kl_is_zero_for_equal_means(estimator):
    mean, _ = _means()
    assert torch.equal(
        kl_to_reference(mean, mean.clone(), 0.1, -0.05, estimator=estimator), torch.zeros(3)
    )


def test_kl_rejects_unknown_estimator_and_sum_with_flow_grpo():
    mean, ref = _means()
    with pytest.raises(ValueError, match="estimator"):
        kl_to_reference(mean, ref, 0.1, -0.05, estimator="k3")
    with pytest.raises(ValueError, match="reduce"):
        kl_to_reference(mean, ref, 0.1, -0.05, reduce="sum")
