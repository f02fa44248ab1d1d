"""The fused Triton kernels (flowpo.kernels) against their torch references, on CPU through
Triton's interpreter: forward and gradient of both ops against the reference on the same inputs
and against float64, every SDE type and reduce mode, float32/bfloat16/float16 inputs, odd D,
broadcast samples; every output element written (buffers are poisoned); gradcheck of the
references; RatioNorm closed form == long form (docs/algorithms.md §6.5, §6.6); backend dispatch;
rollouts that store what the kernels re-score (first ratio exactly 1); and training epochs with
kernels=triton == kernels=torch, the GRPO-Guard one through the fused Guard loss kernel.

TRITON_INTERPRET=1 is set below before anything imports the kernel modules: Triton picks
interpreter or compiler when `@triton.jit` runs (docs/environment.md). Only this module imports
them.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from flowpo.kernels import reference as ref  # noqa: E402
from flowpo.kernels.dispatch import fused_sde_step, resolve_backend  # noqa: E402
from flowpo.sde import sde_step_with_logprob, step_std  # noqa: E402
from flowpo.trainer.losses import ratio_norm_long_form  # noqa: E402


def _interpreted_modules():
    """The kernel modules, decorated in interpreter mode (re-imported if something imported them
    before the variable was set)."""
    names = ("flowpo.kernels._common", "flowpo.kernels.sde_logprob", "flowpo.kernels.guard_loss")
    mods = [importlib.import_module(n) for n in names]
    if not mods[0].interpreting(mods[1]._sde_logprob_fwd_kernel):
        mods = [importlib.reload(m) for m in mods]
    return mods


_common, sde_mod, guard_mod = _interpreted_modules()
sde_step_logprob = sde_mod.sde_step_logprob
guard_clipped_loss = guard_mod.guard_clipped_loss

ROOT = Path(__file__).resolve().parents[1]
SDE_TYPES = ("flow", "cps", "dance")
SIGMA_MAX = 0.94  # sigmas[1] of a schedule: flow's substitute for sigma at sigma == 1
# (dtype, atol, rtol): float32 within 1e-5 relative; half-precision inputs within 1e-2
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
    pytest.param(torch.float16, 1e-2, 1e-2, id="fp16"),
]
LOGPROB_MODES = [
    pytest.param(sde, reduce, False, id=f"{sde}-{reduce}")
    for sde in SDE_TYPES
    for reduce in ("mean", "sum")
] + [pytest.param("cps", r, True, id=f"cps-{r}-legacy") for r in ("mean", "sum")]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every launcher output starts as NaN (floats) or -1 (flags): unwritten elements show."""

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -1)

    monkeypatch.setattr(_common, "alloc", alloc)


