"""Argument checks shared by the Triton ops and their torch references (no Triton import).

Both paths accept the same arguments and raise the same errors as `flowpo.sde`'s checked
steps, through the same checks (`flowpo.sde.check_schedule`: one host synchronisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowpo.sde import (
    REDUCE_MODES,
    SDE_TYPES,
    Scalar,
    check_choice,
    check_schedule,
    per_sample,
)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SDE_CODES = {name: i for i, name in enumerate(SDE_TYPES)}  # constexpr SDE_TYPE of the kernels


@dataclass
class StepArgs:
    sigma: Tensor  # (B,) float32, contiguous
    sigma_next: Tensor  # (B,) float32
    noise_level: Tensor  # (B,) float32
    sigma_max: float  # flow's substitute for sigma at sigma == 1 (0.5 when unused)
    batch: int  # B
    rep: int  # B // S: rows b share sample row b // rep
    d: int  # D latent elements per image


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
    """Validate one step's arguments as `flowpo.sde` does; per-sample tensors, B, S, D.

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
    smax = check_schedule(s, s_next, a, sde_type=sde_type, sigma_max=sigma_max, nonzero_std=True)
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
