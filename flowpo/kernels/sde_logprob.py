"""Fused log-probability of one stored SDE step, with its gradient into the velocity.

Re-scoring a stored transition (x, x') with a fresh velocity v is, per sample b,
    mu = x + cx_b x + cv_b v,   log_prob_b = -reduce_D((x' - mu)^2) q_b - n (log std_b + ½ log 2π)
with per-sample coefficients (cx, cv, std) of the SDE type (docs/algorithms.md §1;
q = 1 / (2 std^2), or q = 1 and no constants on the legacy CPS scale; n = 1 for reduce="mean", D for "sum").
Eager torch makes a dozen passes over (B, D); here:

- `_sde_logprob_fwd_kernel`, grid (B, D / BLOCK): reads x, v, x' once, writes each block's
  sum of (x' - mu)^2 and, when autograd needs it, d log_prob / d v = 2 q cv (x' - mu) / n_red
  (known before the reduction: it only needs per-sample scalars) and, when asked, mu.
- `_sde_logprob_finalize_kernel`, grid (B,): sums the partials (fixed order: deterministic, no
  atomics) and writes log_prob and cv.
- `_sde_logprob_bwd_kernel`, grid (B, D / BLOCK): grad_v = g_lp * (d log_prob / d v) + cv * g_mu.

Bytes: forward (S + 2B) D reads (+ B D writes of the gradient in the velocity dtype when training,
+ 4 B D for the float32 mean), backward 2 B D. The minimum for forward + backward is one read of
x, v, x' and one write of grad_v; emitting the gradient in the forward costs one extra write and
read of B D, as the upstream gradient is not known until the backward.

`sample` may be (S, ...) with S = 1 or B / G: rows b share sample row b // (B // S), so branches
that start from one latent (E-GRPO) need one copy. Gradients flow to velocity only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from flowpo.kernels import _common
from flowpo.kernels._args import SDE_CODES, Scalar, check_reduce, check_step
from flowpo.kernels._common import step_coefficients


@triton.jit
def _sde_logprob_fwd_kernel(
    x_ptr,  # (S, D) sample, any float dtype
    v_ptr,  # (B, D) velocity
    xn_ptr,  # (B, D) prev_sample x'
    sigma_ptr,  # (B,) float32
    sigma_next_ptr,  # (B,) float32
    a_ptr,  # (B,) float32 noise level
    partial_ptr,  # (B, C) float32: sum over each block of (x' - mu)^2
    mean_ptr,  # (B, D) float32 mu, if WRITE_MEAN
    grad_ptr,  # (B, D) velocity dtype: d log_prob / d v, if WRITE_GRAD
    D,
    num_chunks,
    rep,  # B // S
    sigma_max,
    inv_n_red,  # 1 / D for reduce="mean", 1 for "sum"
    SDE_TYPE: tl.constexpr,
    LEGACY: tl.constexpr,
    WRITE_MEAN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.load(sigma_ptr + pid_b)
    s_next = tl.load(sigma_next_ptr + pid_b)
    a = tl.load(a_ptr + pid_b)
    cx, cv, std = step_coefficients(s, s_next, a, sigma_max, SDE_TYPE)

    offs = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    row = pid_b.to(tl.int64) * D
    x_row = (pid_b // rep).to(tl.int64) * D
    # float32 math whatever the storage: the residual is divided by a small std
    x = tl.load(x_ptr + x_row + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(xn_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    delta = cx * x + cv * v  # mu - x
    resid = tl.where(mask, (xn - x) - delta, 0.0)  # x' - mu from the increment: error ~ step
    tl.store(partial_ptr + pid_b * num_chunks + pid_c, tl.sum(resid * resid, axis=0))
    if WRITE_MEAN:
        tl.store(mean_ptr + row + offs, x + delta, mask=mask)
    if WRITE_GRAD:
        if LEGACY:  # log_prob = -reduce(resid^2)
            scale = 2.0 * cv * inv_n_red
        else:  # log_prob = -reduce(resid^2) / (2 std^2) - constants
            scale = cv / (std * std) * inv_n_red
        g = scale * resid
        tl.store(grad_ptr + row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sde_logprob_finalize_kernel(
    partial_ptr,  # (B, C) float32
    sigma_ptr,
    sigma_next_ptr,
    a_ptr,
    log_prob_ptr,  # (B,) float32 out
    cv_ptr,  # (B,) float32 out: d mu / d v, for the backward
    num_chunks,
    n_red,  # D for reduce="mean" (the divisor), 1 for "sum"
    n_const,  # 1 for reduce="mean", D for "sum" (per-element constants summed over D)
    sigma_max,
    SDE_TYPE: tl.constexpr,
    LEGACY: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, num_chunks, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        acc += tl.load(partial_ptr + pid_b * num_chunks + offs, mask=offs < num_chunks, other=0.0)
    sq = tl.sum(acc, axis=0) / n_red
    s = tl.load(sigma_ptr + pid_b)
    s_next = tl.load(sigma_next_ptr + pid_b)
    a = tl.load(a_ptr + pid_b)
    cx, cv, std = step_coefficients(s, s_next, a, sigma_max, SDE_TYPE)
    if LEGACY:
        log_prob = -sq
    else:
        log_prob = -sq / (2.0 * std * std) - n_const * (tl.log(std) + 0.9189385332046727)
    tl.store(log_prob_ptr + pid_b, log_prob)
    tl.store(cv_ptr + pid_b, cv)


@triton.jit
def _sde_logprob_bwd_kernel(
    grad_ptr,  # (B, D) d log_prob / d v from the forward
    g_lp_ptr,  # (B,) float32 upstream gradient of log_prob
    g_mean_ptr,  # (B, D) float32 upstream gradient of mu, if HAS_G_MEAN
    cv_ptr,  # (B,) float32
    out_ptr,  # (B, D) velocity dtype
    D,
    HAS_G_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    row = pid_b.to(tl.int64) * D
    g = tl.load(grad_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    g = g * tl.load(g_lp_ptr + pid_b)
    if HAS_G_MEAN:
        gm = tl.load(g_mean_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(cv_ptr + pid_b) * gm
    tl.store(out_ptr + row + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


# --- launchers ----------------------------------------------------------------------------------


def sde_logprob_forward(
    x: Tensor,
    v: Tensor,
    xn: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: Tensor,
    *,
    sde_type: str,
    reduce: str,
    sigma_max: float,
    cps_legacy_scale: bool,
    write_mean: bool,
    write_grad: bool,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """x (S, D), v and xn (B, D) contiguous; sigmas (B,) float32 contiguous.

    Returns log_prob (B,) float32, mean (B, D) float32 or None, d log_prob / d v (B, D) in v's
    dtype or None, cv (B,) float32."""
    kernel = _sde_logprob_fwd_kernel
    _common.require_runnable(kernel, v.device)
    b, d = v.shape
    block = _common.block_size(d, kernel, block_size)
    chunks = triton.cdiv(d, block)
    dev = v.device
    partial = _common.alloc((b, chunks), torch.float32, dev)
    mean = _common.alloc((b, d), torch.float32, dev) if write_mean else None
    grad = _common.alloc((b, d), v.dtype, dev) if write_grad else None
    log_prob = _common.alloc((b,), torch.float32, dev)
    cv = _common.alloc((b,), torch.float32, dev)
    code, legacy = SDE_CODES[sde_type], bool(cps_legacy_scale)
    kernel[(b, chunks)](
        x,
        v,
        xn,
        sigma,
        sigma_next,
        noise_level,
        partial,
        mean if write_mean else partial,  # unused pointer when the constexpr is off
        grad if write_grad else partial,
        d,
        chunks,
        b // x.shape[0],
        sigma_max,
        1.0 / d if reduce == "mean" else 1.0,
        SDE_TYPE=code,
        LEGACY=legacy,
        WRITE_MEAN=write_mean,
        WRITE_GRAD=write_grad,
        BLOCK=block,
        **_common.launch_kwargs(kernel),
    )
    _sde_logprob_finalize_kernel[(b,)](
        partial,
        sigma,
        sigma_next,
        noise_level,
        log_prob,
        cv,
        chunks,
        float(d) if reduce == "mean" else 1.0,
        1.0 if reduce == "mean" else float(d),
        sigma_max,
        SDE_TYPE=code,
        LEGACY=legacy,
        BLOCK_C=max(16, min(triton.next_power_of_2(chunks), _common.FINALIZE_BLOCK)),
    )
    return log_prob, mean, grad, cv


def sde_logprob_backward(
    grad: Tensor,
    cv: Tensor,
    g_log_prob: Tensor | None,
    g_mean: Tensor | None,
    *,
    block_size: int | None = None,
) -> Tensor:
    """grad_v (B, D) in grad's dtype = g_log_prob * grad + cv * g_mean (either may be None)."""
    kernel = _sde_logprob_bwd_kernel
    b, d = grad.shape
    block = _common.block_size(d, kernel, block_size)
    if g_log_prob is None:
        g_log_prob = torch.zeros(b, dtype=torch.float32, device=grad.device)
    g_log_prob = g_log_prob.float().contiguous()
    if g_mean is not None:
        g_mean = g_mean.reshape(b, d).contiguous()
    out = _common.alloc((b, d), grad.dtype, grad.device)
    kernel[(b, triton.cdiv(d, block))](
        grad,
        g_log_prob,
        g_mean if g_mean is not None else grad,
        cv,
        out,
        d,
        HAS_G_MEAN=g_mean is not None,
        BLOCK=block,
        **_common.launch_kwargs(kernel),
    )
    return out


