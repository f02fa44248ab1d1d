"""Fused GRPO-Guard loss: RatioNorm clipped objective with gradient reweight (docs/algorithms.md
§5).

Per sample b, with the step's mu_theta = x + cx_b x + cv_b v and std s_b:
    z_b = mean_D(eps * (mu_theta - mu_old)),  eps = (x' - mu_old) / s_b   (normalised log-ratio;
          sum_D with reduce="sum", matching log-probs reduced that way)
    l_b = max(-A_b r_b, -A_b clip(r_b, 1 - lo, 1 + hi)),  r_b = exp(z_b)
    loss = mean_B(l_b) / W,  W = (mean_B sqrt|dt_b|)^2 with gradient_reweight (|dt| for a batch
    that shares its step), else 1.
d loss / d v_{b,d} = k_b (x'_{b,d} - mu_old_{b,d}) with k_b = [unclipped branch] (-A_b r_b)
cv_b / (B W n s_b), n = D (mean) or 1 (sum): elementwise, with one scalar per sample that needs the whole reduction.

- `_guard_fwd_kernel`, grid (B, D / BLOCK): reads x, v, x', mu_old once; writes block partial
  sums of eps * dmu.
- `_guard_finalize_kernel`, one program: z, ratio, per-sample loss, clipped flag, W, the scalar
  loss and k_b for the whole batch (B is small: the micro-batch).
- `_guard_bwd_kernel`, grid (B, D / BLOCK): grad_v = g_loss * k_b * (x' - mu_old).

Bytes: forward (S + 3B) D reads; backward 2 B D reads + B D writes. The backward needs no
saved (B, D) buffer: it re-reads x' and mu_old, the same traffic as writing d loss / d v in the
forward and scaling it in the backward, without the buffer. The minimum is one read of x, v, x',
mu_old and one write of grad_v; the gradient cannot be written in the forward's single pass
because k_b depends on the whole row's reduction.

The plain (non-Guard) clipped objective stays in torch (`trainer.losses.clipped_policy_loss`):
it is per sample, not per element, so there is nothing to fuse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from flowpo.kernels import _common
from flowpo.kernels._args import SDE_CODES, Scalar, check_guard, check_reduce, check_step
from flowpo.kernels._common import step_coefficients
from flowpo.kernels.reference import guard_stats

MAX_BATCH = 4096  # the finalize kernel holds the batch in one program
FINALIZE_ELEMS = 4096  # partials per iteration of that program (BLOCK_B x BLOCK_C)


@triton.jit
def _guard_fwd_kernel(
    x_ptr,  # (S, D) sample
    v_ptr,  # (B, D) velocity
    xn_ptr,  # (B, D) prev_sample x'
    mold_ptr,  # (B, D) mu_old, the rollout's mean
    sigma_ptr,  # (B,) float32
    sigma_next_ptr,
    a_ptr,
    partial_ptr,  # (B, C) float32: block sums of eps * dmu
    D,
    num_chunks,
    rep,  # B // S
    sigma_max,
    SDE_TYPE: tl.constexpr,
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
    x = tl.load(x_ptr + x_row + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(xn_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(mold_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    # mu formed exactly as _sde_logprob_fwd_kernel writes it: a mean_old from that kernel with
    # the same velocity gives dmu == 0 bit for bit
    mu = x + (cx * x + cv * v)
    eps = (xn - mo) / std
    prod = tl.where(mask, eps * (mu - mo), 0.0)
    tl.store(partial_ptr + pid_b * num_chunks + pid_c, tl.sum(prod, axis=0))


@triton.jit
def _guard_finalize_kernel(
    partial_ptr,  # (B, C) float32
    sigma_ptr,
    sigma_next_ptr,
    a_ptr,
    adv_ptr,  # (B,) float32 advantages
    loss_ptr,  # () float32 out
    log_ratio_ptr,  # (B,) float32 out: normalised log-ratio z
    clipped_ptr,  # (B,) int8 out: 1 where the clipped branch is active (no gradient)
    coef_ptr,  # (B,) float32 out: k_b of the backward
    B,
    num_chunks,
    n_red,  # D for reduce="mean", 1 for "sum"
    clip_low,
    clip_high,
    sigma_max,
    SDE_TYPE: tl.constexpr,
    REWEIGHT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_b = tl.arange(0, BLOCK_B)
    mb = offs_b < B
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for start in range(0, num_chunks, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        m = mb[:, None] & (offs_c[None, :] < num_chunks)
        acc += tl.load(
            partial_ptr + offs_b[:, None] * num_chunks + offs_c[None, :], mask=m, other=0.0
        )
    z = tl.sum(acc, axis=1) / n_red
    # benign values in the padding lanes (kept out of every batch sum below)
    s = tl.load(sigma_ptr + offs_b, mask=mb, other=0.5)
    s_next = tl.load(sigma_next_ptr + offs_b, mask=mb, other=0.25)
    a = tl.load(a_ptr + offs_b, mask=mb, other=0.5)
    adv = tl.load(adv_ptr + offs_b, mask=mb, other=0.0)
    cx, cv, std = step_coefficients(s, s_next, a, sigma_max, SDE_TYPE)
    ratio = tl.exp(z)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    per_sample = tl.maximum(unclipped, clipped)
    cut = clipped > unclipped
    if REWEIGHT:
        # GRPO-Guard: divide the step's loss by (mean_B sqrt|dt|)^2 to balance noise levels
        w = tl.sum(tl.where(mb, tl.sqrt(s - s_next), 0.0), axis=0) / B
        w = w * w
    else:
        w = 1.0
    loss = tl.sum(tl.where(mb, per_sample, 0.0), axis=0) / B / w
    # d loss / d z_b, then d z_b / d v = (x' - mu_old) cv / (std n_red)
    dz = tl.where(cut, 0.0, -adv * ratio) / (B * w)
    coef = dz * cv / std / n_red
    tl.store(loss_ptr, loss)
    tl.store(log_ratio_ptr + offs_b, z, mask=mb)
    tl.store(clipped_ptr + offs_b, cut.to(tl.int8), mask=mb)
    tl.store(coef_ptr + offs_b, coef, mask=mb)


@triton.jit
def _guard_bwd_kernel(
    xn_ptr,  # (B, D) x'
    mold_ptr,  # (B, D) mu_old
    coef_ptr,  # (B,) float32 k_b
    g_loss_ptr,  # (1,) float32 upstream gradient of the loss
    out_ptr,  # (B, D) velocity dtype
    D,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    row = pid_b.to(tl.int64) * D
    xn = tl.load(xn_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(mold_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(coef_ptr + pid_b) * tl.load(g_loss_ptr)
    tl.store(out_ptr + row + offs, (k * (xn - mo)).to(out_ptr.dtype.element_ty), mask=mask)


# --- launchers ----------------------------------------------------------------------------------


def guard_forward(
    x: Tensor,
    v: Tensor,
    xn: Tensor,
    mean_old: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    *,
    sde_type: str,
    gradient_reweight: bool,
    sigma_max: float,
    reduce: str = "mean",
    block_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (S, D); v, xn, mean_old (B, D) contiguous; (B,) float32 sigmas and advantages.

    Returns loss (0-dim), log_ratio (B,), clipped (B,) int8, coef (B,) float32."""
    kernel = _guard_fwd_kernel
    _common.require_runnable(kernel, v.device)
    b, d = v.shape
    if b > MAX_BATCH:
        raise ValueError(f"guard_clipped_loss takes at most {MAX_BATCH} samples; got B={b}")
    block = _common.block_size(d, kernel, block_size)
    chunks = triton.cdiv(d, block)
    dev = v.device
    code = SDE_CODES[sde_type]
    partial = _common.alloc((b, chunks), torch.float32, dev)
    loss = _common.alloc((), torch.float32, dev)
    log_ratio = _common.alloc((b,), torch.float32, dev)
    clipped = _common.alloc((b,), torch.int8, dev)
    coef = _common.alloc((b,), torch.float32, dev)
    kernel[(b, chunks)](
        x,
        v,
        xn,
        mean_old,
        sigma,
        sigma_next,
        noise_level,
        partial,
        d,
        chunks,
        b // x.shape[0],
        sigma_max,
        SDE_TYPE=code,
        BLOCK=block,
        **_common.launch_kwargs(kernel),
    )
    block_b = max(2, triton.next_power_of_2(b))
    _guard_finalize_kernel[(1,)](
        partial,
        sigma,
        sigma_next,
        noise_level,
        advantages,
        loss,
        log_ratio,
        clipped,
        coef,
        b,
        chunks,
        float(d) if reduce == "mean" else 1.0,
        float(clip_low),
        float(clip_high),
        sigma_max,
        SDE_TYPE=code,
        REWEIGHT=bool(gradient_reweight),
        BLOCK_B=block_b,
        BLOCK_C=max(2, min(triton.next_power_of_2(chunks), FINALIZE_ELEMS // block_b)),
    )
    return loss, log_ratio, clipped, coef


def guard_backward(
    xn: Tensor,
    mean_old: Tensor,
    coef: Tensor,
    g_loss: Tensor,
    dtype: torch.dtype,
    *,
    block_size: int | None = None,
) -> Tensor:
    """grad_v (B, D) in `dtype` = g_loss * coef_b * (x' - mu_old)."""
    kernel = _guard_bwd_kernel
    b, d = xn.shape
    block = _common.block_size(d, kernel, block_size)
    out = _common.alloc((b, d), dtype, xn.device)
    kernel[(b, triton.cdiv(d, block))](
        xn,
        mean_old,
        coef,
        g_loss.float().reshape(1).contiguous(),
        out,
        d,
        BLOCK=block,
        **_common.launch_kwargs(kernel),
    )
    return out


# --- autograd -----------------------------------------------------------------------------------


class GuardClippedLossFunction(torch.autograd.Function):
    """Scalar Guard loss, differentiable w.r.t. velocity; diagnostics are non-differentiable."""

    @staticmethod
    def forward(ctx, v, x, xn, mean_old, sigma, sigma_next, noise_level, advantages, opts):
        loss, log_ratio, clipped, coef = guard_forward(
            x, v, xn, mean_old, sigma, sigma_next, noise_level, advantages, **opts
        )
        ctx.save_for_backward(xn, mean_old, coef)
        ctx.v_dtype = v.dtype
        ctx.block_size = opts.get("block_size")
        ctx.mark_non_differentiable(log_ratio, clipped)
        return loss, log_ratio, clipped

    @staticmethod
    def backward(ctx, g_loss, _g_log_ratio, _g_clipped):
        xn, mean_old, coef = ctx.saved_tensors
        grad_v = guard_backward(xn, mean_old, coef, g_loss, ctx.v_dtype, block_size=ctx.block_size)
        return (grad_v,) + (None,) * 8


def guard_clipped_loss(
    velocity: Tensor,
    sample: Tensor,
    prev_sample: Tensor,
    mean_old: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    *,
    sde_type: str = "flow",
    gradient_reweight: bool = True,
    sigma_max: float | Tensor | None = None,
    reduce: str = "mean",
    block_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-Guard's RatioNorm clipped objective of one trained step, fused (see module doc).

    velocity, prev_sample, mean_old: (B, ...) float32/bfloat16/float16; sample: (S, ...),
    S in {1, B/G, B}; sigmas and noise_level floats or (B,); advantages (B,); clip_low /
    clip_high the epsilons of clip(r, 1 - clip_low, 1 + clip_high). sigma_max: flow's sigma at
    sigma == 1 (sigmas[1]). reduce: that of the step's log-probs ("mean", published, or "sum"),
    for which z equals GRPO-Guard's long form.
    Returns (loss, stats): the 0-dim float32 loss, differentiable w.r.t. velocity only, and the
    detached stats of `reference.guard_stats` (per-sample "log_ratio" and "clipped" included).
    """
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
        extra={"mean_old": mean_old},
    )
    check_reduce(reduce, sde_type, False)
    adv = check_guard(advantages, args.batch, clip_low, clip_high, velocity.device)
    if sample.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "sample requires grad, but the fused kernel differentiates w.r.t. velocity only; "
            "pass sample.detach() or use flowpo.kernels.reference.guard_clipped_loss_ref"
        )
    b, d = args.batch, args.d
    opts = dict(
        clip_low=float(clip_low),
        clip_high=float(clip_high),
        sde_type=sde_type,
        gradient_reweight=gradient_reweight,
        sigma_max=args.sigma_max,
        reduce=reduce,
        block_size=block_size,
    )
    loss, log_ratio, clipped = GuardClippedLossFunction.apply(
        velocity.reshape(b, d).contiguous(),
        sample.detach().reshape(-1, d).contiguous(),
        prev_sample.detach().reshape(b, d).contiguous(),
        mean_old.detach().reshape(b, d).contiguous(),
        args.sigma,
        args.sigma_next,
        args.noise_level,
        adv,
        opts,
    )
    return loss, guard_stats(log_ratio, clipped.bool(), loss, clip_low, clip_high)
