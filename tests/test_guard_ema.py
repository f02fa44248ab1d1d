"""GRPO-Guard (docs/algorithms.md §5, §6 invariant 5) and the EMA of trainable weights.

RatioNorm's closed form mean_D(eps * dmu) equals the long form (logp - logp_old +
mean_D(dmu^2) / (2 s^2)) * s on real SDE steps of every type, and is exactly 0 when the policy
has not moved; gradient reweighting scales a step's gradient by 1/|dt|; the EMA follows its
decay schedule and update interval, swaps weights in and out for evaluation, and round-trips
through its state."""

import math

import pytest
import torch
from torch import nn

from flowpo.config import ConfigError, load_config
from flowpo.sde import sde_step_with_logprob
from flowpo.trainer.ema import EMA
from flowpo.trainer.losses import (
    clipped_policy_loss,
    gradient_reweight_factor,
    ratio_norm_log_ratio,
    ratio_norm_long_form,
)


def _step(sde_type, reduce, sigma=0.7, sigma_next=0.6, seed=0, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    v_old = torch.randn(4, 3, 8, 8, generator=g)
    v_new = v_old + scale * torch.randn(4, 3, 8, 8, generator=g)
    kw = dict(sde_type=sde_type, reduce=reduce, sigma_max=0.95)
    old = sde_step_with_logprob(x, v_old, sigma, sigma_next, 0.7, generator=g, **kw)
    new = sde_step_with_logprob(x, v_new, sigma, sigma_next, 0.7, prev_sample=old.prev_sample, **kw)
    return old, new


def _gauss_logp64(x, mean, std, reduce):
    """Independent float64 Gaussian log-density per sample, reduced over D."""
    x, mean, s = x.double(), mean.double(), std.double().reshape(-1, 1, 1, 1)
    lp = -((x - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


@pytest.mark.parametrize("sde_type", ["flow", "cps", "dance"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.95), (0.7, 0.6), (0.3, 0.1)])
def test_ratio_norm_closed_form_equals_long_form(sde_type, reduce, sigma, sigma_next):
    old, new = _step(sde_type, reduce, sigma, sigma_next)
    closed = ratio_norm_log_ratio(new.prev_sample, new.mean, old.mean, new.std, reduce=reduce)
    assert closed.shape == (4,) and closed.dtype == torch.float32
    xn = new.prev_sample
    long = ratio_norm_long_form(
        _gauss_logp64(xn, new.mean, new.std, reduce),
        _gauss_logp64(xn, old.mean, new.std, reduce),
        new.mean,
        old.mean,
        new.std,
        reduce=reduce,
    )
    assert torch.allclose(closed.double(), long, rtol=1e-4, atol=1e-9)
    # with the trainer's own float32 log-probs the long form agrees at float32 rounding
    long32 = ratio_norm_long_form(
        new.log_prob, old.log_prob, new.mean, old.mean, new.std, reduce=reduce
    )
    tol = 1e-6 * new.log_prob.abs().max().item() * new.std.max().item() + 1e-7
    assert torch.allclose(closed.double(), long32, rtol=1e-2, atol=tol)


def test_ratio_norm_is_zero_without_policy_change_and_zero_mean_under_the_rollout():
    old, _ = _step("flow", "mean")
    zero = ratio_norm_log_ratio(old.prev_sample, old.mean, old.mean, old.std)
    assert torch.equal(zero, torch.zeros(4))
    # E over the rollout noise of mean_D(eps * dmu) is 0 for a fixed dmu
    g = torch.Generator().manual_seed(1)
    mu_old = torch.randn(2000, 64, generator=g)
    dmu = 0.1 * torch.randn(1, 64, generator=g)
    std = torch.full((2000,), 0.3)
    xn = mu_old + 0.3 * torch.randn(2000, 64, generator=g)
    nlr = ratio_norm_log_ratio(xn, mu_old + dmu, mu_old, std)
    assert abs(nlr.mean().item()) < 4 * nlr.std().item() / 2000**0.5
    assert nlr.std().item() == pytest.approx(dmu.square().mean().sqrt().item() / 8, rel=0.1)


def test_ratio_norm_gradient_flows_to_the_mean():
    old, new = _step("flow", "mean")
    mean = new.mean.clone().requires_grad_(True)
    ratio_norm_log_ratio(new.prev_sample, mean, old.mean, new.std).sum().backward()
    eps = (new.prev_sample - old.mean) / new.std.reshape(-1, 1, 1, 1)
    assert torch.allclose(mean.grad, eps / eps[0].numel())


@pytest.mark.parametrize("dt", [-0.05, -0.2])
def test_gradient_reweight_scales_the_step_gradient_by_one_over_dt(dt):
    log_prob = torch.tensor([0.1, -0.2, 0.3, 0.0], requires_grad=True)
    old = torch.tensor([0.1, -0.2, 0.3, 0.0])
    adv = torch.tensor([1.0, -0.5, 0.25, 2.0])
    w = gradient_reweight_factor(torch.full((4,), dt))
    assert w.item() == pytest.approx(1 / abs(dt))
    plain, _ = clipped_policy_loss(log_prob, old, adv, 1e-4, 1e-4)
    (g_plain,) = torch.autograd.grad(plain, log_prob)
    weighted, _ = clipped_policy_loss(log_prob, old, adv, 1e-4, 1e-4, weight=w.expand(4))
    (g_w,) = torch.autograd.grad(weighted, log_prob)
    assert torch.allclose(g_w, g_plain / abs(dt))
    # mixed dt in one batch: |dt| is the squared mean of sqrt|dt|
    mixed = torch.tensor([-0.04, -0.16])
    assert gradient_reweight_factor(mixed).item() == pytest.approx(1 / 0.3**2)


def test_guard_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"train.ratio_norm needs Gaussian log-probs"):
        load_config(
            None,
            [
                "--train.ratio_norm=true",
                "--sampling.sde_type=cps",
                "--sampling.cps_legacy_scale=true",
            ],
        ).validate()
    with pytest.raises(ConfigError, match=r"train.ema_decay \(1.0\) must be in \[0, 1\)"):
        load_config(None, ["--train.ema_decay=1"]).validate()
    with pytest.raises(ConfigError, match=r"train.ema_update_interval \(0\) must be >= 1"):
        load_config(None, ["--train.ema_update_interval=0"]).validate()


# -- EMA ------------------------------------------------------------------------------------------


def _module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].bias.requires_grad_(False)  # frozen parameters are not tracked
    return m