# --- autograd -----------------------------------------------------------------------------------


class SDEStepLogProbFunction(torch.autograd.Function):
    """log_prob (and mu) of a stored step; differentiable w.r.t. velocity only."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # (S, D)
        v: Tensor,  # (B, D)
        xn: Tensor,  # (B, D)
        sigma: Tensor,
        sigma_next: Tensor,
        noise_level: Tensor,
        opts: dict,
    ):
        write_grad = ctx.needs_input_grad[1]
        log_prob, mean, grad, cv = sde_logprob_forward(
            x, v, xn, sigma, sigma_next, noise_level, write_grad=write_grad, **opts
        )
        ctx.save_for_backward(grad, cv)
        ctx.block_size = opts.get("block_size")
        ctx.set_materialize_grads(False)
        return (log_prob, mean) if opts["write_mean"] else log_prob

    @staticmethod
    def backward(ctx, g_log_prob, g_mean=None):
        grad, cv = ctx.saved_tensors
        if g_log_prob is None and g_mean is None:
            return (None,) * 7
        grad_v = sde_logprob_backward(grad, cv, g_log_prob, g_mean, block_size=ctx.block_size)
        return None, grad_v, None, None, None, None, None


def sde_step_logprob(
    sample: Tensor,
    velocity: Tensor,
    prev_sample: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sde_type: str = "flow",
    reduce: str = "mean",
    sigma_max: float | Tensor | None = None,
    mean_out: bool = False,
    cps_legacy_scale: bool = False,
    block_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of the stored transition sample -> prev_sample under velocity (fused).

    The same numbers as `flowpo.sde.sde_step_with_logprob(sample, velocity, sigma, sigma_next,
    noise_level, prev_sample=prev_sample, ...)` (float32 rounding aside).
    sample: (S, ...) x, S in {1, B/G, B} (rows b use sample row b // (B // S));
    velocity, prev_sample: (B, ...); float32, bfloat16 or float16, math in float32.
    sigma, sigma_next, noise_level: floats or (B,) tensors. sigma_max: flow's substitute for
    sigma at sigma == 1 (sigmas[1]). reduce: "mean" | "sum"; cps_legacy_scale: the published CPS
    scale -reduce((x' - mu)^2). block_size: elements per program (tuning/tests; None = default).
    Returns log_prob (B,) float32, and with mean_out the float32 mean (B, ...). Differentiable
    w.r.t. velocity (through log_prob and mean); sample and prev_sample are constants.
    """
    check_reduce(reduce, sde_type, cps_legacy_scale)
    args = check_step(
        sample,
        velocity,
        prev_sample,
        sigma,
        sigma_next,
        noise_level,
        sde_type=sde_type,
        sigma_max=sigma_max,
        kernel_dtypes=True,
    )
    if sample.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "sample requires grad, but the fused kernel differentiates w.r.t. velocity only; "
            "pass sample.detach() or use flowpo.kernels.reference.sde_step_logprob_ref"
        )
    b, d = args.batch, args.d
    opts = dict(
        sde_type=sde_type,
        reduce=reduce,
        sigma_max=args.sigma_max,
        cps_legacy_scale=cps_legacy_scale,
        write_mean=mean_out,
        block_size=block_size,
    )
    out = SDEStepLogProbFunction.apply(
        sample.detach().reshape(-1, d).contiguous(),
        velocity.reshape(b, d).contiguous(),
        prev_sample.detach().reshape(b, d).contiguous(),
        args.sigma,
        args.sigma_next,
        args.noise_level,
        opts,
    )
    if mean_out:
        log_prob, mean = out
        return log_prob, mean.view(velocity.shape)
    return out
