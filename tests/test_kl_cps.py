"""The `flow_grpo` KL estimator per SDE type (issue 15 §5, docs/algorithms.md §4): Flow-GRPO's
step function returns the diffusion coefficient sigma_t for its Flow-SDE and the step's actual
std sigma' sin(a pi / 2) for CPS, and its KL divides mean_D((mu - mu_ref)^2) by 2 s^2 with that
s. Checked through the trainer's own per-transition loss (`update.step_loss`) against an
independent float64 computation of the published step means and std."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from flowpo.config import load_config
from flowpo.trainer.losses import kl_to_reference
from flowpo.trainer.rollout import Rollout
from flowpo.trainer.update import step_loss

B, SHAPE = 3, (2, 4, 4)


class AffinePolicy:
    """A stand-in adapter: v = w * x + b (float32), with its reference (w_ref, b_ref)
    switched in by `reference()`, as the trainer's reference_policy switches the module."""

    def __init__(self, g: torch.Generator):
        self.w = 1.0 + 0.1 * torch.randn(SHAPE, generator=g)
        self.b = 0.1 * torch.randn(SHAPE, generator=g)
        self.w_ref = self.w + 0.05 * torch.randn(SHAPE, generator=g)
        self.b_ref = self.b + 0.05 * torch.randn(SHAPE, generator=g)

    def velocity(self, x, sigma, embeds):
        return self.w * x + self.b

    @contextmanager
    def reference(self):
        saved = self.w, self.b
        self.w, self.b = self.w_ref, self.b_ref
        try:
            yield
        finally:
            self.w, self.b = saved


def published_step(x, v, sigma, sigma_next, a, sde_type, sigma_max):
    """float64 mean and std of one step as Flow-GRPO's sde_step_with_logprob defines them
    (yifan123/flow_grpo, diffusers_patch/sd3_sde_with_logprob.py): the std it returns is
    sigma_t (without sqrt(-dt)) for its 'sde' type and the step's actual std for 'cps'."""
    s = sigma.reshape(-1, 1, 1, 1)
    sn = sigma_next.reshape(-1, 1, 1, 1)
    dt = sn - s
    if sde_type == "flow":
        std = torch.sqrt(s / (1 - torch.where(s == 1, torch.full_like(s, sigma_max), s))) * a
        mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    else:
        std = sn * math.sin(a * math.pi / 2)
        x0, x1 = x - s * v, x + (1 - s) * v
        mean = x0 * (1 - sn) + x1 * torch.sqrt(sn**2 - std**2)
    return mean, std.reshape(-1)


@pytest.mark.parametrize("sde_type", ["cps", "flow"])
def test_flow_grpo_kl_matches_the_published_form_in_float64(sde_type):
    g = torch.Generator().manual_seed(3)
    a = 0.7
    cfg = load_config(
        None,
        [f"--sampling.sde_type={sde_type}", f"--sampling.noise_level={a}", "--train.beta=0.04"],
    )
    policy = AffinePolicy(g)
    x = torch.randn(B, 1, *SHAPE, generator=g)
    sigma = torch.tensor([[0.9], [0.5], [0.3]])
    sigma_next = sigma - torch.tensor([[0.1], [0.1], [0.05]])
    sigma_max = 0.96
    ro = Rollout(
        latents=x,
        next_latents=x + 0.1 * torch.randn(B, 1, *SHAPE, generator=g),
        log_probs=torch.zeros(B, 1),
        sigmas=sigma,
        sigmas_next=sigma_next,
        noise_levels=torch.full((B, 1), a),
        anchors=torch.arange(B).reshape(B, 1),
        final_latents=x,
    )
    out = step_loss(
        policy, ro, 0, None, torch.zeros(B), cfg, sigma_max=sigma_max, backend="torch",
        reference=policy.reference,
    )  # fmt: skip

    x64 = x[:, 0].double()
    v = policy.w.double() * x64 + policy.b.double()
    v_ref = policy.w_ref.double() * x64 + policy.b_ref.double()
    s64, sn64 = sigma[:, 0].double(), sigma_next[:, 0].double()
    mu, std = published_step(x64, v, s64, sn64, a, sde_type, sigma_max)
    mu_ref, _ = published_step(x64, v_ref, s64, sn64, a, sde_type, sigma_max)
    want = ((mu - mu_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
    assert math.isclose(float(out.stats["kl"]), float(want.mean()), rel_tol=1e-5)

    # on the step's actual std the same value is the exact per-element KL for CPS, and that
    # times |dt| for the Flow-SDE (where the published s is the diffusion coefficient)
    exact = kl_to_reference(
        out.step.mean, mu_ref.float(), out.step.std, sigma_next[:, 0] - sigma[:, 0],
        estimator="exact", sde_type=sde_type,
    )  # fmt: skip
    factor = 1.0 if sde_type == "cps" else (sigma[:, 0] - sigma_next[:, 0]).double()
    torch.testing.assert_close((exact.double() * factor).mean(), want.mean(), rtol=1e-5, atol=0)


def test_cps_kl_is_not_scaled_by_dt_any_more():
    """The old estimator divided by std / sqrt(-dt) for CPS too: |dt| times the published
    value (beta effectively 10x weaker at |dt| = 0.1)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 8, generator=g)
    ref = mean + 0.1 * torch.randn(2, 8, generator=g)
    std, dt = torch.tensor([0.2, 0.3]), torch.tensor([-0.1, -0.1])
    cps = kl_to_reference(mean, ref, std, dt, sde_type="cps")
    flow = kl_to_reference(mean, ref, std, dt, sde_type="flow")
    dance = kl_to_reference(mean, ref, std, dt, sde_type="dance")
    torch.testing.assert_close(flow, cps * 0.1)
    torch.testing.assert_close(dance, flow)  # no published KL: the diffusion-coefficient form
    with pytest.raises(ValueError, match="sde_type"):
        kl_to_reference(mean, ref, std, dt, sde_type="ddim")
