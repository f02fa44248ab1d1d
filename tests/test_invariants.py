"""docs/algorithms.md §6 invariant 4 at the adapter level: re-scoring a stored rollout with the
unchanged LoRA policy gives ratio == 1 exactly (tiny SD3 with CFG, tiny FLUX), through the
trainer's own per-transition loss (`trainer.update.step_loss`, kernel dispatch included)."""

import pytest
import torch

from flowpo.config import load_config
from flowpo.models.base import load_adapter
from flowpo.trainer.rollout import build_plan, sample_rollout
from flowpo.trainer.update import step_loss
from tests.conftest import add_active_lora


@pytest.mark.parametrize(
    "family,guidance,sde_type",
    [("sd3", 4.5, "flow"), ("sd3", 1.0, "cps"), ("flux", 3.5, "flow"), ("flux", 3.5, "dance")],
)
def test_first_update_ratio_is_exactly_one(tiny_dirs, family, guidance, sde_type):
    cfg = load_config(None, [f"--sampling.sde_type={sde_type}", "--sampling.num_steps=6"])
    adapter = load_adapter(family, tiny_dirs[family], guidance_scale=guidance)
    adapter.freeze_frozen_parts()
    module = add_active_lora(adapter)
    if family == "sd3" and guidance > 1:
        assert adapter.cfg_active
    embeds = adapter.encode_prompts(["a red circle", "two blue squares"] * 2)
    plan = build_plan(cfg).step_plan(6, epoch=0)
    sigmas = adapter.sigmas(6, adapter.initial_noise(1, torch.Generator().manual_seed(1)))
    module.eval()
    ro = sample_rollout(adapter, embeds, plan, sigmas, cfg, torch.Generator().manual_seed(0))
    assert ro.log_probs.shape == (4, len(plan.trained))
    module.train()  # training mode, with autograd, as the update runs
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    devs = []
    for j in range(len(plan.trained)):
        out = step_loss(adapter, ro, j, embeds, adv, cfg, sigma_max=float(sigmas[1]))
        assert out.step.log_prob.requires_grad and out.loss.requires_grad
        ratio = torch.exp(out.step.log_prob - ro.log_probs[:, j])
        devs.append((ratio - 1).abs().max().item())
        assert out.stats["ratio_max_dev"].item() <= 1e-6  # what the trainer logs
    assert max(devs) <= 1e-6, devs


def test_full_plan_declares_sde_steps_but_last():
    cfg = load_config(None, ["--rollout.timestep_fraction=0.5"])
    plan = build_plan(cfg).step_plan(10, epoch=0)
    assert plan.sde == [True] * 9 + [False]
    assert plan.trained == [0, 1, 2, 3, 4]
    assert build_plan(load_config()).step_plan(10, 0).trained == list(range(9))