def assert_close(actual, expected, atol, rtol, name="", scale_atol=False):
    """allclose that reports the mismatch count, the first indices, and NaN/inf counts.
    scale_atol: atol relative to max |expected| (gradients, where elements cross zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if scale_atol:
        atol = atol * float(e.abs().max().clamp_min(1e-30))
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol) | ~torch.isfinite(a)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        first = [(i, float(a[tuple(i)]), float(e[tuple(i)])) for i in idx]
        pytest.fail(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ (atol {atol:.2e}, rtol "
            f"{rtol:.0e}); NaN {int(a.isnan().sum())}, inf {int(a.isinf().sum())}; "
            f"max |diff| {float((a - e).abs().nan_to_num(float('inf')).max()):.3e}; "
            f"first (index, got, expected): {first}"
        )


def make_step(batch, shape, sde_type, *, rows=None, seed=0):
    """A stored transition like the rollout's: float32 x (rows, ...), v (B, ...), x' drawn from
    the step; per-sample sigmas that include sigma == 1 (flow's substitution) and noise levels."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or batch
    x = torch.randn((rows, *shape), generator=g)
    v = torch.randn((batch, *shape), generator=g)
    sigma = torch.linspace(1.0, 0.35, batch) if batch > 1 else torch.ones(1)
    sigma_next = sigma - torch.linspace(0.06, 0.15, batch)
    noise = torch.linspace(0.5, 0.9, batch)
    step = sde_step_with_logprob(
        ref.expand_sample(x, batch),
        v,
        sigma,
        sigma_next,
        noise,
        sde_type=sde_type,
        generator=g,
        sigma_max=SIGMA_MAX,
    )
    return x, v, step.prev_sample, sigma, sigma_next, noise


def _grad(out, v, weights):
    """d (sum_i <out_i, w_i>) / d v for (output, weight) pairs."""
    total = sum((o * w).sum() for o, w in zip(out, weights))
    return torch.autograd.grad(total, v)[0]


# --- the torch reference ------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type,reduce,legacy", LOGPROB_MODES)
def test_reference_is_the_trainer_step_math(sde_type, reduce, legacy):
    x, v, xn, s, sn, a = make_step(4, (4, 5, 3), sde_type)
    kw = dict(sde_type=sde_type, reduce=reduce, sigma_max=SIGMA_MAX, cps_legacy_scale=legacy)
    lp, mean = ref.sde_step_logprob_ref(x, v, xn, s, sn, a, mean_out=True, **kw)
    step = sde_step_with_logprob(x, v, s, sn, a, prev_sample=xn, **kw)
    assert_close(lp, step.log_prob, 1e-7, 1e-6, "log_prob")
    assert_close(mean, step.mean, 1e-7, 1e-6, "mean")


@pytest.mark.parametrize("sde_type,reduce,legacy", LOGPROB_MODES)
def test_reference_gradcheck_float64(sde_type, reduce, legacy):
    x, v, xn, s, sn, a = make_step(3, (2, 3), sde_type, seed=1)
    x, v = x.double().requires_grad_(), v.double().requires_grad_()
    kw = dict(sde_type=sde_type, reduce=reduce, sigma_max=SIGMA_MAX, cps_legacy_scale=legacy)
    fn = lambda x, v: ref.sde_step_logprob_ref(x, v, xn.double(), s, sn, a, mean_out=True, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, v))


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_guard_reference_gradcheck_float64(sde_type):
    x, v, xn, s, sn, a = make_step(4, (3, 2), sde_type, seed=2)
    v_old = v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
    _, mean_old = ref.sde_step_logprob_ref(x, v_old, xn, s, sn, a, sde_type=sde_type,
                                           sigma_max=SIGMA_MAX, mean_out=True)  # fmt: skip
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)

    def fn(v):
        loss, st = ref.guard_clipped_loss_ref(v, x.double(), xn.double(), mean_old.double(),
                                              s, sn, a, adv, 2e-3, 3e-3, sde_type=sde_type,
                                              sigma_max=SIGMA_MAX)  # fmt: skip
        return loss

    _, st = ref.guard_clipped_loss_ref(v.double(), x.double(), xn.double(), mean_old.double(),
                                       s, sn, a, adv, 2e-3, 3e-3, sde_type=sde_type,
                                       sigma_max=SIGMA_MAX)  # fmt: skip
    assert st["clipped"].any() and not st["clipped"].all(), "want both branches exercised"
    assert torch.autograd.gradcheck(fn, (v.double().requires_grad_(),))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_ratio_norm_closed_form_equals_long_form(sde_type, reduce):
    """docs/algorithms.md §5:
    (logp - logp_old + reduce_D(dmu^2) / (2 s^2)) * s == reduce_D(eps * dmu)
    (float64); and dmu == 0 gives exactly 0."""
    x, v, xn, s, sn, a = (t.double() for t in make_step(4, (6, 5), sde_type, seed=4))
    v_old = v + 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5)).double()
    kw = dict(sde_type=sde_type, sigma_max=SIGMA_MAX, mean_out=True, reduce=reduce)
    lp, mean = ref.sde_step_logprob_ref(x, v, xn, s, sn, a, **kw)
    lp_old, mean_old = ref.sde_step_logprob_ref(x, v_old, xn, s, sn, a, **kw)
    std = step_std(s, sn, a, sde_type=sde_type, sigma_max=SIGMA_MAX)
    long = ratio_norm_long_form(lp, lp_old, mean, mean_old, std, reduce=reduce)
    adv = torch.ones(4, dtype=torch.float64)
    gkw = dict(sde_type=sde_type, sigma_max=SIGMA_MAX, reduce=reduce)
    _, st = ref.guard_clipped_loss_ref(v, x, xn, mean_old, s, sn, a, adv, 0.1, 0.1, **gkw)
    assert long.abs().min() > 1e-4  # a real policy change
    assert_close(st["log_ratio"], long, 1e-12, 1e-9, "closed vs long form")
    _, st0 = ref.guard_clipped_loss_ref(v, x, xn, mean, s, sn, a, adv, 0.1, 0.1, **gkw)
    assert torch.equal(st0["log_ratio"], torch.zeros(4, dtype=torch.float64))


