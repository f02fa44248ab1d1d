"""Step math of flowpo.sde against docs/algorithms.md §1 and invariants 1-3 of §6."""

from __future__ import annotations

import math

import pytest
import torch

from flowpo.sde import (
    SDE_TYPES,
    calculate_shift,
    flux_time_shift,
    ode_step,
    sde_mean_std,
    sde_std,
    sde_step_with_logprob,
    shift_sigmas,
)

B, SHAPE = 4, (4, 3, 5, 5)  # D = 75
D = math.prod(SHAPE[1:])
# per-sample schedule points; the first is sigma = 1 (Flow-SDE needs sigma_max there)
SIGMA = [1.0, 0.7, 0.4, 0.15]
SIGMA_NEXT = [0.96, 0.6, 0.3, 0.1]
SIGMA_MAX = 0.96


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    v = torch.randn(SHAPE, generator=g).to(dtype)
    return x, v


def _ref_mean_std64(x, v, sigma, sigma_next, a, sde_type, sigma_max):
    """docs/algorithms.md §1 written out literally in float64; sigmas (B,), x/v (B, ...)."""
    x, v = x.double(), v.double()
    s, sn, a = (torch.as_tensor(t, dtype=torch.float64).reshape(-1) for t in (sigma, sigma_next, a))
    col = (-1,) + (1,) * (x.ndim - 1)
    dt = sn - s
    if sde_type == "flow":
        s_tilde = torch.where(s == 1, torch.tensor(sigma_max, dtype=torch.float64), s)
        sigma_t = a * torch.sqrt(s / (1 - s_tilde))
        std = sigma_t * torch.sqrt(-dt)
        k = (sigma_t**2 / (2 * s)).reshape(col)
        mean = x + (v + k * (x + (1 - s).reshape(col) * v)) * dt.reshape(col)
    elif sde_type == "cps":
        std = sn * torch.sin(a * math.pi / 2)
        x0 = x - s.reshape(col) * v
        x1 = x + (1 - s).reshape(col) * v
        mean = (1 - sn).reshape(col) * x0 + torch.sqrt(sn**2 - std**2).reshape(col) * x1
    else:
        std = a * torch.sqrt(s - sn)
        x0 = x - s.reshape(col) * v
        score = -(x - (1 - s).reshape(col) * x0) / s.reshape(col) ** 2
        mean = x + v * dt.reshape(col) - 0.5 * (a**2).reshape(col) * score * dt.reshape(col)
    return mean, std.expand(x.shape[0])


