"""The Qwen-Image adapter against diffusers' QwenImagePipeline on the tiny random model:
layout, prompt encoding, packing, schedule, true CFG with norm rescale, the Euler loop against
the pipeline's own __call__, LoRA targets, ratio == 1 (adapter and trainer), which parameters
one LoRA / one full epoch changes, and 2-rank ZeRO-3 against 1 rank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowpo.models.base import ModelLoadError, PromptEmbeds, detect_family, load_adapter
from flowpo.models.qwen_image import (
    PROMPT_TEMPLATE,
    TEMPLATE_DROP,
    pack_latents,
    unpack_latents,
)
from flowpo.models.tiny import make_tiny
from tests.conftest import (
    NO_EVAL,
    ROOT,
    ZERO3_P0,
    add_active_lora,
    as_fresh_process,
    euler_sample,
    flowpo_main,
    tiny_model,
    train_rows,
    two_rank_group,
)

# different token counts: the per-row masks and the padding are exercised
PROMPTS = ["a photo of a red cat", "two blue squares above a green circle"]
G = 4.0  # Flow-GRPO's Qwen-Image true-CFG scale


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_cache) -> str:
    return tiny_model(tiny_cache, "qwen-image", tmp_path_factory.mktemp("tiny") / "qwen")


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_adapter("qwen_image", qwen_dir, resolution=32, guidance_scale=G)


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    from diffusers import QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    p.text_encoder.requires_grad_(False)
    return p


# ---- layout --------------------------------------------------------------------------------
def test_tiny_dir_has_the_pipeline_layout_loads_with_diffusers_and_is_small(qwen_dir, pipe):
    index = json.loads((Path(qwen_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    expect = {
        "transformer": "QwenImageTransformer2DModel",
        "vae": "AutoencoderKLQwenImage",
        "text_encoder": "Qwen2_5_VLForConditionalGeneration",
        "tokenizer": "Qwen2Tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }
    for sub, cls in expect.items():
        assert (Path(qwen_dir) / sub).is_dir() and index[sub][1] == cls, sub
        assert type(getattr(pipe, sub)).__name__ == cls
    size = sum(f.stat().st_size for f in Path(qwen_dir).rglob("*") if f.is_file())
    assert size < 8e6, f"tiny qwen-image is {size / 1e6:.1f} MB"
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.vae_scale_factor == 2
    assert detect_family(qwen_dir) == "qwen_image"
    assert load_adapter("auto", qwen_dir, resolution=32).name == "qwen_image"


def test_template_constants_are_the_pipelines_and_the_tokenizer_splits_the_prefix_in_34(pipe):
    assert PROMPT_TEMPLATE == pipe.prompt_template_encode
    assert TEMPLATE_DROP == pipe.prompt_template_encode_start_idx == 34
    ids = pipe.tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids
    assert len(ids) == 34
    # the 34 dropped tokens end with the user header: the prompt's first word comes next
    full = pipe.tokenizer(PROMPT_TEMPLATE.format("red cat")).input_ids
    assert full[:34] == ids and pipe.tokenizer.decode(full[34:]).startswith("red cat<|im_end|>")


def test_make_tiny_same_seed_same_weights_and_tokenizer(qwen_dir, tmp_path):
    from safetensors.torch import load_file

    again = make_tiny("qwen-image", str(tmp_path / "again"), seed=0)
    for name in ("transformer/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"):
        a, b = Path(qwen_dir, name), Path(again, name)
        if name.endswith(".json"):
            assert a.read_text() == b.read_text()
        else:
            sa, sb = load_file(str(a)), load_file(str(b))
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resolution_must_be_a_multiple_of_vae_factor_times_2(qwen_dir):
    with pytest.raises(ValueError, match=r"resolution \(30\) must be a multiple of 4 for Qwen"):
        load_adapter("qwen_image", qwen_dir, resolution=30)
    # the pipeline's default: 128 × VAE factor
    assert load_adapter("qwen_image", qwen_dir).resolution == 256


def test_unknown_adapter_option_names_model_options(qwen_dir):
    with pytest.raises(ModelLoadError, match="model.options: 'cfg_rescale' is not an option"):
        load_adapter("qwen_image", qwen_dir, resolution=32, cfg_rescale=True)


# ---- prompt encoding ------------------------------------------------------------------------
def test_encoding_matches_the_pipelines_encode_prompt(qwen, pipe):
    qwen.clear_prompt_cache()
    e = qwen.encode_prompts(PROMPTS)
    pe, pm = pipe.encode_prompt(PROMPTS, device="cpu")
    assert e.prompt_embeds.shape == pe.shape and pm is not None  # the rows differ in length
    assert torch.equal(e.mask, pm) and e.mask.dtype == torch.long
    torch.testing.assert_close(e.prompt_embeds, pe, atol=1e-6, rtol=1e-5)
    assert (e.prompt_embeds[e.mask == 0] == 0).all()  # zero padding
    # the negative " " (pipeline: all ones -> mask None)
    ne, nm = pipe.encode_prompt([" "] * 2, device="cpu")
    assert nm is None and torch.equal(e.neg_mask, torch.ones_like(e.neg_mask))
    torch.testing.assert_close(e.neg_prompt_embeds, ne, atol=1e-6, rtol=1e-5)


def test_cache_stores_rows_unpadded_and_repads_to_the_batch(qwen, pipe):
    qwen.clear_prompt_cache()
    short, long_ = qwen.encode_prompts(PROMPTS[:1]), qwen.encode_prompts(PROMPTS[1:])
    assert short.mask.all() and long_.mask.all()  # alone: no padding
    both = qwen.encode_prompts(PROMPTS)  # from the cache, padded to the longer row
    assert both.prompt_embeds.shape[1] == long_.prompt_embeds.shape[1]
    assert both.mask[0].sum() == short.prompt_embeds.shape[1]
    pe, _ = pipe.encode_prompt(PROMPTS, device="cpu")
    torch.testing.assert_close(both.prompt_embeds, pe, atol=1e-6, rtol=1e-5)
    # index / repeat / cat / to keep masks aligned and integer
    r = both.repeat_interleave(2).index([3, 0]).to("cpu", torch.float64)
    assert torch.equal(r.mask, both.mask[[1, 0]]) and r.mask.dtype == torch.long
    assert r.prompt_embeds.dtype == torch.float64


def test_prompt_embeds_cat_pads_masked_rows_and_refuses_unmasked_ones():
    a = PromptEmbeds(torch.ones(1, 2, 3), mask=torch.ones(1, 2, dtype=torch.long))
    b = PromptEmbeds(torch.ones(2, 4, 3), mask=torch.ones(2, 4, dtype=torch.long))
    c = PromptEmbeds.cat([a, b])
    assert c.prompt_embeds.shape == (3, 4, 3) and c.mask.tolist()[0] == [1, 1, 0, 0]
    assert (c.prompt_embeds[0, 2:] == 0).all()
    assert c.trimmed().prompt_embeds.shape == (3, 4, 3) and c.index([0]).trimmed().mask.shape == (
        1,
        2,
    )
    with pytest.raises(ValueError, match="different token counts"):
        PromptEmbeds.cat([PromptEmbeds(torch.ones(1, 2, 3)), PromptEmbeds(torch.ones(1, 4, 3))])


def test_max_sequence_length_cuts_the_prompt_tokens(qwen_dir, pipe):
    a = load_adapter("qwen_image", qwen_dir, resolution=32, max_sequence_length=4)
    e = a.encode_prompts(PROMPTS)
    pe, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=4)
    assert e.prompt_embeds.shape[1] == 4 and e.mask.all()
    torch.testing.assert_close(e.prompt_embeds, pe, atol=1e-6, rtol=1e-5)


# ---- latents and schedule -------------------------------------------------------------------
def test_initial_noise_is_the_pipelines_and_packing_round_trips(qwen, pipe):
    x = qwen.initial_noise(2, torch.Generator().manual_seed(7))
    theirs = pipe.prepare_latents(
        2, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(7)
    )
    assert x.shape == (2, *qwen.latent_shape) == (2, 64, 16) and torch.equal(x, theirs)
    z = torch.randn(2, 4, 16, 16)
    assert torch.equal(pack_latents(z), pipe._pack_latents(z, 2, 4, 16, 16))
    assert torch.equal(unpack_latents(pack_latents(z), 16, 16), z)
    assert torch.equal(
        qwen.unpack(pack_latents(z))[:, :, None], pipe._unpack_latents(pack_latents(z), 32, 32, 2)
    )


def test_sigmas_are_the_pipelines_dynamic_shift_with_terminal(qwen, qwen_dir, pipe):
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cfg = pipe.scheduler.config
    x = qwen.initial_noise(1, torch.Generator().manual_seed(0))
    mu = calculate_shift(x.shape[1], cfg.base_image_seq_len, cfg.max_image_seq_len,
                         cfg.base_shift, cfg.max_shift)  # fmt: skip
    for steps in (2, 4, 10, 50):
        sched = type(pipe.scheduler).from_config(cfg)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        s = qwen.sigmas(steps, x)
        assert s.dtype == torch.float32 and torch.equal(s, sched.sigmas)
        assert s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
        assert abs(float(s[-2]) - cfg.shift_terminal) < 1e-6  # stretched to shift_terminal
    # one step cannot be stretched to shift_terminal (the scheduler divides by 1 - 1 = 0)
    with pytest.raises(ValueError, match="num_steps 1: .*shift_terminal"):
        qwen.sigmas(1, x)
    # a larger image: more tokens, larger mu, noisier mid-schedule
    big = load_adapter("qwen_image", qwen_dir, resolution=64)
    xb = big.initial_noise(1, torch.Generator().manual_seed(0))
    assert (big.sigmas(8, xb)[1:-2] > qwen.sigmas(8, x)[1:-2]).all()


# ---- velocity -------------------------------------------------------------------------------
def test_true_cfg_with_norm_rescale_and_without(qwen_dir, qwen):
    x = qwen.initial_noise(2, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.3])
    e = qwen.encode_prompts(PROMPTS)
    cond = PromptEmbeds(e.prompt_embeds, mask=e.mask)
    uncond = PromptEmbeds(e.neg_prompt_embeds, mask=e.neg_mask)
    plain = load_adapter("qwen_image", qwen_dir, resolution=32, guidance_scale=G,
                         cfg_norm_rescale=False)  # fmt: skip
    with torch.no_grad():
        v = qwen.velocity(x, sigma, e)
        v_plain = plain.velocity(x, sigma, e)
        v_c, v_u = qwen.velocity(x, sigma, cond, 1.0), qwen.velocity(x, sigma, uncond, 1.0)
    comb = v_u + G * (v_c - v_u)
    torch.testing.assert_close(v_plain, comb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, comb * v_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    # per token, the rescaled output has the conditional prediction's norm
    torch.testing.assert_close(v.norm(dim=-1), v_c.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v, v_plain) and not torch.allclose(v, v_c)
    with pytest.raises(ValueError, match="needs negative embeddings"):
        qwen.velocity(x, sigma, cond)


def test_velocity_is_deterministic_and_a_rows_value_does_not_depend_on_its_batch(qwen):
    x = qwen.initial_noise(2, torch.Generator().manual_seed(2))
    s = torch.tensor([0.5, 0.25])
    e = qwen.encode_prompts(PROMPTS)
    with torch.no_grad():
        v = qwen.velocity(x, s, e)
        assert torch.equal(v, qwen.velocity(x, s, e))
        alone = qwen.velocity(x[:1], s[:1], qwen.encode_prompts(PROMPTS[:1]))  # no padding
    # row 0 is padded by 3 tokens in the batch: masked padding changes it only at ulp level
    torch.testing.assert_close(v[:1], alone, atol=1e-6, rtol=1e-5)


# ---- the adapter reproduces the pipeline ----------------------------------------------------
def test_euler_loop_with_true_cfg_matches_the_pipeline_call(qwen, pipe):
    x0 = qwen.initial_noise(2, torch.Generator().manual_seed(5))
    ref = pipe(PROMPTS, negative_prompt=" ", true_cfg_scale=G, height=32, width=32,
               num_inference_steps=6, latents=x0.clone(), output_type="latent").images  # fmt: skip
    e = qwen.encode_prompts(PROMPTS)
    mine = euler_sample(qwen, x0, e, 6)
    # close, not equal: one batched [uncond; cond] forward with padding vs two forwards
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    same = pipe(prompt_embeds=e.prompt_embeds, prompt_embeds_mask=e.mask,
                negative_prompt_embeds=e.neg_prompt_embeds, negative_prompt_embeds_mask=e.neg_mask,
                true_cfg_scale=G, height=32, width=32, num_inference_steps=6, latents=x0.clone(),
                output_type="latent").images  # fmt: skip
    torch.testing.assert_close(mine, same, atol=1e-5, rtol=1e-5)


def test_decode_equals_the_pipelines_decode_arithmetic(qwen, pipe):
    x = qwen.initial_noise(2, torch.Generator().manual_seed(9))
    vae = pipe.vae
    z = pipe._unpack_latents(x, 32, 32, pipe.vae_scale_factor)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        img = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
    img = pipe.image_processor.postprocess(img, output_type="pt")
    mine = qwen.decode(x)
    assert mine.dtype == torch.float32 and 0 <= mine.min() and mine.max() <= 1
    assert torch.equal(mine, img)


# ---- training pieces ------------------------------------------------------------------------
def test_lora_targets_exist_and_gradients_reach_every_live_adapter(qwen_dir):
    from peft import LoraConfig, get_peft_model

    a = load_adapter("qwen_image", qwen_dir, resolution=32, guidance_scale=G)
    base = a.trainable_module
    names = [n for n, _ in base.named_modules()]
    for t in a.lora_targets:
        assert sum(n.endswith("." + t) for n in names) == len(base.transformer_blocks), t
    x = a.initial_noise(2, torch.Generator().manual_seed(4))
    e = a.encode_prompts(PROMPTS)
    sigma = torch.tensor([0.8, 0.4])
    with torch.no_grad():
        v0 = a.velocity(x, sigma, e)
    base.requires_grad_(False)
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=a.lora_targets))
    a.set_trainable_module(wrapped)
    v = a.velocity(x, sigma, e)
    torch.testing.assert_close(v, v0)  # LoRA starts as the identity (B = 0)
    v.square().mean().backward()
    dead = [n for n, p in wrapped.named_parameters()
            if "lora_B" in n and (p.grad is None or p.grad.abs().sum() == 0)]  # fmt: skip
    # only the last block's text-stream outputs are unused (its text output is discarded)
    last = len(base.transformer_blocks) - 1
    text_out = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    assert all(f"transformer_blocks.{last}." in n and any(t in n for t in text_out) for n in dead)
    assert len(dead) <= len(text_out), dead
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "lora_" not in n)


def test_bf16_model_returns_float32_velocity_close_to_float32(qwen_dir, qwen):
    a = load_adapter("qwen_image", qwen_dir, resolution=32, dtype=torch.bfloat16, guidance_scale=G)
    x = a.initial_noise(2, torch.Generator().manual_seed(8))
    s = torch.tensor([0.6, 0.2])
    v = a.velocity(x, s, a.encode_prompts(PROMPTS))
    with torch.no_grad():
        v32 = qwen.velocity(x, s, qwen.encode_prompts(PROMPTS))
    assert v.dtype == torch.float32 and v.requires_grad
    assert (v - v32).abs().mean() < 0.05 * v32.abs().mean()
    assert a.decode(x).dtype == torch.float32


@pytest.mark.parametrize("plan_name", ["full", "window"])
def test_rollouts_sample_and_first_rescore_ratio_is_exactly_one_with_cfg(qwen_dir, plan_name):
    from flowpo.config import load_config
    from flowpo.trainer.rollout import build_plan, sample_rollout
    from flowpo.trainer.update import step_loss

    cfg = load_config(str(ROOT / "configs" / "tiny_qwen_image_jpeg.yaml"),
                      [f"--rollout.plan={plan_name}", "--sampling.num_steps=6",
                       "--rollout.window_range=0,3"])  # fmt: skip
    adapter = load_adapter("qwen_image", qwen_dir, resolution=32, guidance_scale=G)
    adapter.freeze_frozen_parts()
    module = add_active_lora(adapter)
    embeds = adapter.encode_prompts(PROMPTS * 2)
    assert adapter.cfg_active and embeds.has_negative and not embeds.mask.all()
    sigmas = adapter.sigmas(6, adapter.initial_noise(1, torch.Generator().manual_seed(1)))
    plan = build_plan(cfg).step_plan(sigmas, 0, 0)
    module.eval()
    ro = sample_rollout(adapter, embeds, plan, sigmas, cfg, torch.Generator().manual_seed(0))
    k = len(plan.trained)
    assert ro.log_probs.shape == (4, k) and torch.isfinite(ro.log_probs).all()
    assert ro.final_latents.shape[-2:] == adapter.latent_shape
    images = adapter.decode(ro.final_latents.flatten(0, 1))
    assert images.shape == (4 * ro.images_per_sample, 3, 32, 32) and images.std() > 0
    module.train()
    devs = []
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for j in range(k):  # the trainer's own per-transition loss (re-score, clipped objective)
        out = step_loss(adapter, ro, j, embeds, adv, cfg, sigma_max=float(sigmas[1]))
        assert out.step.log_prob.requires_grad and out.loss.requires_grad
        devs.append((torch.exp(out.step.log_prob - ro.log_probs[:, j]) - 1).abs().max().item())
        assert out.stats["ratio_max_dev"].item() <= 1e-6
    assert max(devs) <= 1e-6, devs


# ---- through the trainer --------------------------------------------------------------------
def _one_epoch(run_dir) -> dict:
    """One LoRA and one full (beta > 0) update of the tiny recipe through GRPOTrainer, in this
    process: which parameters moved, which are trainable, the first ratio, the loss."""
    from flowpo.config import load_config
    from flowpo.trainer.grpo import GRPOTrainer

    out = {}
    for mode, extra in {"lora": [], "full": ["--train.lora=false", "--train.beta=0.04"]}.items():
        cfg = load_config("configs/tiny_qwen_image_jpeg.yaml", [f"--logging.run_dir={run_dir}",
            f"--logging.run_name={mode}", "--logging.wandb=off", "--logging.progress=false",
            "--train.learning_rate=1e-3", *extra])  # fmt: skip
        tr = GRPOTrainer(cfg)
        tr.setup()
        pipe, policy = tr.adapter.pipe, tr.engine.module.module
        mods = {"transformer": policy, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
        before = {f"{m}:{n}": p.detach().clone() for m, mod in mods.items()
                  for n, p in mod.named_parameters()}  # fmt: skip
        data = tr.rollout(0)
        adv, _ = tr.advantages(data)
        metrics = tr.update(data, adv, 0)
        after = {
            f"{m}:{n}": p.detach() for m, mod in mods.items() for n, p in mod.named_parameters()
        }
        out[mode] = dict(
            changed=sorted(k for k in before if not torch.equal(before[k], after[k])),
            trainable=sorted(f"transformer:{n}" for n, p in policy.named_parameters()
                             if p.requires_grad),
            first_dev=metrics["train/first_ratio_max_dev"], loss=metrics["train/loss"],
            masked=bool((data.embeds.mask == 0).any()), cfg=tr.adapter.cfg_active)  # fmt: skip
        tr.pool.shutdown()
        tr.logger.close()
        tr.signals.restore()
    return out


@pytest.mark.slow
def test_one_lora_epoch_and_one_full_epoch_change_the_intended_parameters_only(tmp_path):
    with as_fresh_process():  # the trainer's process group is closed after
        res = _one_epoch(tmp_path)
    for mode, r in res.items():
        # with CFG, per-row masks, the random window: the first re-score reproduces the rollout
        assert r["cfg"] and r["masked"] and r["first_dev"] <= 1e-6, (mode, r["first_dev"])
        assert math.isfinite(r["loss"])
        changed, trainable = set(r["changed"]), set(r["trainable"])
        assert changed and changed <= trainable, (mode, sorted(changed - trainable)[:5])
        # text encoder, VAE (and, with LoRA, the base weights) never move
        assert not any(k.startswith(("text_encoder:", "vae:")) for k in changed)
    lora, full = res["lora"], res["full"]
    assert all("lora_" in k for k in lora["trainable"])
    # every LoRA B moved except the last block's text-stream outputs (their output is unused)
    still = {k for k in lora["trainable"] if "lora_B" in k} - set(lora["changed"])
    text_out = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    assert all("transformer_blocks.1." in k and any(t in k for t in text_out) for k in still)
    assert not any("lora_" in k for k in full["trainable"])
    # full fine-tuning moves (nearly) every transformer tensor, not only a few
    assert len(full["changed"]) >= 0.9 * len(full["trainable"])


@pytest.mark.slow
def test_tiny_recipe_trains_two_epochs_with_ratio_one(tmp_path):
    proc = flowpo_main("train", "-c", "configs/tiny_qwen_image_jpeg.yaml",
                       f"--logging.run_dir={tmp_path}", "--logging.run_name=q",
                       "--logging.wandb=off", "--logging.progress=false", "--train.epochs=2",
                       *NO_EVAL)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = train_rows(tmp_path / "q")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["train/first_ratio_max_dev"] <= 1e-6 for r in rows)
    lora = tmp_path / "q" / "checkpoints" / "checkpoint-1" / "trainable.safetensors"
    from safetensors.torch import load_file

    w = load_file(str(lora))
    assert w and all("lora_" in k for k in w)
    assert any(v.abs().max() > 0 for k, v in w.items() if "lora_B" in k)

    # export round trip: diffusers' QwenImagePipeline.load_lora_weights restores the policy
    from diffusers import QwenImagePipeline

    from flowpo.trainer.checkpoint import load_trainable

    ckpt, out = lora.parent, tmp_path / "export"
    p = flowpo_main("export", str(ckpt), str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    base = str(tmp_path / "q" / "base_model")
    policy = load_adapter("qwen_image", base, guidance_scale=4.0, resolution=32)
    load_trainable(policy, ckpt)
    pipe = QwenImagePipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(str(out))
    theirs = load_adapter("qwen_image", base, guidance_scale=4.0, resolution=32)
    theirs.set_trainable_module(pipe.transformer)
    plain = load_adapter("qwen_image", base, guidance_scale=4.0, resolution=32)
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    s = torch.tensor([0.7, 0.3])
    prompts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        v_policy = policy.velocity(x, s, policy.encode_prompts(prompts))
        v_export = theirs.velocity(x, s, theirs.encode_prompts(prompts))
        v_base = plain.velocity(x, s, plain.encode_prompts(prompts))
    torch.testing.assert_close(v_export, v_policy, atol=1e-5, rtol=1e-5)
    assert (v_policy - v_base).abs().max() > 1e-6


# ---- 2-rank ZeRO-3 -------------------------------------------------------------------------
QWEN_COMMON = ["--train.learning_rate=1e-4", "--rollout.window_range=0,2"]
QWEN_TWO = two_rank_group(
    "qwen_image",
    family="qwen-image",
    recipe="tiny_qwen_image_jpeg",
    cases={
        "lora_z3": [*QWEN_COMMON, "--engine.zero_stage=3", ZERO3_P0],
        "lora_z3_actckpt": [
            *QWEN_COMMON,
            "--engine.zero_stage=3",
            ZERO3_P0,
            "--engine.gradient_checkpointing=true",
        ],
        "full_z3": [*QWEN_COMMON, "--train.lora=false", "--engine.zero_stage=3", ZERO3_P0],
    },
)


@pytest.mark.slow
@pytest.mark.two_rank(QWEN_TWO)
def test_zero3_on_2_ranks_partitions_and_equals_1_rank(qwen_dir, two_rank, tmp_path):
    from safetensors.torch import load_file

    from tests.dist_update import run_cases

    one = {"lora": QWEN_COMMON, "full": [*QWEN_COMMON, "--train.lora=false"]}
    with as_fresh_process():  # the one-rank reference, in this process
        res = run_cases(qwen_dir, one, tmp_path / "runs", "tiny_qwen_image_jpeg")
    res.update(two_rank.results(QWEN_TWO))  # 2 ranks: the session's one launch
    base = load_file(str(Path(qwen_dir) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in res["lora"]["weights"].items() if "lora_B" in k)
    assert max(float((res["full"]["weights"][k] - base[k]).abs().max()) for k in base) > 1e-5
    assert res["lora_z3_actckpt"]["activation_checkpointing"]
    for kind, name in (("lora", "lora_z3"), ("lora", "lora_z3_actckpt"), ("full", "full_z3")):
        ref, z = res[kind], res[name]
        assert z["weights"].keys() == ref["weights"].keys()
        for key, w in ref["weights"].items():
            torch.testing.assert_close(z["weights"][key], w, atol=1e-5, rtol=0, msg=key)
        assert math.isclose(z["grad_norm"], ref["grad_norm"], rel_tol=1e-5)
        rank0, rank1 = z["reports"]
        assert rank0
        for (pname, local, shard0, full), (_, local1, shard1, _) in zip(rank0, rank1):
            assert local == 0 and local1 == 0, (kind, pname)
            assert shard0 == shard1 == math.ceil(full / 2), (kind, pname, shard0, full)


# ---- the real-size recipe -------------------------------------------------------------------
def test_real_recipe_is_sized_for_8x80gb_by_the_memory_model():
    """The recipe's LoRA (adapter targets, its rank) under its ZeRO-3 template fits 8 × 80 GiB
    with room for activations, and the figures its header quotes are the memory model's."""
    import dataclasses
    import re

    from flowpo import memory
    from flowpo.config import load_config
    from flowpo.models.qwen_image import QwenImageAdapter

    path = ROOT / "configs" / "qwen_image_pickscore.yaml"
    cfg = load_config(str(path))
    assert cfg.engine.zero_stage == 3 and cfg.train.lora and cfg.train.lora_rank == 64
    assert cfg.model.family == "qwen_image" and cfg.sampling.guidance_scale == 4.0
    spec = dataclasses.replace(
        memory.MODELS["Qwen-Image"],
        lora_targets=tuple(QwenImageAdapter.lora_targets),
        lora_rank=cfg.train.lora_rank,
    )
    name = "Qwen-Image (flowpo recipe)"
    memory.MODELS[name] = spec
    try:
        counts = memory.count_model(name)
    finally:
        del memory.MODELS[name]
    z2, z3 = memory.STRATEGIES[0], memory.STRATEGIES[1]
    gib = {
        s.name: memory.estimate(counts, lora=True, beta=cfg.train.beta, strategy=s).gpu / memory.GIB
        for s in (z2, z3)
    }
    assert gib["ZeRO-3"] < 80 - 40  # at least 40 GiB left for activations
    head = path.read_text()
    assert f"({counts.lora_total / 1e6:.1f}M trained)" in head
    assert f"= {gib['ZeRO-3']:.1f} GiB" in head and f"{gib['ZeRO-2']:.1f} GiB" in head
    assert re.search(r"ranks: 8\b", head)