def test_ema_decay_schedule_and_update_interval():
    m = _module()
    ema = EMA(m, decay=0.9, update_interval=2)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    assert [ema.current_decay(n) for n in (0, 1, 8, 100)] == [0.1, 2 / 11, 0.5, 0.9]
    assert EMA(m, decay=0.9, warmup=False).current_decay(0) == 0.9
    start = ema.shadow["0.weight"].clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
    assert ema.update(1) is False  # not on the interval
    assert torch.equal(ema.shadow["0.weight"], start)
    assert ema.update(2) is True
    d = ema.current_decay(2)  # 3/12
    assert torch.allclose(ema.shadow["0.weight"], start + (1 - d) * 1.0)


def test_ema_of_constant_weights_is_the_weights_and_applied_restores():
    m = _module()
    ema = EMA(m, decay=0.5, update_interval=1)
    w0 = m[0].weight.detach().clone()
    for n in range(1, 6):
        ema.update(n)
    assert torch.allclose(ema.shadow["0.weight"], w0)
    with torch.no_grad():
        m[0].weight.add_(2.0)
    ema.update(6)
    trained = m[0].weight.detach().clone()
    with ema.applied():
        assert torch.allclose(m[0].weight, ema.shadow["0.weight"])
        assert not torch.allclose(m[0].weight, trained)
    assert torch.equal(m[0].weight, trained)
    with pytest.raises(RuntimeError), ema.applied():  # restored after an exception too
        raise RuntimeError("eval failed")
    assert torch.equal(m[0].weight, trained)


def test_ema_state_round_trips(tmp_path):
    m = _module()
    ema = EMA(m, decay=0.9, update_interval=1)
    with torch.no_grad():
        m[0].weight.mul_(3)
    ema.update(4)
    ema.save(tmp_path / "ema.pt")
    other = EMA(_module(), decay=0.9)
    other.load(tmp_path / "ema.pt")
    assert other.num_updates == 1
    for k in ema.shadow:
        assert torch.equal(other.shadow[k], ema.shadow[k])


def test_ema_checkpoint_exports_the_ema_weights_and_resumes(tmp_path):
    from safetensors.torch import load_file

    from flowpo.trainer.checkpoint import load_ema, save_ema

    m = _module()
    ema = EMA(m, decay=0.5, update_interval=1)
    with torch.no_grad():
        m[0].weight.add_(4.0)
    ema.update(20)
    save_ema(tmp_path, ema, 0, lambda: {k: v.clone() for k, v in m.state_dict().items()})
    exported = load_file(str(tmp_path / "trainable_ema.safetensors"))
    assert torch.equal(exported["0.weight"], ema.shadow["0.weight"])  # EMA, not training weights
    assert not torch.equal(exported["0.weight"], m[0].weight.detach())
    fresh = EMA(_module(), decay=0.5)
    assert load_ema(tmp_path, fresh, 0) and not load_ema(tmp_path, fresh, 1)
    assert torch.equal(fresh.shadow["0.weight"], ema.shadow["0.weight"])
