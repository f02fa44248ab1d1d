"""Tiny random models of every family, written in the exact diffusers pipeline layout.

`make_tiny("sd3", dir)` builds the real diffusers/transformers classes with tiny configs,
trains small tokenizers in code (no download), and saves the pipeline with
`save_pretrained`, so the directory loads with `StableDiffusion3Pipeline.from_pretrained(dir,
local_files_only=True)` and through `load_adapter` exactly as a real model would. Tests and
CPU demos use these; the CLI exposes it as `flowpo make-tiny sd3 <dir>`.

Sizes (sd3, resolution 32): image 32×32, VAE factor 2 → latents (4, 16, 16), patch 2 → 64
image tokens; text: 16 CLIP + 16 T5 tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from flowpo.models.tiny_tokenizers import clip_tokenizer, qwen_tokenizer, t5_tokenizer

# Tiny dimensions, filled with resolution-dependent fields by `make_tiny`. Per family:
# component name -> constructor kwargs. Channels are chosen to be consistent with what the
# pipelines derive: SD3 joint_attention_dim = T5 d_model ≥ 2 CLIP hiddens (they are padded
# into it), pooled = the two CLIP projections concatenated; FLUX in_channels = 4 × VAE
# latent channels (2×2 packing), pooled = CLIP hidden, rope axes sum to the head dim.
_SEQ_LEN = 16  # tokens per text encoder: short prompts, fast tests
TINY_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd3": {
        "clip": dict(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_SEQ_LEN,
            hidden_act="quick_gelu",
        ),
        "t5": dict(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            tie_word_embeddings=False,
        ),
        "vae": dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            # SD3's own VAE constants, so decode does the same arithmetic as a real model
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "transformer": dict(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            # 2 layers: fwd+bwd at batch 8 ≈ 11 ms on 2 CPU cores (3 layers: ≈ 17 ms)
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=64,
            pooled_projection_dim=64,
            pos_embed_max_size=32,  # crops up to 32×32 patches: resolution ≤ 128 at factor 2
            qk_norm="rms_norm",
        ),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    },
    "flux": {
        "clip": dict(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_SEQ_LEN,
            hidden_act="quick_gelu",
        ),
        "t5": dict(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            tie_word_embeddings=False,
        ),
        "vae": dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "transformer": dict(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=64,
            pooled_projection_dim=32,
            guidance_embeds=True,  # FLUX.1-dev style distilled guidance
            axes_dims_rope=(4, 6, 6),
        ),
        # FLUX.1-dev scheduler config: shift from the image sequence length
        "scheduler": dict(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    },
}
# Qwen-Image: Qwen2.5-VL text tower (vision tower instantiated but unused), the Wan-style VAE
# (z_dim 4, factor 2 = 2 ** len(temperal_downsample)), a dual-stream transformer whose
# in_channels = 4 × z_dim (2×2 packing), joint_attention_dim = text hidden size, rope axes sum
# to the head dim; text head_dim 8 = 2 × sum(mrope_section).
TINY_CONFIGS["qwen-image"] = {
    "text": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
    ),
    "vision": dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        fullatt_block_indexes=[0],
    ),
    "vae": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        # the first four of Qwen-Image's per-channel latent statistics (vae/config.json)
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
    ),
    "transformer": dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
    # Qwen/Qwen-Image scheduler/scheduler_config.json
    "scheduler": dict(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    ),
}


def seeded(seed: int, build: Any) -> Any:
    """Build a module under `seed` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def text_encoders(cfg: dict[str, dict[str, Any]], seed: int, n_clip: int, projection: bool):
    """Tokenizers and text encoders: `n_clip` CLIP encoders and one T5 encoder."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    clip_tok = clip_tokenizer(_SEQ_LEN)
    t5_tok = t5_tokenizer(_SEQ_LEN)
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok),
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,  # pooling picks the first eos position
        pad_token_id=clip_tok.pad_token_id,
        **cfg["clip"],
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    clips = [seeded(seed + 1 + i, lambda: cls(clip_cfg)) for i in range(n_clip)]
    t5_cfg = T5Config(
        vocab_size=len(t5_tok),
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
        **cfg["t5"],
    )
    t5 = seeded(seed + 10, lambda: T5EncoderModel(t5_cfg))
    return clip_tok, clips, t5_tok, t5


def _vae(cfg: dict[str, Any], seed: int, resolution: int) -> Any:
    from diffusers import AutoencoderKL

    n = len(cfg["block_out_channels"])
    return seeded(
        seed + 20,
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            sample_size=resolution,  # the adapters' default resolution
            **cfg,
        ),
    )


def _make_sd3(cfg: dict[str, dict[str, Any]], seed: int, resolution: int) -> Any:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    clip_tok, (clip1, clip2), t5_tok, t5 = text_encoders(cfg, seed, 2, projection=True)
    vae = _vae(cfg["vae"], seed, resolution)
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    tcfg = cfg["transformer"]
    if resolution % (factor * tcfg["patch_size"]):
        raise ValueError(
            f"resolution ({resolution}) must be a multiple of {factor * tcfg['patch_size']} "
            "(VAE factor × patch size) for the tiny sd3 model"
        )
    transformer = seeded(
        seed + 30, lambda: SD3Transformer2DModel(sample_size=resolution // factor, **tcfg)
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        vae=vae,
        text_encoder=clip1,
        tokenizer=clip_tok,
        text_encoder_2=clip2,
        tokenizer_2=copy.deepcopy(clip_tok),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def _make_flux(cfg: dict[str, dict[str, Any]], seed: int, resolution: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, (clip,), t5_tok, t5 = text_encoders(cfg, seed, 1, projection=False)
    vae = _vae(cfg["vae"], seed, resolution)
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    if resolution % (factor * 2):
        raise ValueError(
            f"resolution ({resolution}) must be a multiple of {factor * 2} "
            "(VAE factor × 2×2 packing) for the tiny flux model"
        )
    transformer = seeded(seed + 30, lambda: FluxTransformer2DModel(**cfg["transformer"]))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _make_qwen_image(cfg: dict[str, dict[str, Any]], seed: int, resolution: int) -> Any:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    factor = 2 ** len(cfg["vae"]["temperal_downsample"])
    if resolution % (factor * 2):
        raise ValueError(
            f"resolution ({resolution}) must be a multiple of {factor * 2} "
            "(VAE factor × 2×2 packing) for the tiny qwen-image model"
        )
    tok = qwen_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<|endoftext|>", "<|im_end|>")}
    te_cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            **cfg["text"],
        ),
        vision_config=cfg["vision"],
    )
    text_encoder = seeded(seed + 1, lambda: Qwen2_5_VLForConditionalGeneration(te_cfg))
    vae = seeded(seed + 20, lambda: AutoencoderKLQwenImage(**cfg["vae"]))
    tcfg = cfg["transformer"]
    transformer = seeded(seed + 30, lambda: QwenImageTransformer2DModel(**tcfg))
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


_BUILDERS = {"sd3": _make_sd3, "flux": _make_flux, "qwen-image": _make_qwen_image}


def tiny_families() -> list[str]:
    """The families `make_tiny` builds (the CLI's choices and `tiny:FAMILY` paths)."""
    return [*_BUILDERS, "bagel"]


def make_tiny(family: str, out_dir: str, *, seed: int = 0, resolution: int = 32) -> str:
    """Write a tiny random `family` model to `out_dir` in the diffusers layout; return the path.

    The same `seed` gives the same weights. `resolution` (pixels, square) sets the VAE and
    transformer sample sizes, i.e. the default image size of the adapters.
    """
    if family == "bagel":  # not a diffusers pipeline: the official Bagel directory layout
        from flowpo.models.bagel.tiny import write_tiny_bagel

        return write_tiny_bagel(out_dir, seed=seed, resolution=resolution)
    if family not in _BUILDERS:
        raise ValueError(
            f"make-tiny family '{family}' is unknown; choose one of: {', '.join(_BUILDERS)}"
        )
    pipe = _BUILDERS[family](TINY_CONFIGS[family], seed, resolution)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out))
    return str(out)
