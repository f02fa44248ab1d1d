"""Step math of flow-matching samplers: ODE/SDE steps, log-probabilities and sigma schedules.

The one copy of these formulas (docs/algorithms.md §1), at the bottom of the package: the rollout
sampler and the trainer call the checked functions (`sde_step_with_logprob`, `sde_std`, ...),
and `flowpo.kernels.reference`, the spec the fused kernels are tested against, calls the
unchecked ones (`step_std`, `step_increment`, `log_density`). It imports nothing but torch.

Shapes: B batch, D latent elements per image (the product of the non-batch dims). Sigmas run
from 1 (noise) to 0 (data); dt = sigma_next - sigma is negative. The checked functions compute
in float32 whatever the input dtype: the mean overflows in half precision (sigma_t^2 / (2 sigma)
is large near sigma = 1) and bf16 rounds away its small drift correction; the log-prob residual
x' - mu, divided by a small std, would be mostly rounding error. The unchecked ones compute in
the dtype they are given (float32, or float64 for the kernels' gradchecks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SDE_TYPES = ("flow", "cps", "dance")
REDUCE_MODES = ("mean", "sum")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

Scalar = float | Tensor  # python float, 0-dim tensor, or (B,) tensor
ZERO_STD_MESSAGE = (
    "std == 0: noise_level=0 is the ODE step; use ode_step (a cps step to "
    "sigma_next=0 is deterministic too). Its log-probability is undefined."
)


@dataclass
class SDEStep:
    """One stochastic transition x -> x' ~ N(mean, std^2 I)."""

    prev_sample: Tensor  # (B, ...) float32, x' (the sampled or the given, detached, latent)
    log_prob: Tensor  # (B,) float32, log N(x'; mean, std^2) reduced over D
    mean: Tensor  # (B, ...) float32, mu (differentiable w.r.t. sample and velocity)
    std: Tensor  # (B,) float32, per-sample std of the transition