# --- sde_step_logprob kernel ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("sde_type,reduce,legacy", LOGPROB_MODES)
def test_sde_logprob_kernel_matches_reference(sde_type, reduce, legacy, dtype, atol, rtol):
    """Forward (log_prob, mean) and d/dv through both outputs; D = 1000 with 256-element blocks
    (a masked tail); per-sample sigmas including sigma == 1."""
    x, v, xn, s, sn, a = make_step(4, (8, 5, 25), sde_type)
    kw = dict(sde_type=sde_type, reduce=reduce, sigma_max=SIGMA_MAX, cps_legacy_scale=legacy)
    g = torch.Generator().manual_seed(9)
    w_lp, w_mean = torch.randn(4, generator=g), torch.randn(v.shape, generator=g)
    low = [t.to(dtype) for t in (x, v, xn)]
    v_low = low[1].requires_grad_()
    out = sde_step_logprob(low[0], v_low, low[2], s, sn, a, mean_out=True, block_size=256, **kw)
    grad = _grad(out, v_low, (w_lp, w_mean))
    assert grad.dtype == dtype
    # the reference on the same (rounded) inputs: only the kernel's float32 arithmetic differs
    v_ref = low[1].detach().requires_grad_()
    out_ref = ref.sde_step_logprob_ref(low[0], v_ref, low[2], s, sn, a, mean_out=True, **kw)
    assert_close(out[0], out_ref[0], 1e-5, 1e-5, "log_prob vs reference")
    assert_close(out[1], out_ref[1], 1e-5, 1e-5, "mean vs reference")
    assert_close(grad, _grad(out_ref, v_ref, (w_lp, w_mean)), atol, rtol, "grad", True)
    # float64 on the same inputs: the kernel's arithmetic (the gradient is stored in `dtype`)
    v64 = low[1].detach().double().requires_grad_()
    up = [t.double() for t in low]
    out64 = ref.sde_step_logprob_ref(up[0], v64, up[2], s, sn, a, mean_out=True, **kw)
    assert_close(out[0], out64[0], 1e-5, 1e-5, "log_prob vs float64")
    assert_close(out[1], out64[1], 1e-5, 1e-5, "mean vs float64")
    grad64 = _grad(out64, v64, (w_lp.double(), w_mean.double()))
    assert_close(grad, grad64, atol, rtol, "grad vs float64", True)
    # float64 on the unrounded float32 inputs: the outputs stay within the dtype's budget (the
    # gradient does not: x' - mu is ~std, and rounding x and x' moves it elementwise)
    out64 = ref.sde_step_logprob_ref(x.double(), v.double(), xn.double(), s, sn, a,
                                     mean_out=True, **kw)  # fmt: skip
    assert_close(out[0], out64[0], atol, rtol, "log_prob vs float64 of unrounded inputs")
    assert_close(out[1], out64[1], atol, rtol, "mean vs float64 of unrounded inputs", True)


SHAPES = [
    pytest.param(1, (16, 8, 8), None, None, id="B1"),
    pytest.param(3, (1000,), None, 128, id="odd-D-blocks"),
    pytest.param(2, (16, 64, 64), None, None, id="sd3-64x64"),
    pytest.param(2, (16, 64, 64), None, 4096, id="sd3-64x64-16blocks"),
    pytest.param(2, (1024, 64), None, None, id="flux-packed"),
    pytest.param(4, (4, 9, 7), 1, 64, id="broadcast-1"),
    pytest.param(6, (4, 9, 7), 2, 64, id="broadcast-B/G"),
]


@pytest.mark.parametrize("batch,shape,rows,block", SHAPES)
def test_sde_logprob_kernel_shapes(batch, shape, rows, block):
    x, v, xn, s, sn, a = make_step(batch, shape, "flow", rows=rows, seed=6)
    v = v.requires_grad_()
    kw = dict(reduce="mean", sigma_max=SIGMA_MAX)
    lp = sde_step_logprob(x, v, xn, s, sn, a, block_size=block, **kw)
    w = torch.randn(batch, generator=torch.Generator().manual_seed(7))
    grad = _grad((lp,), v, (w,))
    v64 = v.detach().double().requires_grad_()
    lp64 = ref.sde_step_logprob_ref(x.double(), v64, xn.double(), s, sn, a, **kw)
    assert_close(lp, lp64, 1e-5, 1e-5, "log_prob")
    assert_close(grad, _grad((lp64,), v64, (w.double(),)), 1e-5, 1e-5, "grad", True)


