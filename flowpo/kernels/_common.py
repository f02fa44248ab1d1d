"""Triton pieces shared by the fused ops: the step coefficients and launch settings.

Importing this module imports Triton and runs `@triton.jit`: on a CPU machine TRITON_INTERPRET=1
must already be set (Triton decides interpreter vs compiler when the decorator runs), which
`flowpo.kernels.dispatch.resolve_backend` checks before anything imports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch settings. BLOCK elements per program on a GPU: 2048 (16 per thread at 4 warps) is
# Liger-Kernel's default range for memory-bound row kernels; NOT swept (no GPU during
# development) — sweep with benchmarks/bench_kernels.py on the target GPU and record it here.
GPU_BLOCK = 2048
GPU_WARPS = 4
# Interpreter: ~1.5 ms per program instance (docs/environment.md), and numpy is fast on big blocks,
# so a whole row (up to 2^17 elements) per program.
INTERPRETER_MAX_BLOCK = 1 << 17
FINALIZE_BLOCK = 1024  # partial sums per row read per iteration of a finalize kernel


@triton.jit
def step_coefficients(s, s_next, a, sigma_max, SDE_TYPE: tl.constexpr):
    """The step as an affine map of (x, v): mu - x = cx * x + cv * v; and its std
    (docs/algorithms.md §1; per sample, float32). SDE_TYPE: 0 flow, 1 cps, 2 dance (`_args.SDE_CODES`)."""
    dt = s_next - s
    if SDE_TYPE == 0:
        # flow: mu - x = [v + sigma_t^2 / (2 sigma) (x + (1 - sigma) v)] dt; sigma~ = sigma_max
        # at sigma == 1 so the first step stays finite
        s_tilde = tl.where(s == 1.0, sigma_max, s)
        sigma_t = a * tl.sqrt(s / (1.0 - s_tilde))
        drift = sigma_t * sigma_t / (2.0 * s)
        cx = drift * dt
        cv = (1.0 + drift * (1.0 - s)) * dt
        std = sigma_t * tl.sqrt(-dt)
    elif SDE_TYPE == 1:
        # cps: mu - x = (c - s') x + ((c - s')(1 - s) + dt) v, c = sqrt(s'^2 - std^2), with
        # c - s' = -std^2 / (c + s') (no cancellation); c + s' = 0 only where std = 0
        std = s_next * tl.sin(a * 1.5707963267948966)
        c = tl.sqrt(tl.maximum(s_next * s_next - std * std, 0.0))
        denom = c + s_next
        cx = tl.where(denom > 0, -(std * std) / tl.maximum(denom, 1e-30), 0.0)
        cv = cx * (1.0 - s) + dt
    else:
        # dance: mu - x = v dt + (a^2 / 2) (x + (1 - sigma) v) / sigma * dt
        half_a2 = 0.5 * a * a / s
        cx = half_a2 * dt
        cv = (1.0 + half_a2 * (1.0 - s)) * dt
        std = a * tl.sqrt(-dt)
    return cx, cv, std


def interpreting(kernel) -> bool:
    """Whether `kernel` was decorated in interpreter mode (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def require_runnable(kernel, device: torch.device) -> None:
    """Fail with the fix instead of Triton's '0 active drivers' on a CPU-only machine."""
    if device.type != "cuda" and not interpreting(kernel):
        raise RuntimeError(
            f"the Triton kernels cannot run on {device} tensors: Triton compiles for CUDA GPUs. "
            "On CPU set TRITON_INTERPRET=1 in the environment before flowpo.kernels' Triton "
            "modules are imported (tests only: slow), or use train.kernels=torch"
        )


def block_size(d: int, kernel, override: int | None = None) -> int:
    """Elements per program along D (a power of two; tails are masked)."""
    if override is not None:
        if override < 16 or override & (override - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {override}")
        return override
    if interpreting(kernel):
        return min(triton.next_power_of_2(d), INTERPRETER_MAX_BLOCK)
    return GPU_BLOCK


def launch_kwargs(kernel) -> dict:
    return {} if interpreting(kernel) else {"num_warps": GPU_WARPS}


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer of the launchers comes from here (tests poison it: every element
    must be written by a kernel)."""
    return torch.empty(shape, dtype=dtype, device=device)
