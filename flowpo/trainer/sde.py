"""Step math of flow-matching samplers: ODE/SDE steps, log-probabilities and sigma schedules.

This is the plain-torch reference (ALGORITHMS.md §1): the rollout sampler and the trainer call
it directly, and the fused kernels are tested against it. It imports nothing but torch.

Shapes: B batch, D latent elements per image (the product of the non-batch dims). Sigmas run
from 1 (noise) to 0 (data); dt = sigma_next - sigma is negative. Every function computes in
float32 whatever the input dtype: the mean overflows in half precision (sigma_t^2 / (2 sigma)
is large near sigma = 1) and bf16 rounds away its small drift correction; the log-prob residual
x' - mu, divided by a small std, would be mostly rounding error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SDE_TYPES = ("flow", "cps", "dance")
REDUCE_MODES = ("mean", "sum")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

Scalar = float | Tensor  # python float, 0-dim tensor, or (B,) tensor


@dataclass
class SDEStep:
    """One stochastic transition x -> x' ~ N(mean, std^2 I)."""

    prev_sample: Tensor  # (B, ...) float32, x' (the sampled or the given, detached, latent)
    log_prob: Tensor  # (B,) float32, log N(x'; mean, std^2) reduced over D
    mean: Tensor  # (B, ...) float32, mu (differentiable w.r.t. sample and velocity)
    std: Tensor  # (B,) float32, per-sample std of the transition


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def _f32(value: Scalar, device: torch.device | None = None) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=device)


def _per_sample(value: Scalar, name: str, batch: int, device: torch.device) -> Tensor:
    """A float, 0-dim or (B,) tensor -> (B,) float32 on `device`."""
    t = _f32(value, device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"{name} must be a float or a ({batch},) tensor, got shape {tuple(t.shape)}"
        )
    return t


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """(B,) or 0-dim -> broadcastable against (B, ...)."""
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim)) if t.ndim == 1 else t


def _reduce(t: Tensor, reduce: str) -> Tensor:
    """(B, ...) -> (B,). reshape first: a (B,) input has D = 1, and mean(dim=()) would reduce B."""
    flat = t.reshape(t.shape[0], -1)
    return flat.mean(dim=1) if reduce == "mean" else flat.sum(dim=1)


def _check_sigmas(sigma: Tensor, sigma_next: Tensor) -> None:
    # These checks sync the device; the reference trades that for errors that name the cause
    # instead of NaNs several steps later.
    if bool(((sigma <= 0) | (sigma > 1)).any()):
        raise ValueError("sigma must lie in (0, 1]: the step starts from a noisy latent")
    if bool(((sigma_next < 0) | (sigma_next > sigma)).any()):
        raise ValueError("sigma_next must lie in [0, sigma]: sigmas decrease from noise to data")


def sde_std(
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sde_type: str,
    sigma_max: float | Tensor | None = None,
) -> Tensor:
    """Std of the Gaussian transition of one SDE step (ALGORITHMS.md §1).

    flow:  std = a * sqrt(sigma / (1 - s~)) * sqrt(-dt), s~ = sigma except s~ = sigma_max at
           sigma == 1 (Flow-GRPO uses sigma_max = sigmas[1] so the first step is finite)
    cps:   std = sigma_next * sin(a * pi / 2)
    dance: std = a * sqrt(sigma - sigma_next)

    Args are floats or (B,) tensors; returns float32, shape (B,) if any argument is (B,),
    else 0-dim. Zero std (a = 0, or cps at sigma_next = 0) is returned as is.
    """
    _check_choice("sde_type", sde_type, SDE_TYPES)
    device = next(
        (t.device for t in (sigma, sigma_next, noise_level) if isinstance(t, Tensor)), None
    )
    s, s_next, a = _f32(sigma, device), _f32(sigma_next, device), _f32(noise_level, device)
    _check_sigmas(s, s_next)
    if bool((a < 0).any()):
        raise ValueError("noise_level must be >= 0")
    dt = s_next - s
    if sde_type == "cps":
        return s_next * torch.sin(a * (math.pi / 2))
    if sde_type == "dance":
        return a * torch.sqrt(-dt)
    return _flow_sigma_t(s, a, sigma_max) * torch.sqrt(-dt)


def _flow_sigma_t(sigma: Tensor, a: Tensor, sigma_max: float | Tensor | None) -> Tensor:
    """Flow-SDE diffusion coefficient sigma_t = a * sqrt(sigma / (1 - s~))."""
    at_one = sigma == 1
    if not bool(at_one.any()):
        return a * torch.sqrt(sigma / (1 - sigma))
    if sigma_max is None:
        raise ValueError(
            "sde_type='flow' at sigma == 1 divides by 1 - sigma; pass sigma_max=sigmas[1] "
            "(the second sigma of the schedule, as Flow-GRPO does)"
        )
    if not 0.0 < float(sigma_max) < 1.0:
        raise ValueError(f"sigma_max must lie in (0, 1), got {float(sigma_max)}")
    s_tilde = torch.where(at_one, _f32(sigma_max, sigma.device), sigma)
    return a * torch.sqrt(sigma / (1 - s_tilde))


