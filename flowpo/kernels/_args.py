"""Argument checks shared by the Triton ops and their torch references (no Triton import).

Both paths accept the same arguments and raise the same errors as `flowpo.trainer.sde`, with
one host synchronisation per call (the reference in `trainer.sde` syncs once per check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowpo.trainer.sde import REDUCE_MODES, SDE_TYPES

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SDE_CODES = {name: i for i, name in enumerate(SDE_TYPES)}  # constexpr SDE_TYPE of the kernels

Scalar = float | Tensor  # python float, 0-dim tensor or (B,) tensor


@dataclass
class StepArgs:
    sigma: Tensor  # (B,) float32, contiguous
    sigma_next: Tensor  # (B,) float32
    noise_level: Tensor  # (B,) float32
    sigma_max: float  # flow's substitute for sigma at sigma == 1 (0.5 when unused)
    batch: int  # B
    rep: int  # B // S: rows b share sample row b // rep
    d: int  # D latent elements per image


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


def sample_rep(sample: Tensor, like: Tensor, name: str = "velocity") -> int:
    """How many rows of `like` (B, ...) share one row of `sample` (S, ...): B // S.

    S = 1 (one latent for the batch) or S = B / G (E-GRPO: G branches share their anchor
    latent; the branches of one latent are consecutive rows, as `repeat_interleave` lays out).
    """
    b, s = like.shape[0], sample.shape[0]
    if sample.shape[1:] != like.shape[1:] or s == 0 or b % s != 0:
        raise ValueError(
            f"sample {tuple(sample.shape)} must match {name} {tuple(like.shape)} except in the "
            f"batch, whose size must divide {b} (rows b share sample row b // (B // S))"
        )
    return b // s


def expand_sample(sample: Tensor, batch: int) -> Tensor:
    """(S, ...) -> (B, ...) with row b = sample[b // (B // S)] (a copy only when S < B)."""
    rep = batch // sample.shape[0]
    return sample if rep == 1 else sample.repeat_interleave(rep, dim=0)


def check_step(
    sample: Tensor,
    velocity: Tensor,
    prev_sample: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sde_type: str,
    sigma_max: float | Tensor | None,
    kernel_dtypes: bool = False,
    extra: dict[str, Tensor] | None = None,
) -> StepArgs:
    """Validate one step's arguments as `trainer.sde` does; per-sample tensors, B, S, D.

    extra: further (B, ...) tensors that must match velocity (e.g. mean_old).
    kernel_dtypes: also require float32/bfloat16/float16 latents (the kernels' loads).
    """
    check_choice("sde_type", sde_type, SDE_TYPES)
    if velocity.ndim < 1 or velocity.shape[0] == 0:
        raise ValueError(f"velocity must be (B, ...) with B >= 1, got {tuple(velocity.shape)}")
    for name, t in {"prev_sample": prev_sample, **(extra or {})}.items():
        if t.shape != velocity.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match velocity {tuple(velocity.shape)}")
    rep = sample_rep(sample, velocity)
    tensors = {"sample": sample, "velocity": velocity, "prev_sample": prev_sample, **(extra or {})}
    if kernel_dtypes:
        for name, t in tensors.items():
            if t.dtype not in KERNEL_DTYPES:
                raise TypeError(
                    f"{name} has dtype {t.dtype}; the kernels take float32, bfloat16 or float16 "
                    "(use the torch reference, flowpo.kernels.reference, for float64)"
                )
    for name, t in tensors.items():
        if t.device != velocity.device:
            raise ValueError(f"{name} is on {t.device}, velocity on {velocity.device}")
    b, dev = velocity.shape[0], velocity.device
    s = per_sample(sigma, "sigma", b, dev)
    s_next = per_sample(sigma_next, "sigma_next", b, dev)
    a = per_sample(noise_level, "noise_level", b, dev)
    if sde_type == "cps":  # std = sigma_next sin(a pi / 2), as trainer.sde computes it
        zero_std = s_next * torch.sin(a * (math.pi / 2)) == 0
    else:  # flow, dance: std = a * f(sigma) * sqrt(-dt)
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
        raise ValueError(
            "std == 0: noise_level=0 is the ODE step; use ode_step (a cps step to "
            "sigma_next=0 is deterministic too). Its log-probability is undefined."
        )
    d = math.prod(velocity.shape[1:])
    return StepArgs(s, s_next, a, smax, b, rep, d)


def check_guard(
    advantages: Tensor, batch: int, clip_low: float, clip_high: float, device: torch.device
) -> Tensor:
    """advantages (B,) -> contiguous float32 on device; clip ranges must be >= 0."""
    if advantages.shape != (batch,):
        raise ValueError(f"advantages must be ({batch},), got {tuple(advantages.shape)}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low ({clip_low}) and clip_high ({clip_high}) must be >= 0")
    return advantages.detach().to(device=device, dtype=torch.float32).contiguous()


def check_reduce(reduce: str, sde_type: str, cps_legacy_scale: bool) -> None:
    check_choice("reduce", reduce, REDUCE_MODES)
    if cps_legacy_scale and sde_type != "cps":
        raise ValueError(f"cps_legacy_scale=True only applies to sde_type='cps', got {sde_type!r}")
