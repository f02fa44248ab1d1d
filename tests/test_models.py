"""Model adapters against the diffusers pipelines they wrap, on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowpo.models.base import (
    MODEL_REGISTRY,
    ModelAdapter,
    ModelLoadError,
    PromptEmbeds,
    detect_family,
    load_adapter,
)
from flowpo.models.tiny import make_tiny
from tests.conftest import euler_sample

PROMPTS = ["a photo of a red cat", "two blue squares above a green circle"]


@pytest.fixture(scope="module")
def sd3(tiny_dirs) -> ModelAdapter:
    return load_adapter("sd3", tiny_dirs["sd3"], guidance_scale=4.5)


@pytest.fixture(scope="module")
def flux(tiny_dirs) -> ModelAdapter:
    return load_adapter("flux", tiny_dirs["flux"], guidance_scale=3.5)


# ---- layout and loading ---------------------------------------------------------------------
def test_tiny_dirs_have_the_diffusers_layout_and_are_small(tiny_dirs):
    from pathlib import Path

    expect = {
        "sd3": ["scheduler", "transformer", "vae", "text_encoder", "text_encoder_2",
                "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"],
        "flux": ["scheduler", "transformer", "vae", "text_encoder", "text_encoder_2",
                 "tokenizer", "tokenizer_2"],
    }  # fmt: skip
    for fam, d in tiny_dirs.items():
        index = json.loads((Path(d) / "model_index.json").read_text())
        for sub in expect[fam]:
            assert (Path(d) / sub).is_dir(), f"{fam}: {sub}/ missing"
            assert sub in index
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
        assert size < 8e6, f"{fam} tiny model is {size / 1e6:.1f} MB"


def test_tiny_dirs_load_with_the_diffusers_pipeline_classes(tiny_dirs):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(tiny_dirs["sd3"], local_files_only=True)
    assert p.text_encoder_3 is not None and p.tokenizer_3 is not None
    assert p.vae_scale_factor * p.transformer.config.sample_size == 32
    f = FluxPipeline.from_pretrained(tiny_dirs["flux"], local_files_only=True)
    assert f.transformer.config.guidance_embeds
    assert f.scheduler.config.use_dynamic_shifting


def test_make_tiny_same_seed_same_weights(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    again = make_tiny("sd3", str(tmp_path / "again"), seed=0)
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(f"{tiny_dirs['sd3']}/{name}"), load_file(f"{again}/{name}")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_cache_gives_the_bytes_of_a_fresh_build(tmp_path, monkeypatch):
    """`tiny:FAMILY` under $FLOWPO_TINY_CACHE: built once per (family, seed) in the cache and
    copied into each run directory, file for file the bytes `make_tiny` writes fresh."""
    from pathlib import Path

    from flowpo.models.resolve import TINY_CACHE_ENV, resolve_model_path

    def files(d):
        return {str(f.relative_to(d)): f.read_bytes() for f in Path(d).rglob("*") if f.is_file()}

    monkeypatch.setenv(TINY_CACHE_ENV, str(tmp_path / "cache"))
    a = resolve_model_path("tiny:flux", tmp_path / "run_a", seed=1)
    b = resolve_model_path("tiny:flux", tmp_path / "run_b", seed=1)
    assert (
        a == str(tmp_path / "run_a" / "base_model")
        and len(list((tmp_path / "cache").iterdir())) == 1
    )
    fresh = files(make_tiny("flux", str(tmp_path / "fresh"), seed=1))
    assert "model_index.json" in fresh and files(a) == fresh and files(b) == fresh
    other = resolve_model_path("tiny:flux", tmp_path / "run_c", seed=2)  # another seed: built
    assert len(list((tmp_path / "cache").iterdir())) == 2 and files(other) != fresh


def test_load_adapter_auto_detects_the_family(tiny_dirs):
    assert detect_family(tiny_dirs["sd3"]) == "sd3"
    assert detect_family(tiny_dirs["flux"]) == "flux"
    assert load_adapter("auto", tiny_dirs["flux"]).name == "flux"
    assert {"sd3", "flux"} <= set(MODEL_REGISTRY)


def test_unknown_family_error_names_the_choices(tiny_dirs):
    with pytest.raises(ModelLoadError) as err:
        load_adapter("xyz", tiny_dirs["sd3"])
    assert str(err.value).startswith("model.family 'xyz' is unknown; choose one of: sd3, flux")


def test_missing_dir_error_says_how_to_make_one(tmp_path):
    d = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError) as err:
        load_adapter("sd3", d)
    assert str(err.value) == (
        f"model.path '{d}' does not exist; run 'flowpo make-tiny sd3 {d}' for a tiny test "
        "model or point it at a local diffusers model directory"
    )
    assert isinstance(err.value, ValueError)


def test_family_that_does_not_load_the_directory_names_the_right_one(tiny_dirs):
    with pytest.raises(ModelLoadError) as err:
        load_adapter("sd3", tiny_dirs["flux"])
    assert str(err.value) == (
        f"model.path '{tiny_dirs['flux']}' holds a FluxPipeline, which model.family 'flux' loads, "
        "but model.family is 'sd3'; set model.family=flux (or auto)"
    )


def test_dir_without_model_index_is_rejected_under_auto(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_adapter("auto", str(tmp_path))


# ---- prompt embeddings --------------------------------------------------------------------
def test_prompt_embeds_index_repeat_cat_to():
    e = PromptEmbeds(
        prompt_embeds=torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4),
        pooled=torch.arange(3.0).view(3, 1).expand(3, 5),
        extra={"ids": torch.arange(3).view(3, 1)},
    )
    assert len(e) == 3 and not e.has_negative
    r = e.repeat_interleave(2)
    assert len(r) == 6 and r.pooled[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    i = e.index([2, 0])
    assert i.prompt_embeds[:, 0, 0].tolist() == [2, 0] and i.extra["ids"].flatten().tolist() == [
        2,
        0,
    ]
    c = PromptEmbeds.cat([e, i])
    assert len(c) == 5 and c.neg_pooled is None
    assert e.to("cpu", torch.float64).prompt_embeds.dtype == torch.float64


def test_encode_prompts_caches_per_prompt_and_adds_negative_only_under_cfg(tiny_dirs, sd3):
    calls: list[list[str]] = []
    orig = sd3._encode
    sd3._encode = lambda p: (calls.append(p), orig(p))[1]
    try:
        sd3.clear_prompt_cache()
        a = sd3.encode_prompts(PROMPTS + PROMPTS[:1])
        b = sd3.encode_prompts(PROMPTS[::-1])
    finally:
        del sd3._encode
    assert calls == [PROMPTS, [""]]  # unique prompts once, the negative once, then cache hits
    assert a.prompt_embeds.shape[0] == 3 and a.neg_prompt_embeds.shape == a.prompt_embeds.shape
    assert torch.equal(a.prompt_embeds[0], a.prompt_embeds[2])
    assert torch.equal(b.prompt_embeds[1], a.prompt_embeds[0])
    no_cfg = load_adapter("sd3", tiny_dirs["sd3"], guidance_scale=1.0).encode_prompts(PROMPTS)
    assert not no_cfg.has_negative
    torch.testing.assert_close(no_cfg.prompt_embeds, a.prompt_embeds[:2])


def test_sd3_encoding_matches_the_pipeline(sd3):
    pe, npe, pooled, npooled = sd3.pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=16
    )
    e = sd3.encode_prompts(PROMPTS)
    for mine, theirs in [(e.prompt_embeds, pe), (e.pooled, pooled), (e.neg_prompt_embeds, npe),
                         (e.neg_pooled, npooled)]:  # fmt: skip
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


# ---- noise, sigmas, shapes ----------------------------------------------------------------
@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_shapes_of_noise_velocity_and_images(fam, request):
    a = request.getfixturevalue(fam)
    x = a.initial_noise(3, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (3, *a.latent_shape)
    assert a.latent_shape == ((4, 16, 16) if fam == "sd3" else (64, 64))
    e = a.encode_prompts(PROMPTS + PROMPTS[:1])
    v = a.velocity(x, torch.full((3,), 0.7), e)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    img = a.decode(x)
    assert img.shape == (3, 3, 32, 32) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1 and not img.requires_grad


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_initial_noise_equals_the_pipelines_prepare_latents(fam, request):
    a = request.getfixturevalue(fam)
    mine = a.initial_noise(2, torch.Generator().manual_seed(7))
    c = a.pipe.transformer.config.in_channels // (1 if fam == "sd3" else 4)
    out = a.pipe.prepare_latents(
        2, c, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(7)
    )
    theirs = out if fam == "sd3" else out[0]
    assert torch.equal(mine, theirs)


def test_sd3_sigmas_equal_the_schedulers_static_shift(sd3, tiny_dirs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(
        tiny_dirs["sd3"], subfolder="scheduler", local_files_only=True
    )
    assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting
    x = sd3.initial_noise(1, torch.Generator().manual_seed(0))
    for steps in (1, 4, 10, 40):
        sched.set_timesteps(steps)
        s = sd3.sigmas(steps, x)
        assert s.dtype == torch.float32 and s.shape == (steps + 1,)
        assert torch.equal(s, sched.sigmas) and s[0] == 1 and s[-1] == 0
        assert (s[1:] < s[:-1]).all()


def test_flux_sigmas_equal_the_schedulers_dynamic_shift(flux, tiny_dirs):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(
        tiny_dirs["flux"], subfolder="scheduler", local_files_only=True
    )
    cfg = sched.config
    x = flux.initial_noise(1, torch.Generator().manual_seed(0))
    seq = x.shape[1]
    mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                         cfg.max_shift)  # fmt: skip
    for steps in (1, 4, 28):
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        s = flux.sigmas(steps, x)
        assert torch.equal(s, sched.sigmas) and s[0] == 1 and s[-1] == 0
    # a larger image has a longer sequence, hence a larger shift: noisier mid-schedule
    big = load_adapter("flux", tiny_dirs["flux"], resolution=64)
    xb = big.initial_noise(1, torch.Generator().manual_seed(0))
    assert xb.shape[1] == 4 * seq
    assert (big.sigmas(8, xb)[1:-1] > flux.sigmas(8, x)[1:-1]).all()


# ---- velocity -----------------------------------------------------------------------------
def test_sd3_cfg_equals_uncond_plus_g_times_difference(sd3):
    g = sd3.guidance_scale
    x = sd3.initial_noise(2, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.3])
    e = sd3.encode_prompts(PROMPTS)
    with torch.no_grad():
        v = sd3.velocity(x, sigma, e)
        v_c = sd3.velocity(x, sigma, PromptEmbeds(e.prompt_embeds, e.pooled), guidance_scale=1)
        v_u = sd3.velocity(x, sigma, PromptEmbeds(e.neg_prompt_embeds, e.neg_pooled), 1.0)
    torch.testing.assert_close(v, v_u + g * (v_c - v_u), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v, v_c)


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_velocity_is_deterministic(fam, request):
    a = request.getfixturevalue(fam)
    x = a.initial_noise(2, torch.Generator().manual_seed(2))
    e = a.encode_prompts(PROMPTS)
    s = torch.tensor([0.5, 0.25])
    assert torch.equal(a.velocity(x, s, e), a.velocity(x, s, e))


def test_flux_guidance_embedding_changes_the_velocity(flux):
    x = flux.initial_noise(2, torch.Generator().manual_seed(3))
    e = flux.encode_prompts(PROMPTS)
    with torch.no_grad():
        assert not torch.allclose(flux.velocity(x, 0.5, e), flux.velocity(x, 0.5, e, 1.0))


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_lora_targets_exist_and_gradients_reach_the_wrapped_module(fam, tiny_dirs):
    from peft import LoraConfig, get_peft_model

    a = load_adapter(fam, tiny_dirs[fam], guidance_scale=4.5 if fam == "sd3" else 3.5)
    names = [n for n, _ in a.trainable_module.named_modules()]
    for t in a.lora_targets:
        assert any(n == t or n.endswith("." + t) for n in names), f"{fam}: no module '*{t}'"
    x = a.initial_noise(2, torch.Generator().manual_seed(4))
    e = a.encode_prompts(PROMPTS)
    a.velocity(x, torch.tensor([0.8, 0.4]), e).square().mean().backward()
    grads = [p.grad for p in a.trainable_module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:5])
    assert sum(g.abs().sum() for g in grads if g is not None) > 0

    base = a.trainable_module
    base.requires_grad_(False)
    base.zero_grad(set_to_none=True)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=a.lora_targets)
    wrapped = get_peft_model(base, cfg)
    with torch.no_grad():
        v0 = a.velocity(x, torch.tensor([0.8, 0.4]), e)
    a.set_trainable_module(wrapped)
    assert a.trainable_module is wrapped
    v = a.velocity(x, torch.tensor([0.8, 0.4]), e)
    torch.testing.assert_close(v, v0)  # LoRA starts as the identity (B = 0)
    v.square().mean().backward()
    lora_b = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert len(lora_b) >= len(a.lora_targets)
    dead = [n for n, p in wrapped.named_parameters()
            if "lora_B" in n and (p.grad is None or p.grad.abs().sum() == 0)]  # fmt: skip
    # only SD3's last block's context query is unused: that block's text output is discarded
    last = f"transformer_blocks.{len(base.transformer_blocks) - 1}.attn.add_q_proj."
    assert all(last in n for n in dead) and len(dead) <= 1, dead
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "lora_" not in n)


def test_frozen_parts_are_frozen_and_in_eval(sd3):
    mods = sd3.frozen_modules()
    assert set(mods) == {"text_encoder", "text_encoder_2", "text_encoder_3", "vae"}
    for m in mods.values():
        assert not m.training and not any(p.requires_grad for p in m.parameters())


# ---- the adapter reproduces the pipeline --------------------------------------------------
def test_sd3_euler_loop_with_cfg_matches_the_pipeline_call(sd3, tiny_dirs):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dirs["sd3"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    x0 = sd3.initial_noise(2, torch.Generator().manual_seed(5))
    ref = pipe(PROMPTS, height=32, width=32, num_inference_steps=6, guidance_scale=4.5,
               latents=x0.clone(), max_sequence_length=sd3.max_sequence_length,
               output_type="latent").images  # fmt: skip
    e = sd3.encode_prompts(PROMPTS)
    mine = euler_sample(sd3, x0, e, 6)
    # close, not equal: text encoders see other batch sizes there ("" ×2 vs ×1): ulp-level
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    # given the same embeddings the loop is bit-identical to the pipeline's
    same = pipe(prompt_embeds=e.prompt_embeds, pooled_prompt_embeds=e.pooled,
                negative_prompt_embeds=e.neg_prompt_embeds, negative_pooled_prompt_embeds=e.neg_pooled,
                height=32, width=32, num_inference_steps=6, guidance_scale=4.5, latents=x0.clone(),
                output_type="latent").images  # fmt: skip
    assert torch.equal(mine, same)
    # decode is the pipeline's vae decode + postprocess
    vae = pipe.vae
    img = vae.decode(ref / vae.config.scaling_factor + vae.config.shift_factor).sample
    img = pipe.image_processor.postprocess(img.detach(), output_type="pt")
    torch.testing.assert_close(sd3.decode(mine), img, atol=1e-5, rtol=1e-5)


def test_flux_euler_loop_matches_the_pipeline_call(flux, tiny_dirs):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dirs["flux"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    x0 = flux.initial_noise(2, torch.Generator().manual_seed(6))
    ref = pipe(PROMPTS, height=32, width=32, num_inference_steps=5, guidance_scale=3.5,
               latents=x0.clone(), max_sequence_length=flux.max_sequence_length,
               output_type="latent").images  # fmt: skip
    mine = euler_sample(flux, x0, flux.encode_prompts(PROMPTS), 5)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_bf16_model_returns_float32_velocity_close_to_float32(fam, tiny_dirs, request):
    a32 = request.getfixturevalue(fam)
    a = load_adapter(fam, tiny_dirs[fam], dtype=torch.bfloat16, guidance_scale=a32.guidance_scale)
    x = a.initial_noise(2, torch.Generator().manual_seed(8))
    s = torch.tensor([0.6, 0.2])
    v = a.velocity(x, s, a.encode_prompts(PROMPTS))
    with torch.no_grad():
        v32 = a32.velocity(x, s, a32.encode_prompts(PROMPTS))
    assert v.dtype == torch.float32 and v.requires_grad
    assert (v - v32).abs().mean() < 0.05 * v32.abs().mean()
    assert a.decode(x).dtype == torch.float32