def _mean_parts(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    sde_type: str,
    sigma_max: float | Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x, mu - x, std): x and the increment (B, ...) float32, std (B,).

    The increment is kept apart from x so that the log-prob residual can be formed as
    (x' - x) - (mu - x): its rounding error then scales with the step rather than with |x|,
    which matters because the residual is divided by a small std.
    """
    _check_choice("sde_type", sde_type, SDE_TYPES)
    if sample.shape != velocity.shape:
        raise ValueError(
            f"velocity {tuple(velocity.shape)} must match sample {tuple(sample.shape)}"
        )
    b, dev = sample.shape[0], sample.device
    s = _per_sample(sigma, "sigma", b, dev)
    s_next = _per_sample(sigma_next, "sigma_next", b, dev)
    a = _per_sample(noise_level, "noise_level", b, dev)
    std = sde_std(s, s_next, a, sde_type=sde_type, sigma_max=sigma_max)
    x, v = sample.float(), velocity.float()
    dt = _bcast(s_next - s, x)
    x1_hat = x + _bcast(1 - s, x) * v  # predicted noise eps
    if sde_type == "flow":
        sigma_t = _bcast(_flow_sigma_t(s, a, sigma_max), x)
        delta = (v + sigma_t.square() / (2 * _bcast(s, x)) * x1_hat) * dt
    elif sde_type == "dance":
        # score = -(x - (1 - sigma) x0_hat) / sigma^2 = -x1_hat / sigma, as x - (1-s) x0_hat = s x1_hat
        delta = v * dt + 0.5 * _bcast(a.square(), x) * (x1_hat / _bcast(s, x)) * dt
    else:
        # cps: mu = (1 - s') x0_hat + c x1_hat with c = sqrt(s'^2 - std^2); as an increment
        # mu - x = (c - s') x + ((c - s')(1 - s) + dt) v, and c - s' = -std^2 / (c + s') has no
        # cancellation. c + s' = 0 only at s' = 0, where std = 0 and c - s' = 0.
        c = torch.sqrt((s_next.square() - std.square()).clamp_min(0))
        denom = c + s_next
        c_minus = torch.where(denom > 0, -std.square() / denom.clamp_min(1e-30), 0.0)
        c_minus = _bcast(c_minus, x)
        delta = c_minus * x + (c_minus * _bcast(1 - s, x) + dt) * v
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
    x, delta, std = _mean_parts(
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
    _check_choice("sde_type", sde_type, SDE_TYPES)
    _check_choice("reduce", reduce, REDUCE_MODES)
    if cps_legacy_scale and sde_type != "cps":
        raise ValueError(f"cps_legacy_scale=True only applies to sde_type='cps', got {sde_type!r}")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)} must match sample {tuple(sample.shape)}"
        )
    x, delta, std = _mean_parts(
        sample, velocity, sigma, sigma_next, noise_level, sde_type, sigma_max
    )
    if bool((std == 0).any()):
        raise ValueError(
            "std == 0: noise_level=0 is the ODE step; use ode_step (a cps step to "
            "sigma_next=0 is deterministic too). Its log-probability is undefined."
        )
    mean = x + delta
    if prev_sample is None:
        noise = torch.randn(
            sample.shape, generator=generator, device=sample.device, dtype=torch.float32
        )
        prev_sample = mean.detach() + _bcast(std, x) * noise
    else:
        prev_sample = prev_sample.detach().float()
    resid = (prev_sample - x) - delta  # = x' - mu, formed from the increment (see _mean_parts)
    sq = _reduce(resid.square(), reduce)
    if cps_legacy_scale:
        log_prob = -sq
    else:
        n = 1 if reduce == "mean" else resid[0].numel()  # per-element constants summed over D
        log_prob = -sq / (2 * std.square()) - n * (torch.log(std) + _HALF_LOG_2PI)
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def ode_step(sample: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """Euler step x + v * (sigma_next - sigma), float32. sample/velocity (B, ...), sigmas floats
    or (B,) tensors."""
    b, dev = sample.shape[0], sample.device
    dt = _per_sample(sigma_next, "sigma_next", b, dev) - _per_sample(sigma, "sigma", b, dev)
    x = sample.float()
    return x + velocity.float() * _bcast(dt, x)


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