# --- argument checks (shared with the kernels' launchers) ------------------------------------


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def per_sample(value: Scalar, name: str, batch: int, device: torch.device) -> Tensor:
    """A float, 0-dim or (B,) tensor -> contiguous (B,) float32 on `device`."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        return t.expand(batch).contiguous()
    if t.shape != (batch,):
        raise ValueError(
            f"{name} must be a float or a ({batch},) tensor, got shape {tuple(t.shape)}"
        )
    return t.contiguous()


def check_schedule(
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: Tensor,
    *,
    sde_type: str,
    sigma_max: float | Tensor | None,
    nonzero_std: bool = False,
) -> float:
    """The checks on one step's schedule, with one host synchronisation: errors that name the
    cause instead of NaNs several steps later. Tensors of broadcastable shapes.

    sigma in (0, 1], sigma_next in [0, sigma], noise_level >= 0; flow needs sigma_max in
    (0, 1) where sigma == 1. nonzero_std: also refuse a step whose std is 0 (no log-density);
    flow and dance have std 0 exactly where a = 0 or dt = 0. Returns flow's sigma_max as a
    float (0.5, unused, where no sigma is 1).
    """
    s, s_next, a = sigma, sigma_next, noise_level
    if not nonzero_std:
        zero_std = torch.zeros((), dtype=torch.bool, device=s.device)
    elif sde_type == "cps":  # std = sigma_next sin(a pi / 2), as step_std computes it
        zero_std = s_next * torch.sin(a * (math.pi / 2)) == 0
    else:
        zero_std = (a == 0) | (s_next == s)
    flags = torch.stack(
        [
            ((s <= 0) | (s > 1)).any(),
            ((s_next < 0) | (s_next > s)).any(),
            (a < 0).any(),
            (s == 1).any(),
            zero_std.any(),
        ]
    ).tolist()  # the one host sync
    bad_sigma, bad_next, neg_a, at_one, zero = flags
    if bad_sigma:
        raise ValueError("sigma must lie in (0, 1]: the step starts from a noisy latent")
    if bad_next:
        raise ValueError("sigma_next must lie in [0, sigma]: sigmas decrease from noise to data")
    if neg_a:
        raise ValueError("noise_level must be >= 0")
    smax = 0.5
    if sde_type == "flow" and at_one:
        if sigma_max is None:
            raise ValueError(
                "sde_type='flow' at sigma == 1 divides by 1 - sigma; pass sigma_max=sigmas[1] "
                "(the second sigma of the schedule, as Flow-GRPO does)"
            )
        smax = float(sigma_max)
        if not 0.0 < smax < 1.0:
            raise ValueError(f"sigma_max must lie in (0, 1), got {smax}")
    if zero:
        raise ValueError(ZERO_STD_MESSAGE)
    return smax


def bcast(t: Tensor, like: Tensor) -> Tensor:
    """(B,) or 0-dim -> broadcastable against (B, ...)."""
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim)) if t.ndim == 1 else t


def reduce_d(t: Tensor, reduce: str) -> Tensor:
    """(B, ...) -> (B,) over the D latent elements: "mean" or "sum". reshape first: a (B,) input
    has D = 1, and mean(dim=()) would reduce B."""
    flat = t.reshape(t.shape[0], -1)
    return flat.mean(dim=1) if reduce == "mean" else flat.sum(dim=1)


# --- the formulas, unchecked, in the dtype of their inputs --------------------------------------


def step_std(
    sigma: Tensor, sigma_next: Tensor, noise_level: Tensor, *, sde_type: str, sigma_max: float
) -> Tensor:
    """Std of the Gaussian transition of one SDE step; tensors of broadcastable shapes.

    flow:  std = a * sqrt(sigma / (1 - s~)) * sqrt(-dt), s~ = sigma except s~ = sigma_max at
           sigma == 1 (Flow-GRPO uses sigma_max = sigmas[1] so the first step is finite)
    cps:   std = sigma_next * sin(a * pi / 2)
    dance: std = a * sqrt(sigma - sigma_next)
    """
    dt = sigma_next - sigma
    if sde_type == "cps":
        return sigma_next * torch.sin(noise_level * (math.pi / 2))
    if sde_type == "dance":
        return noise_level * torch.sqrt(-dt)
    return _flow_sigma_t(sigma, noise_level, sigma_max) * torch.sqrt(-dt)


def _flow_sigma_t(sigma: Tensor, a: Tensor, sigma_max: float) -> Tensor:
    """Flow-SDE diffusion coefficient sigma_t = a * sqrt(sigma / (1 - s~))."""
    s_tilde = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
    return a * torch.sqrt(sigma / (1 - s_tilde))


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
    """(mu - x, std): the step's increment (B, ...) and std (B,), in x's dtype; x, v (B, ...),
    the schedule (B,). No checks and no host sync (torch.compile sees one graph).

    The increment is kept apart from x so that the log-prob residual can be formed as
    (x' - x) - (mu - x): its rounding error then scales with the step rather than with |x|,
    which matters because the residual is divided by a small std.
    """
    s, s_next, a = (t.to(x.dtype) for t in (sigma, sigma_next, noise_level))
    dt = s_next - s
    std = step_std(s, s_next, a, sde_type=sde_type, sigma_max=sigma_max)
    dt_x = bcast(dt, x)
    x1_hat = x + bcast(1 - s, x) * v  # predicted noise eps
    if sde_type == "flow":
        sigma_t = _flow_sigma_t(s, a, sigma_max)
        delta = (v + bcast(sigma_t.square() / (2 * s), x) * x1_hat) * dt_x
    elif sde_type == "dance":
        # score = -(x - (1 - sigma) x0_hat) / sigma^2 = -x1_hat / sigma, as x - (1-s) x0_hat = s x1_hat
        delta = v * dt_x + 0.5 * bcast(a.square(), x) * (x1_hat / bcast(s, x)) * dt_x
    else:
        # cps: mu = (1 - s') x0_hat + c x1_hat with c = sqrt(s'^2 - std^2); as an increment
        # mu - x = (c - s') x + ((c - s')(1 - s) + dt) v, and c - s' = -std^2 / (c + s') has no
        # cancellation. c + s' = 0 only at s' = 0, where std = 0 and c - s' = 0.
        c = torch.sqrt((s_next.square() - std.square()).clamp_min(0))
        denom = c + s_next
        c_minus = torch.where(denom > 0, -std.square() / denom.clamp_min(1e-30), 0.0)
        delta = bcast(c_minus, x) * x + (bcast(c_minus * (1 - s), x) + dt_x) * v
    return delta, std


def log_density(
    resid: Tensor, std: Tensor, *, reduce: str = "mean", cps_legacy_scale: bool = False
) -> Tensor:
    """log N(x'; mu, std^2 I) reduced over D, from the residual x' - mu (B, ...) and std (B,).

    reduce: "mean" = per-element mean log-density (the published default, whose tiny clip
    ranges assume it); "sum" = the true log-density of the step (= D * mean).
    cps_legacy_scale: -reduce((x' - mu)^2), the published CPS code's scale (no constants, no
    1/(2 std^2)); its clip range 1e-5 assumes it."""
    sq = reduce_d(resid.square(), reduce)
    if cps_legacy_scale:
        return -sq
    n = 1 if reduce == "mean" else math.prod(resid.shape[1:])  # per-element constants over D
    return -sq / (2 * std.square()) - n * (torch.log(std) + HALF_LOG_2PI)


# --- the checked steps, in float32 ----------------------------------------------------------


def sde_std(
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sde_type: str,
    sigma_max: float | Tensor | None = None,
) -> Tensor:
    """Std of the Gaussian transition of one SDE step (docs/algorithms.md §1; formulas at
    `step_std`).

    Args are floats or (B,) tensors; returns float32, shape (B,) if any argument is (B,),
    else 0-dim. Zero std (a = 0, or cps at sigma_next = 0) is returned as is.
    """
    check_choice("sde_type", sde_type, SDE_TYPES)
    device = next(
        (t.device for t in (sigma, sigma_next, noise_level) if isinstance(t, Tensor)), None
    )
    s, s_next, a = (
        torch.as_tensor(t, dtype=torch.float32, device=device)
        for t in (sigma, sigma_next, noise_level)
    )
    smax = check_schedule(s, s_next, a, sde_type=sde_type, sigma_max=sigma_max)
    return step_std(s, s_next, a, sde_type=sde_type, sigma_max=smax)


def _checked_increment(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    sde_type: str,
    sigma_max: float | Tensor | None,
    nonzero_std: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x, mu - x, std) in float32 after the checks: x and the increment (B, ...), std (B,)."""
    check_choice("sde_type", sde_type, SDE_TYPES)
    if sample.shape != velocity.shape:
        raise ValueError(
            f"velocity {tuple(velocity.shape)} must match sample {tuple(sample.shape)}"
        )
    b, dev = sample.shape[0], sample.device
    s = per_sample(sigma, "sigma", b, dev)
    s_next = per_sample(sigma_next, "sigma_next", b, dev)
    a = per_sample(noise_level, "noise_level", b, dev)
    smax = check_schedule(s, s_next, a, sde_type=sde_type, sigma_max=sigma_max)
    x = sample.float()
    delta, std = step_increment(
        x, velocity.float(), s, s_next, a, sde_type=sde_type, sigma_max=smax
    )
    if nonzero_std and bool((std == 0).any()):
        raise ValueError(ZERO_STD_MESSAGE)
    return x, delta, std


def sde_mean_std(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sde_type: str = "flow",
    sigma_max: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean (B, ...) and std (B,) of one SDE step, float32. With noise_level = 0 the mean is
    exactly the Euler ODE step and std is 0 (the case `sde_step_with_logprob` refuses)."""
    x, delta, std = _checked_increment(
        sample, velocity, sigma, sigma_next, noise_level, sde_type, sigma_max
    )
    return x + delta, std


def sde_step_with_logprob(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sde_type: str = "flow",
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
    sigma_max: float | Tensor | None = None,
    cps_legacy_scale: bool = False,
) -> SDEStep:
    """One SDE step x_sigma -> x_sigma_next with the log-probability of the transition.

    sample, velocity: (B, ...) any float dtype; v = dx/dsigma = eps - x0.
    sigma, sigma_next, noise_level: floats or (B,) tensors (per-sample schedules).
    prev_sample: (B, ...) stored x' to re-score (treated as a constant); None draws
        x' = mean + std * noise with float32 noise from `generator` on sample's device.
    reduce: "mean" = per-element mean log-density over D (the published default, whose tiny
        clip ranges assume it); "sum" = the true log-density of the step (= D * mean).
    sigma_max: Flow-SDE's substitute for sigma at sigma == 1; pass sigmas[1].
    cps_legacy_scale: log_prob = -reduce((x' - mu)^2), the published CPS code's scale
        (no constants, no 1/(2 std^2)); its clip range 1e-5 assumes it. cps only.
    Returns SDEStep with float32 tensors; gradients flow to sample and velocity through mean
    and log_prob. Raises if any std is 0 (no log-density exists).
    """
    check_choice("sde_type", sde_type, SDE_TYPES)
    check_choice("reduce", reduce, REDUCE_MODES)
    if cps_legacy_scale and sde_type != "cps":
        raise ValueError(f"cps_legacy_scale=True only applies to sde_type='cps', got {sde_type!r}")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)} must match sample {tuple(sample.shape)}"
        )
    x, delta, std = _checked_increment(
        sample, velocity, sigma, sigma_next, noise_level, sde_type, sigma_max, nonzero_std=True
    )
    mean = x + delta
    if prev_sample is None:
        noise = torch.randn(
            sample.shape, generator=generator, device=sample.device, dtype=torch.float32
        )
        prev_sample = mean.detach() + bcast(std, x) * noise
    else:
        prev_sample = prev_sample.detach().float()
    resid = (prev_sample - x) - delta  # = x' - mu, formed from the increment (step_increment)
    log_prob = log_density(resid, std, reduce=reduce, cps_legacy_scale=cps_legacy_scale)
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def ode_step(sample: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """Euler step x + v * (sigma_next - sigma), float32. sample/velocity (B, ...), sigmas floats
    or (B,) tensors."""
    b, dev = sample.shape[0], sample.device
    dt = per_sample(sigma_next, "sigma_next", b, dev) - per_sample(sigma, "sigma", b, dev)
    x = sample.float()
    return x + velocity.float() * bcast(dt, x)


# --- schedules. Formulas as in diffusers' FlowMatchEulerDiscreteScheduler (static `shift` and
# exponential dynamic shifting) and FluxPipeline's `calculate_shift`; written from the formulas.


def shift_sigmas(sigmas: Tensor | float, shift: float) -> Tensor | float:
    """Static shift (SD3, shift = 3): sigma' = s * sigma / (1 + (s - 1) * sigma).

    Keeps 0 and 1 fixed and moves steps towards high noise for s > 1."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_time_shift(mu: float, sigmas: Tensor | float) -> Tensor | float:
    """Dynamic (resolution-dependent) shift of FLUX / Qwen-Image:
    sigma' = e^mu / (e^mu + (1 / sigma - 1)); sigma = 0 maps to 0 and 1 to 1."""
    if isinstance(sigmas, Tensor):
        # 1/0 = inf gives exactly 0 at sigma = 0
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    if sigmas <= 0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu for `flux_time_shift`: linear in the number of latent tokens, base_shift at
    base_seq_len and max_shift at max_seq_len (extrapolated outside)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)
