"""Choosing between the Triton kernels and the torch path (config `train.kernels`).

Nothing here imports Triton: with backend "torch" the trainer never touches it, so a machine
without a working Triton (or without Triton) runs the torch path.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

from flowpo.sde import Scalar, SDEStep, per_sample, step_std

KERNEL_MODES = ("auto", "triton", "torch")
_KERNEL_MODULES = ("flowpo.kernels.sde_logprob", "flowpo.kernels.guard_loss")


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET as Triton reads it (1/true/on/yes)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(mode: str, device: torch.device | str) -> str:
    """train.kernels -> "triton" | "torch" for tensors on `device`.

    auto: Triton on CUDA (when installed), torch elsewhere. triton: on CPU it needs the Triton
    interpreter (TRITON_INTERPRET=1 before the kernels are imported; slow, for tests). torch:
    the plain reference path of `flowpo.sde`.
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"train.kernels={mode!r} is not supported; choose one of {KERNEL_MODES}")
    device = torch.device(device)
    if mode == "torch":
        return "torch"
    if mode == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            "train.kernels=triton but triton is not installed; install it or use "
            "train.kernels=torch (or auto)"
        )
    if device.type != "cuda":
        if not interpreter_enabled():
            raise RuntimeError(
                f"train.kernels=triton on a {device.type} device needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 in the environment (slow: for tests), or use "
                "train.kernels=torch (or auto, which picks torch off CUDA)"
            )
        for name in _KERNEL_MODULES:  # decorated before the variable was set: compiled kernels
            mod = sys.modules.get(name)
            if mod is not None and not _interpreted(mod):
                raise RuntimeError(
                    f"{name} was imported before TRITON_INTERPRET=1 was set, so its kernels "
                    "target a GPU; set the variable before anything imports flowpo's kernels"
                )
    return "triton"


def _interpreted(module) -> bool:
    from flowpo.kernels._common import interpreting

    kernel = next(v for k, v in vars(module).items() if k.endswith("_fwd_kernel"))
    return interpreting(kernel)


def fused_sde_step(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sde_type: str = "flow",
    prev_sample: Tensor,
    reduce: str = "mean",
    sigma_max: float | Tensor | None = None,
    cps_legacy_scale: bool = False,
    mean_out: bool = True,
) -> SDEStep:
    """Drop-in for `flowpo.sde.sde_step_with_logprob` when re-scoring a stored step (prev_sample
    given), through the fused kernel. mean_out=False skips writing the mean (SDEStep.mean is
    then None): the trainer needs it only for the KL term."""
    from flowpo.kernels.sde_logprob import sde_step_logprob

    out = sde_step_logprob(
        sample,
        velocity,
        prev_sample,
        sigma,
        sigma_next,
        noise_level,
        sde_type=sde_type,
        reduce=reduce,
        sigma_max=sigma_max,
        mean_out=mean_out,
        cps_legacy_scale=cps_legacy_scale,
    )
    log_prob, mean = out if mean_out else (out, None)
    b, dev = velocity.shape[0], velocity.device
    std = step_std(  # (B,); sde_step_logprob has checked the arguments
        per_sample(sigma, "sigma", b, dev),
        per_sample(sigma_next, "sigma_next", b, dev),
        per_sample(noise_level, "noise_level", b, dev),
        sde_type=sde_type,
        sigma_max=0.5 if sigma_max is None else float(sigma_max),
    )
    return SDEStep(prev_sample=prev_sample.detach().float(), log_prob=log_prob, mean=mean, std=std)