def test_sde_logprob_without_grad_skips_the_gradient_buffer():
    x, v, xn, s, sn, a = make_step(2, (5, 7), "dance")
    with torch.no_grad():
        lp = sde_step_logprob(x, v, xn, s, sn, a, sde_type="dance")
    assert not lp.requires_grad
    assert_close(lp, ref.sde_step_logprob_ref(x, v, xn, s, sn, a, sde_type="dance"), 1e-6, 1e-5)


def test_fused_step_is_a_drop_in_for_the_trainer_step():
    x, v, xn, s, sn, a = make_step(4, (4, 6, 6), "flow")
    kw = dict(sde_type="flow", prev_sample=xn, sigma_max=SIGMA_MAX)
    got, want = fused_sde_step(x, v, s, sn, a, **kw), sde_step_with_logprob(x, v, s, sn, a, **kw)
    for name in ("log_prob", "mean", "std", "prev_sample"):
        assert_close(getattr(got, name), getattr(want, name), 1e-6, 1e-5, name)
    assert fused_sde_step(x, v, s, sn, a, mean_out=False, **kw).mean is None


def test_sde_logprob_errors_name_the_cause():
    x, v, xn, s, sn, a = make_step(2, (3, 4), "flow")
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step_logprob(x, v, xn, s, sn, a)  # sigma == 1 without sigma_max
    with pytest.raises(ValueError, match="std == 0"):
        sde_step_logprob(x, v, xn, s, sn, 0.0, sigma_max=SIGMA_MAX)
    with pytest.raises(TypeError, match="float64"):
        sde_step_logprob(x.double(), v, xn, s, sn, a, sigma_max=SIGMA_MAX)
    with pytest.raises(ValueError, match="velocity only"):
        sde_step_logprob(x.requires_grad_(), v, xn, s, sn, a, sigma_max=SIGMA_MAX)
    with pytest.raises(ValueError, match="must divide"):
        sde_step_logprob(torch.zeros(3, 3, 4), v, xn, s, sn, a, sigma_max=SIGMA_MAX)
    with pytest.raises(ValueError, match="cps_legacy_scale"):
        sde_step_logprob(x, v, xn, s, sn, a, sigma_max=SIGMA_MAX, cps_legacy_scale=True)


# --- guard_clipped_loss kernel --------------------------------------------------------------------