def _ref_logpdf64(x_prev, mean, std, reduce):
    """Per-element Gaussian log-density in float64, reduced; also the sum of |terms| (scale)."""
    s = std.reshape((-1,) + (1,) * (mean.ndim - 1))
    terms = (
        -((x_prev.double() - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    )
    terms = terms.reshape(terms.shape[0], -1)
    red = terms.mean(1) if reduce == "mean" else terms.sum(1)
    scale = terms.abs().mean(1) if reduce == "mean" else terms.abs().sum(1)
    return red, scale


def _f32(values):
    # the implementation stores sigmas in float32; the reference uses the same rounded values
    return torch.tensor(values, dtype=torch.float32)


# ---- invariant 1: a = 0 is the Euler step ---------------------------------------------------


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_zero_noise_level_mean_is_euler_step_and_std_zero(sde_type):
    x, v = _inputs(torch.float32)
    sig, sig_next = _f32(SIGMA), _f32(SIGMA_NEXT)
    mean, std = sde_mean_std(x, v, sig, sig_next, 0.0, sde_type=sde_type, sigma_max=SIGMA_MAX)
    torch.testing.assert_close(mean, ode_step(x, v, sig, sig_next), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean, x + v * (sig_next - sig).view(-1, 1, 1, 1), rtol=0, atol=1e-6)
    assert std.shape == (B,) and bool((std == 0).all())


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_mean_departs_from_euler_as_noise_level_squared(sde_type):
    x, v = _inputs(torch.float32)
    sig, sig_next = _f32(SIGMA), _f32(SIGMA_NEXT)
    euler = ode_step(x, v, sig, sig_next)

    def dev(a):
        mean, _ = sde_mean_std(x, v, sig, sig_next, a, sde_type=sde_type, sigma_max=SIGMA_MAX)
        return (mean - euler).abs().max().item()

    # every type's drift correction is O(a^2) (cps: sqrt(s'^2 - std^2) - s' ~ std^2)
    assert dev(0.02) / dev(0.01) == pytest.approx(4.0, rel=2e-2)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_log_prob_at_zero_noise_level_is_refused(sde_type, reduce):
    x, v = _inputs(torch.float32)
    with pytest.raises(ValueError, match="use ode_step"):
        sde_step_with_logprob(
            x, v, 0.7, 0.6, 0.0, sde_type=sde_type, reduce=reduce, sigma_max=SIGMA_MAX
        )


# ---- invariant 2: Flow-SDE marginals --------------------------------------------------------

M0, S0 = 0.5, 0.5  # data x0 ~ N(M0, S0^2)


def _marginal(sigma):
    """x_sigma = (1 - sigma) x0 + sigma eps: mean and variance."""
    return (1 - sigma) * M0, (1 - sigma) ** 2 * S0**2 + sigma**2


def _exact_velocity(x, sigma):
    # v = eps - x0; (v, x_sigma) jointly Gaussian with Cov(v, x_sigma) = sigma - (1-sigma) S0^2,
    # E[v] = -M0, so E[v | x] = -M0 + Cov / Var(x_sigma) * (x - E[x_sigma]).
    mean, var = _marginal(sigma)
    return -M0 + (sigma - (1 - sigma) * S0**2) / var * (x - mean)


def _max_moment_z(step, n=20000, steps=100, sigma0=0.9, seed=0):
    """Simulate from the exact marginal at sigma0 down to 0 with `step(x, v, s, s_next, g)`
    (last step ODE); return the largest |z-score| of mean and variance over the grid."""
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(sigma0, 0.0, steps + 1).tolist()
    mean0, var0 = _marginal(sigmas[0])
    x = mean0 + math.sqrt(var0) * torch.randn(n, 1, generator=g)
    z_max = 0.0
    for k in range(steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        v = _exact_velocity(x, s)
        x = ode_step(x, v, s, s_next) if k == steps - 1 else step(x, v, s, s_next, g)
        mean, var = _marginal(s_next)
        z_mean = (x.mean().item() - mean) / math.sqrt(var / n)
        z_var = (x.var().item() - var) / (var * math.sqrt(2 / (n - 1)))
        z_max = max(z_max, abs(z_mean), abs(z_var))
    return z_max


def test_ode_sampling_matches_analytic_marginals():
    assert _max_moment_z(lambda x, v, s, s_next, g: ode_step(x, v, s, s_next)) < 4.0


@pytest.mark.parametrize("sde_type", ["flow", "dance"])
def test_sde_sampling_preserves_marginals(sde_type):
    # Dance-SDE is the same reverse SDE with sigma_t = a, so it preserves marginals too.
    # CPS is not asserted: its per-step noise is O(1), not O(sqrt(dt)), and it keeps the noise
    # coefficient rather than the marginal (it loses variance with the exact posterior mean).
    def step(x, v, s, s_next, g):
        out = sde_step_with_logprob(x, v, s, s_next, 0.7, sde_type=sde_type, generator=g)
        return out.prev_sample

    assert _max_moment_z(step) < 4.0


def test_marginal_check_detects_a_missing_drift_correction():
    # The check has power: Euler + the same noise, without the score term, fails it.
    def step(x, v, s, s_next, g):
        std = sde_std(s, s_next, 0.7, sde_type="flow")
        return ode_step(x, v, s, s_next) + std * torch.randn(x.shape, generator=g)

    assert _max_moment_z(step) > 20.0


def test_flow_sde_first_step_with_sigma_max_inflates_variance_by_a4_over_4():
    # Published Flow-SDE at sigma = 1 substitutes sigma_max = sigmas[1] in 1 / (1 - sigma):
    # from x = eps ~ N(0, 1), mu = (1 + dt - a^2/2) x - M0 dt and std^2 = a^2, so the variance
    # after the step exceeds the true marginal by a^4/4 - a^2 dt - dt^2 S0^2, which does not
    # vanish as dt -> 0. Invariant 2 therefore holds from sigma < 1 on (tested above).
    a, sigma_1 = 0.7, 0.96
    x = torch.tensor([[0.0], [1.0]])  # mu is affine in x: two points give slope and offset
    v = _exact_velocity(x, 1.0)
    mean, std = sde_mean_std(x, v, 1.0, sigma_1, a, sde_type="flow", sigma_max=sigma_1)
    slope = (mean[1] - mean[0]).item()
    var_after = slope**2 + std[0].item() ** 2
    dt = sigma_1 - 1.0
    excess = var_after - _marginal(sigma_1)[1]
    assert mean[0].item() == pytest.approx(_marginal(sigma_1)[0], abs=1e-6)
    assert excess == pytest.approx(a**4 / 4 - a**2 * dt - dt**2 * S0**2, abs=1e-6)


# ---- invariant 3: log_prob against an independent float64 log-density ------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_log_prob_matches_float64_gaussian(sde_type, reduce, dtype):
    x, v = _inputs(dtype)
    sig, sig_next = _f32(SIGMA), _f32(SIGMA_NEXT)
    a = _f32([0.7, 0.5, 1.0, 0.3])  # per-sample noise level
    ref_mean, ref_std = _ref_mean_std64(x, v, sig, sig_next, a, sde_type, SIGMA_MAX)
    g = torch.Generator().manual_seed(1)
    given = (
        ref_mean + ref_std.view(-1, 1, 1, 1) * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    ).to(dtype)
    for prev in (None, given):  # sampled by the step, and a stored x' re-scored
        out = sde_step_with_logprob(
            x, v, sig, sig_next, a, sde_type=sde_type, reduce=reduce, prev_sample=prev,
            generator=torch.Generator().manual_seed(2), sigma_max=SIGMA_MAX,
        )  # fmt: skip
        for t in (out.prev_sample, out.log_prob, out.mean, out.std):
            assert t.dtype == torch.float32
        assert out.log_prob.shape == (B,) and out.std.shape == (B,)
        ref, scale = _ref_logpdf64(out.prev_sample, ref_mean, ref_std, reduce)
        # relative to the sum of |terms|: the reduced value itself may cancel to near 0
        err = (out.log_prob.double() - ref).abs()
        assert bool((err <= 1e-6 * scale).all()), (err / scale).max().item()
        torch.testing.assert_close(out.std.double(), ref_std, rtol=1e-6, atol=0)
        torch.testing.assert_close(out.mean.double(), ref_mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_sum_reduce_is_d_times_mean_reduce(sde_type):
    x, v = _inputs(torch.float32)
    kw = dict(sde_type=sde_type, sigma_max=SIGMA_MAX)
    first = sde_step_with_logprob(x, v, 0.7, 0.6, 0.8, generator=torch.Generator(), **kw)
    total = sde_step_with_logprob(
        x, v, 0.7, 0.6, 0.8, prev_sample=first.prev_sample, reduce="sum", **kw
    )
    torch.testing.assert_close(total.log_prob, D * first.log_prob, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_gradient_wrt_velocity_matches_float64_autograd(sde_type):
    x, v = _inputs(torch.float32)
    v32 = v.clone().requires_grad_(True)
    v64 = v.double().requires_grad_(True)
    sig, sig_next, a = _f32(SIGMA), _f32(SIGMA_NEXT), 0.7
    prev = sde_step_with_logprob(x, v, sig, sig_next, a, sde_type=sde_type, sigma_max=SIGMA_MAX)
    prev_sample = prev.prev_sample.requires_grad_(True)
    out = sde_step_with_logprob(
        x, v32, sig, sig_next, a, sde_type=sde_type, prev_sample=prev_sample, sigma_max=SIGMA_MAX
    )
    out.log_prob.sum().backward()
    mean64, std64 = _ref_mean_std64(x, v64, sig, sig_next, torch.full((B,), a), sde_type, SIGMA_MAX)
    _ref_logpdf64(prev_sample.detach(), mean64, std64, "mean")[0].sum().backward()
    torch.testing.assert_close(v32.grad.double(), v64.grad, rtol=1e-4, atol=1e-6)
    assert prev_sample.grad is None  # the stored x' is a constant


def test_cps_legacy_scale_is_negative_mean_squared_residual():
    x, v = _inputs(torch.float32)
    sig, sig_next = _f32(SIGMA), _f32(SIGMA_NEXT)
    ref_mean, _ = _ref_mean_std64(x, v, sig, sig_next, torch.full((B,), 0.5), "cps", None)
    for reduce in ("mean", "sum"):
        out = sde_step_with_logprob(
            x, v, sig, sig_next, 0.5, sde_type="cps", reduce=reduce, cps_legacy_scale=True
        )
        sq = ((out.prev_sample.double() - ref_mean) ** 2).reshape(B, -1)
        ref = -(sq.mean(1) if reduce == "mean" else sq.sum(1))
        torch.testing.assert_close(out.log_prob.double(), ref, rtol=1e-5, atol=0)


# ---- arguments, determinism, schedules ------------------------------------------------------


def test_flow_at_sigma_one_requires_sigma_max():
    x, v = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"sigma_max=sigmas\[1\]"):
        sde_step_with_logprob(x, v, 1.0, 0.96, 0.7, sde_type="flow")
    for sde_type in ("cps", "dance"):  # they do not divide by 1 - sigma
        sde_step_with_logprob(x, v, 1.0, 0.96, 0.7, sde_type=sde_type)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sde_type="ddim"), "sde_type"),
        (dict(reduce="max"), "reduce"),
        (dict(cps_legacy_scale=True), "cps_legacy_scale"),
        (dict(noise_level=-0.1), "noise_level"),
        (dict(sigma_next=0.8), "sigma_next"),
        (dict(sigma=torch.ones(3) * 0.7), "sigma"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    x, v = _inputs(torch.float32)
    args = dict(sigma=0.7, sigma_next=0.6, noise_level=0.7) | kwargs
    with pytest.raises(ValueError, match=name):
        sde_step_with_logprob(x, v, **args)


def test_generator_makes_sampling_deterministic():
    x, v = _inputs(torch.bfloat16)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return sde_step_with_logprob(x, v, 0.7, 0.6, 0.7, generator=g)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.prev_sample, c.prev_sample)
    assert a.prev_sample.dtype == torch.float32


def test_scalar_and_per_sample_sigmas_agree():
    x, v = _inputs(torch.float32)
    g = torch.Generator().manual_seed(0)
    one = sde_step_with_logprob(x, v, 0.7, 0.6, 0.7, generator=g)
    per = sde_step_with_logprob(
        x, v, torch.full((B,), 0.7), torch.full((B,), 0.6), torch.full((B,), 0.7),
        prev_sample=one.prev_sample,
    )  # fmt: skip
    torch.testing.assert_close(per.log_prob, one.log_prob, rtol=0, atol=0)
    assert sde_std(0.7, 0.6, 0.7, sde_type="dance").shape == ()


def test_schedule_shifts():
    sig = torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(shift_sigmas(sig, 3.0), torch.tensor([1.0, 0.75, 0.0]))
    assert shift_sigmas(0.25, 1.0) == 0.25
    torch.testing.assert_close(flux_time_shift(0.0, sig), sig)  # mu = 0 is the identity
    assert flux_time_shift(math.log(3.0), 0.5) == pytest.approx(0.75)  # = shift 3 at mu = log 3
    assert flux_time_shift(1.0, 0.0) == 0.0
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(2176) == pytest.approx(0.825)
