"""Bagel's first ratio in bf16 (issue 15 §5): Bagel cuts the text to the longest prompt of the
batch it runs, so a row's velocity depends on the rows beside it. Re-scored in the sampling
batches themselves the first ratio is exactly 1 in bf16 with CFG 4; re-scored in other batches it
is not, so the GRPO config check refuses a micro-batch other than the sampling batch for such
adapters (`ModelAdapter.batch_invariant`), and the real-size recipes sample in batches of 2."""

from __future__ import annotations

import pytest
import torch

from flowpo.config import ConfigError, load_config
from flowpo.models.base import adapter_class, load_adapter
from flowpo.trainer.algorithms import GRPO
from flowpo.trainer.preflight import preflight
from flowpo.trainer.rollout import Rollout, build_plan, rollout_sigmas, sample_rollout
from flowpo.trainer.update import step_loss
from tests.conftest import ROOT, add_active_lora, tiny_model

# lengths differ, so each batch's text width is its own longest prompt's
PROMPTS = [
    "a cat",
    "two yellow circles next to a small dog on the grass",
    "a red circle",
    "a blue square above a green triangle",
]


def test_bagel_refuses_a_micro_batch_other_than_the_sampling_batch():
    assert not adapter_class("bagel").batch_invariant and adapter_class("sd3").batch_invariant
    cfg = load_config(
        str(ROOT / "configs" / "tiny_bagel_jpeg.yaml"), ["--train.micro_batch_size=4"]
    )
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert msg.startswith("train.micro_batch_size (4) differs from rollout.batch_size (8), but ")
    assert "set rollout.batch_size=4 (more rollout.num_batches) or train.micro_batch_size=0" in msg
    preflight(load_config(str(ROOT / "configs" / "tiny_bagel_jpeg.yaml")))  # 0: the same batch
    # auto-detected from tiny:bagel too; batch-invariant families keep any divisor
    auto = ["--model.family=auto", "--train.micro_batch_size=2"]
    with pytest.raises(ConfigError, match=r"bagel's velocity of a row depends"):
        preflight(load_config(str(ROOT / "configs" / "tiny_bagel_jpeg.yaml"), auto))
    preflight(
        load_config(str(ROOT / "configs" / "tiny_sd3_jpeg.yaml"), ["--train.micro_batch_size=4"])
    )


@pytest.mark.parametrize("name", ["bagel_pickscore_lora", "bagel_pickscore_full"])
def test_real_size_bagel_recipes_sample_in_their_training_micro_batches(name):
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    assert cfg.micro_batch_size == cfg.rollout.batch_size == 2
    GRPO.check_config(cfg)


def _ratio_devs(adapter, cfg, ro: Rollout, embeds, sigma_max: float, mb: int) -> float:
    """max |ratio - 1| of the first update, re-scoring the stored rollout in micro-batches of mb."""
    n = ro.log_probs.shape[0]
    dev = 0.0
    for start in range(0, n, mb):
        idx = list(range(start, start + mb))
        sub = ro.index(idx)
        for j in range(ro.num_trained):
            adv = torch.ones(mb)
            out = step_loss(adapter, sub, j, embeds.index(idx), adv, cfg, sigma_max=sigma_max)
            dev = max(dev, float(out.stats["ratio_max_dev"]))
    return dev


@pytest.mark.slow  # about 7 s with the session's tiny Bagel built (15 s more to build it)
def test_bf16_first_ratio_is_one_in_the_sampling_batches(tmp_path, tiny_cache):
    cfg = load_config(
        str(ROOT / "configs" / "tiny_bagel_jpeg.yaml"),
        ["--rollout.batch_size=2", "--sampling.num_steps=4", "--rollout.window_range=0,2"],
    )
    bagel = tiny_model(tiny_cache, "bagel", tmp_path / "bagel")
    adapter = load_adapter("bagel", bagel, dtype=torch.bfloat16, resolution=32, guidance_scale=4.0)
    adapter.freeze_frozen_parts()
    module = add_active_lora(adapter)
    module.eval()
    embeds = adapter.encode_prompts(PROMPTS)
    x0 = adapter.initial_noise(4, torch.Generator().manual_seed(0))
    sigmas = rollout_sigmas(adapter, cfg, x0)
    plan = build_plan(cfg).step_plan(sigmas, 0, 0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # two sampling batches of 2, as the real-size recipes sample
        parts = [
            sample_rollout(adapter, embeds.index(i), plan, sigmas, cfg, gen, x0[i])
            for i in ([0, 1], [2, 3])
        ]
        one_batch = sample_rollout(adapter, embeds, plan, sigmas, cfg, gen, x0)  # a batch of 4
    ro = Rollout.cat(parts)
    module.train()
    sigma_max = float(sigmas[1])
    assert _ratio_devs(adapter, cfg, ro, embeds, sigma_max, mb=2) == 0.0
    # what the refusal prevents: a batch of 4 re-scored in micro-batches of 2 (other text widths)
    wrong = _ratio_devs(adapter, cfg, one_batch, embeds, sigma_max, mb=2)
    print(f"bf16 tiny Bagel, CFG 4: first |ratio - 1| re-scored in other batches = {wrong:.2e}")
    assert wrong > 0.0