def _guard_case(sde_type, batch=6, shape=(8, 5, 25), rows=None, seed=11):
    """Rollout mean from an old velocity; the new velocity moves the ratio by ~clip range, with
    mixed-sign advantages, so both branches of the max occur."""
    x, v, xn, s, sn, a = make_step(batch, shape, sde_type, rows=rows, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    v_old = v + 0.05 * torch.randn(v.shape, generator=g)
    _, mean_old = ref.sde_step_logprob_ref(x, v_old, xn, s, sn, a, sde_type=sde_type,
                                           sigma_max=SIGMA_MAX, mean_out=True)  # fmt: skip
    adv = torch.randn(batch, generator=g)
    return x, v, xn, mean_old, s, sn, a, adv


GUARD_MODES = [
    pytest.param(True, "mean", id="reweight"),
    pytest.param(False, "mean", id="plain"),
    pytest.param(True, "sum", id="reweight-sum"),
]


@pytest.mark.parametrize("reweight,reduce", GUARD_MODES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_guard_kernel_matches_reference(sde_type, dtype, atol, rtol, reweight, reduce):
    """Loss, normalised log-ratio, clipped flags and d loss / d v. The velocity carries the
    dtype (the model's output); x, x' and mu_old are float32 as the rollout stores them — the
    loss depends on mu_theta - mu_old, which rounding mu_old to bf16 would swamp."""
    x, v, xn, mean_old, s, sn, a, adv = _guard_case(sde_type)
    clip = (1e-4, 2e-4) if reduce == "mean" else (0.1, 0.2)  # sum: D times the log-ratio
    kw = dict(sde_type=sde_type, gradient_reweight=reweight, sigma_max=SIGMA_MAX, reduce=reduce)
    v_low = v.to(dtype).requires_grad_()
    loss, st = guard_clipped_loss(
        v_low, x, xn, mean_old, s, sn, a, adv, *clip, block_size=256, **kw
    )
    (grad,) = torch.autograd.grad(loss * 3.0, v_low)  # upstream gradient != 1
    assert grad.dtype == dtype
    flags = st["clipped"]
    assert flags.any() and not flags.all(), "want both branches exercised"
    # float64 of the same rounded velocity: kernel arithmetic only
    v64 = v_low.detach().double().requires_grad_()
    loss64, st64 = ref.guard_clipped_loss_ref(v64, x.double(), xn.double(), mean_old.double(),
                                              s, sn, a, adv.double(), *clip, **kw)  # fmt: skip
    (grad64,) = torch.autograd.grad(loss64 * 3.0, v64)
    assert torch.equal(flags, st64["clipped"])
    # float32 floor: dmu = mu - mu_old cancels O(1) numbers (as the trainer's torch path does)
    z_atol = 1e-7 if reduce == "mean" else 1e-5
    assert_close(st["log_ratio"], st64["log_ratio"], z_atol, 1e-4, "log_ratio")
    assert_close(loss, loss64, 1e-6, 1e-5, "loss")
    assert_close(grad, grad64, atol, rtol, "grad", True)
    # and the float32 reference on the same inputs
    v32 = v_low.detach().requires_grad_()
    loss32, _ = ref.guard_clipped_loss_ref(v32, x, xn, mean_old, s, sn, a, adv, *clip, **kw)
    assert_close(loss, loss32, 1e-6, 1e-5, "loss vs float32 reference")
    grad32 = torch.autograd.grad(loss32 * 3.0, v32)[0]
    assert_close(grad, grad32, atol, rtol, "grad vs float32 reference", True)


@pytest.mark.parametrize(
    "batch,rows", [(1, 1), (6, 1), (6, 3)], ids=["B1", "broadcast-1", "broadcast-B/G"]
)
def test_guard_kernel_broadcast_and_flags_written(batch, rows):
    x, v, xn, mean_old, s, sn, a, adv = _guard_case("flow", batch=batch, shape=(7, 11), rows=rows)
    kw = dict(sde_type="flow", gradient_reweight=True, sigma_max=SIGMA_MAX)
    loss, st = guard_clipped_loss(v, x, xn, mean_old, s, sn, a, adv, 1e-4, 1e-4, **kw)
    loss_ref, st_ref = ref.guard_clipped_loss_ref(
        v, x, xn, mean_old, s, sn, a, adv, 1e-4, 1e-4, **kw
    )
    assert_close(loss, loss_ref, 1e-6, 1e-5, "loss")
    assert_close(st["log_ratio"], st_ref["log_ratio"], 1e-7, 1e-4, "log_ratio")
    # the launcher's raw int8 flags (poisoned to -1): every one written, 0 or 1
    b, d = v.shape[0], v[0].numel()
    args = [t.reshape(-1, d).contiguous() for t in (x, v, xn, mean_old)]
    flat = [torch.as_tensor(t, dtype=torch.float32).expand(b).contiguous() for t in (s, sn, a)]
    kw2 = dict(sde_type="flow", gradient_reweight=True, sigma_max=SIGMA_MAX)
    _, _, raw, coef = guard_mod.guard_forward(*args, *flat, adv, 1e-4, 1e-4, **kw2)
    assert set(raw.tolist()) <= {0, 1} and torch.isfinite(coef).all()
    assert torch.equal(raw.bool(), st_ref["clipped"])


def test_guard_kernel_zero_policy_change_gives_zero_log_ratio():
    """mean_old written by the log-prob kernel with the same velocity: dmu == 0 bit for bit."""
    x, v, xn, s, sn, a = make_step(4, (6, 7), "cps")
    _, mean_old = sde_step_logprob(x, v, xn, s, sn, a, sde_type="cps", mean_out=True)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    loss, st = guard_clipped_loss(v, x, xn, mean_old, s, sn, a, adv, 1e-4, 1e-4, sde_type="cps")
    assert torch.equal(st["log_ratio"], torch.zeros(4))
    w = (sn - s).abs().sqrt().mean().square()
    assert_close(loss, -adv.mean() / w, 1e-7, 1e-6, "loss at ratio 1")


def test_guard_reference_is_the_trainer_guard_loss():
    """The fused op computes what the trainer's torch Guard path does (RatioNorm log-ratio into
    the clipped objective, weighted by 1 / |dt|), so it can replace it."""
    from flowpo.trainer.losses import (
        clipped_policy_loss,
        gradient_reweight_factor,
        ratio_norm_log_ratio,
    )

    x, v, xn, mean_old, s, sn, a, adv = _guard_case("dance", batch=4, shape=(5, 9))
    v = v.requires_grad_()
    kw = dict(sde_type="dance", sigma_max=SIGMA_MAX, mean_out=True)
    _, mean = ref.sde_step_logprob_ref(x, v, xn, s, sn, a, **kw)
    std = step_std(s, sn, a, sde_type="dance", sigma_max=SIGMA_MAX)
    z = ratio_norm_log_ratio(xn, mean, mean_old, std)
    weight = gradient_reweight_factor(sn - s).expand_as(adv)
    want, _ = clipped_policy_loss(z, torch.zeros_like(z), adv, 1e-4, 2e-4, weight=weight)
    got, st = guard_clipped_loss(v, x, xn, mean_old, s, sn, a, adv, 1e-4, 2e-4, sde_type="dance")
    assert_close(got, want, 1e-7, 1e-5, "loss")
    assert_close(st["log_ratio"], z, 1e-7, 1e-4, "log_ratio")
    g_got, g_want = (torch.autograd.grad(t, v)[0] for t in (got, want))
    assert_close(g_got, g_want, 1e-5, 1e-5, "grad", True)


# --- dispatch ---------------------------------------------------------------------------------------


def test_resolve_backend(monkeypatch):
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("triton", "cpu") == "triton"  # TRITON_INTERPRET=1 here
    with pytest.raises(ValueError, match="train.kernels"):
        resolve_backend("cuda", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*train.kernels=torch"):
        resolve_backend("triton", "cpu")


def test_kernels_import_without_triton_and_say_how_to_run_on_cpu():
    """`import flowpo.kernels` and the torch backend import no Triton; calling a kernel on CPU
    without the interpreter fails with the fix, not with Triton's '0 active drivers'."""
    code = (
        "import sys, torch\n"
        "import flowpo.kernels as k\n"
        "assert k.resolve_backend('auto', 'cpu') == 'torch'\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "x = torch.randn(2, 8)\n"
        "try:\n"
        "    k.sde_step_logprob(x, x, x, 0.5, 0.4, 0.7)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout


# --- the trainer ------------------------------------------------------------------------------------


def test_lora_gradient_through_the_kernel_matches_torch(tiny_dirs):
    """Tiny SD3 + LoRA: the gradient of the trainer's per-transition loss (clipped objective +
    KL, `trainer.update.step_loss`) over every trained step of a stored rollout, with
    train.kernels=triton (the fused step) equals train.kernels=torch (flowpo.sde)."""
    import contextlib

    from peft import LoraConfig

    from flowpo.config import load_config
    from flowpo.models.base import load_adapter
    from flowpo.trainer.rollout import build_plan, sample_rollout
    from flowpo.trainer.update import step_loss

    cfg = load_config(None, ["--sampling.num_steps=4", "--train.beta=0.04"])
    adapter = load_adapter("sd3", tiny_dirs["sd3"], guidance_scale=1.0)
    adapter.freeze_frozen_parts()
    module = adapter.trainable_module.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                      target_modules=adapter.lora_targets)  # fmt: skip
    module.add_adapter(lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0: the policy differs from the reference, KL has a gradient
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    embeds = adapter.encode_prompts(["a red circle", "two blue squares"] * 2)
    plan = build_plan(cfg).step_plan(4, epoch=0)
    sigmas = adapter.sigmas(4, adapter.initial_noise(1, torch.Generator().manual_seed(1)))
    module.eval()
    ro = sample_rollout(adapter, embeds, plan, sigmas, cfg, torch.Generator().manual_seed(0))
    module.train()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    params = [p for p in module.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def base_policy():  # LoRA's reference policy, as the Engine gives it: adapters off
        module.disable_adapters()
        try:
            yield
        finally:
            module.enable_adapters()

    def lora_grad(kernels):
        backend = resolve_backend(kernels, "cpu")
        assert backend == kernels
        for p in params:
            p.grad = None
        for j in range(ro.log_probs.shape[1]):
            out = step_loss(adapter, ro, j, embeds, adv, cfg, sigma_max=float(sigmas[1]),
                            backend=backend, reference=base_policy)  # fmt: skip
            assert out.stats["ratio_max_dev"] <= 1e-6  # invariant 4 through the kernel
            assert out.stats["kl"] > 0
            out.loss.backward()
        return torch.cat([p.grad.flatten() for p in params])

    want, got = lora_grad("torch"), lora_grad("triton")
    assert want.abs().max() > 0
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert_close(got, want, 1e-5, 1e-4, "LoRA gradient", True)


@pytest.mark.parametrize("ratio_norm", [False, True], ids=["plain", "guard"])
def test_triton_rollout_stores_what_the_kernels_rescore(tiny_dirs, ratio_norm):
    """With the triton backend the rollout stores the fused kernel's log-probs and means, so the
    trainer's re-scoring (`update.step_loss`) under the unchanged policy reproduces them bit for
    bit: ratio exactly 1, and GRPO-Guard's normalised log-ratio exactly 0 (invariant 4)."""
    from flowpo.config import load_config
    from flowpo.models.base import load_adapter
    from flowpo.trainer.rollout import build_plan, sample_rollout
    from flowpo.trainer.update import step_loss

    args = ["--sampling.num_steps=4", f"--train.ratio_norm={str(ratio_norm).lower()}"]
    cfg = load_config(None, args + ["--train.gradient_reweight=true", "--train.clip_range=2e-6"])
    adapter = load_adapter("sd3", tiny_dirs["sd3"], guidance_scale=1.0)
    embeds = adapter.encode_prompts(["a red circle", "two blue squares"] * 2)
    plan = build_plan(cfg).step_plan(4, epoch=0)
    sigmas = adapter.sigmas(4, adapter.initial_noise(1, torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(0)
    ro = sample_rollout(adapter, embeds, plan, sigmas, cfg, gen, backend="triton")
    assert (ro.means is not None) == ratio_norm
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for j in range(ro.num_trained):
        out = step_loss(adapter, ro, j, embeds, adv, cfg, sigma_max=float(sigmas[1]),
                        backend="triton")  # fmt: skip
        assert float(out.stats["ratio_max_dev"]) == 0.0, j
        if ratio_norm:  # the Guard kernel's z and, as its first log-prob, the stored one
            assert out.step is None
            assert torch.equal(out.log_probs[0], torch.zeros(4)), out.log_probs[0]
        else:
            assert torch.equal(out.step.log_prob.detach(), ro.log_probs[:, j])


GUARD_EPOCH = (
    # tiny GRPO-Guard recipe (RatioNorm, gradient reweight, clip 2e-6): 8 samples, micro-batch
    # 4, two optimizer steps, so the second half of the epoch re-scores under updated weights
    # (ratios off 1, both clipped branches active); a KL term on top of the fused loss
    "--train.epochs=1", "--rollout.batch_size=4", "--rollout.num_batches=2",
    "--rollout.group_size=4", "--sampling.num_steps=4", "--train.steps_per_epoch=2",
    "--train.learning_rate=1e-3", "--train.beta=0.04",
)  # fmt: skip


@pytest.fixture(scope="module")
def guard_epochs(tmp_path_factory):
    """One epoch of configs/tiny_sd3_guard.yaml per backend, in this process (the kernel
    modules interpreted). The triton run counts the calls of the Guard kernel's forward and
    backward launchers (counting wrappers around the real functions)."""
    from safetensors.torch import load_file

    from tests.conftest import NO_EVAL, flowpo_main, train_rows

    _interpreted_modules()
    root = tmp_path_factory.mktemp("guard_epochs")
    calls = {"forward": 0, "backward": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    out = {}
    for kernels in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(guard_mod, "guard_forward", counted("forward", guard_mod.guard_forward))
            mp.setattr(guard_mod, "guard_backward", counted("backward", guard_mod.guard_backward))
            proc = flowpo_main(
                "train", "-c", "configs/tiny_sd3_guard.yaml",
                f"--logging.run_dir={root}", f"--logging.run_name={kernels}",
                f"--train.kernels={kernels}", *GUARD_EPOCH, "--logging.wandb=off",
                "--logging.progress=false", *NO_EVAL,
                TRITON_INTERPRET="1",
            )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        sizes = dict(re.findall(r"(\w+)=([\d,]+)", proc.stdout.split("sizes: ")[1].split("\n")[0]))
        ckpt = root / kernels / "checkpoints" / "checkpoint-0" / "trainable.safetensors"
        out[kernels] = {
            "rows": train_rows(root / kernels),
            "weights": load_file(str(ckpt)),
            "calls": dict(calls),
            "sizes": {k: int(v.replace(",", "")) for k, v in sizes.items()},
        }
        calls.update(forward=0, backward=0)
    return out


def test_guard_epoch_with_triton_kernel_matches_torch(guard_epochs):
    """One epoch of GRPO-Guard (RatioNorm, gradient reweight, KL term; DeepSpeed, LoRA) with
    kernels=triton (the fused Guard loss, interpreted) equals kernels=torch to 1e-5 in the loss,
    the gradient norm and the updated weights. (At ratio ~1 the loss is a mean of O(1 / |dt|)
    terms whose advantages cancel, so both backends' values carry ~1e-7 of float32 rounding.)"""
    want, got = guard_epochs["torch"]["rows"], guard_epochs["triton"]["rows"]
    assert len(want) == len(got) == 1
    want, got = want[0], got[0]
    for key in ("train/loss", "train/policy_loss", "train/kl", "train/grad_norm"):
        assert abs(got[key] - want[key]) <= 1e-5, (key, got[key], want[key])
    assert abs(got["train/grad_norm"] / want["train/grad_norm"] - 1) <= 1e-5
    for key in ("train/clipfrac_high", "train/clipfrac_low"):
        # the second optimizer step's ratios are clipped on both sides, and not all of them
        assert got[key] == want[key] and 0 < got[key] < 0.5, (key, got[key], want[key])
    assert want["train/kl"] > 0
    w_want, w_got = guard_epochs["torch"]["weights"], guard_epochs["triton"]["weights"]
    assert w_want.keys() == w_got.keys()
    for name, w in w_want.items():
        assert_close(w_got[name], w, 1e-5, 0.0, name)
    # LoRA's B starts at 0: two Adam steps at lr 1e-3 moved it 200x the tolerance
    assert max(float(w.abs().max()) for n, w in w_want.items() if "lora_B" in n) > 1e-3


def test_guard_training_step_calls_the_guard_kernel(guard_epochs):
    """kernels=triton with train.ratio_norm: the trainer's loss goes through the fused Guard
    kernel, forward and backward, once per (micro-batch, trained transition); kernels=torch
    never calls it."""
    sizes = guard_epochs["triton"]["sizes"]
    per_epoch = sizes["images_per_epoch"] // sizes["micro_batch_size"]
    expected = per_epoch * sizes["trained_steps_per_sample"]
    assert expected == 6  # 2 micro-batches x 3 trained transitions
    assert guard_epochs["triton"]["calls"] == {"forward": expected, "backward": expected}
    assert guard_epochs["torch"]["calls"] == {"forward": 0, "backward": 0}


def test_guard_epoch_with_triton_kernel_starts_at_ratio_one(guard_epochs):
    """The rollout stores the fused kernel's means (kernels=triton), so the first update's
    GRPO-Guard ratio is exactly 1, as with kernels=torch."""
    for kernels in ("torch", "triton"):
        assert guard_epochs[kernels]["rows"][0]["train/first_ratio_max_dev"] == 0.0, kernels


def _train_rows(tmp_path, kernels):
    """One epoch through the CLI in this process (the kernel modules interpreted, as above)."""
    from tests.conftest import NO_EVAL, flowpo_main, train_rows

    _interpreted_modules()
    proc = flowpo_main(
        "train", "-c", "configs/tiny_sd3_jpeg.yaml",
        f"--logging.run_dir={tmp_path}", f"--logging.run_name={kernels}",
        f"--train.kernels={kernels}", "--train.epochs=1", "--train.beta=0.04",
        "--rollout.batch_size=4", "--rollout.num_batches=2", "--rollout.group_size=4",
        "--sampling.num_steps=4", "--logging.wandb=off", "--logging.progress=false",
        "--eval.num_prompts=1", "--eval.seeds=0", *NO_EVAL,
        TRITON_INTERPRET="1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return train_rows(tmp_path / kernels)


@pytest.mark.slow
def test_training_epoch_with_triton_kernels_matches_torch(tmp_path):
    """One epoch of tiny SD3 through the CLI (DeepSpeed, LoRA, KL term): kernels=triton (the
    interpreter) gives the losses of kernels=torch, and the rollout's stored log-probs come from
    the kernel that re-scores them, so the ratio is exactly 1 for every stored transition before
    the update (with flowpo.sde's rollout log-probs it was 1 only to float32 rounding, 1.2e-7).
    (The epoch's losses all precede its one optimizer step; the gradient is checked by the LoRA
    test above.)"""
    torch_rows, triton_rows = _train_rows(tmp_path, "torch"), _train_rows(tmp_path, "triton")
    assert len(torch_rows) == len(triton_rows) == 1
    for key in ("train/loss", "train/policy_loss", "train/kl"):
        got, want = triton_rows[0][key], torch_rows[0][key]
        assert abs(got - want) <= 1e-5, (key, got, want)
    assert triton_rows[0]["train/ratio_max_dev"] == 0.0
    assert triton_rows[0]["train/first_ratio_max_dev"] == 0.0
