"""Reading and writing the official Bagel model directory (docs/bagel.md §1, §2, §6).

Layout (`ByteDance-Seed/BAGEL-7B-MoT`): `llm_config.json` (a Qwen2 config), `ema.safetensors`
(the whole Bagel state dict, official names), `ae.safetensors` (the FLUX.1 autoencoder in the
original BFL key layout) and the Qwen2.5 tokenizer files. Nothing else is read: every Bagel
value that is not in `llm_config.json` follows from tensor shapes (max_latent_size from the
position table, latent channels from `llm2vae`) or is a constant of the official code.

The autoencoder is diffusers' `AutoencoderKL`: its config is inferred from the BFL tensor
shapes and the BFL keys are converted with diffusers' own single-file converter
(`convert_ldm_vae_checkpoint`, what `AutoencoderKL.from_single_file` runs), so the FLUX file
loads without a diffusers config directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowpo.models.base import ModelLoadError

LLM_CONFIG, EMA_WEIGHTS, AE_WEIGHTS = "llm_config.json", "ema.safetensors", "ae.safetensors"
# load_ae's constants (§1): FLUX latent normalisation
VAE_SCALE, VAE_SHIFT = 0.3611, 0.1159
# Qwen2.5 special tokens Bagel uses (§3); ids are read from the tokenizer
BOS, EOS, SOI, EOI = "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"


def llm_config(model_dir: str | Path) -> Any:
    """`llm_config.json` as a Qwen2Config with the overrides the official code applies (§1)."""
    from transformers import Qwen2Config

    path = Path(model_dir) / LLM_CONFIG
    if not path.is_file():
        raise ModelLoadError(
            f"'{model_dir}' has no {LLM_CONFIG}; point model.path at a Bagel directory in the "
            "official layout (BAGEL-7B-MoT) or run 'flowpo make-tiny bagel DIR'"
        )
    raw = json.loads(path.read_text())
    raw.pop("layer_module", None)
    raw.update(tie_word_embeddings=False)  # lm_head is a separate tensor
    return Qwen2Config(**raw)


def _missing(model_dir: Path, name: str) -> ModelLoadError:
    return ModelLoadError(f"Bagel directory '{model_dir}' has no {name}")


def load_bagel(
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    start_of_image: int,
    end_of_image: int,
) -> nn.Module:
    """The Bagel T2I module from `ema.safetensors`, weights cast to `dtype` on `device`.

    Built on the meta device and filled with `assign=True` (no random init of 14B weights);
    understanding-only tensors (ViT, connector) are skipped; any other missing or unexpected
    key is an error.
    """
    from safetensors import safe_open

    from flowpo.models.bagel.modeling import UNDERSTANDING_PREFIXES, Bagel

    model_dir = Path(model_dir)
    cfg = llm_config(model_dir)
    path = model_dir / EMA_WEIGHTS
    if not path.is_file():
        raise _missing(model_dir, EMA_WEIGHTS)
    sd: dict[str, Tensor] = {}
    dev = torch.device(device)
    with safe_open(str(path), framework="pt", device=str(dev)) as f:
        for key in f.keys():
            # RoPE frequencies are recomputed (a non-persistent buffer; skipped if a file has it)
            if not key.startswith(UNDERSTANDING_PREFIXES) and not key.endswith(".inv_freq"):
                sd[key] = f.get_tensor(key).to(dtype)
    for key in ("latent_pos_embed.pos_embed", "llm2vae.weight"):
        if key not in sd:
            raise ModelLoadError(f"{path} has no '{key}': not a Bagel generation checkpoint")
    grid = math.isqrt(sd["latent_pos_embed.pos_embed"].shape[0])
    patch_dim = sd["llm2vae.weight"].shape[0]
    with torch.device("meta"):
        model = Bagel(
            cfg,
            max_latent_size=grid,
            latent_channels=patch_dim // 4,
            start_of_image=start_of_image,
            end_of_image=end_of_image,
        )
    res = model.load_state_dict(sd, strict=False, assign=True)
    if res.missing_keys or res.unexpected_keys:
        raise ModelLoadError(
            f"{path} does not match the Bagel module: missing {res.missing_keys[:5]}, "
            f"unexpected {res.unexpected_keys[:5]}"
        )
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    # the RoPE frequencies are a non-persistent buffer, still on meta: rebuild them
    with torch.device(dev):
        model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(cfg)
    model.latent_pos_embed.pos_embed.requires_grad_(False)
    return model


def save_bagel(model: nn.Module, model_dir: str | Path) -> None:
    """Write `llm_config.json` and `ema.safetensors` (official names) for `model`."""
    from safetensors.torch import save_file

    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.llm_config.to_dict()
    for key in ("transformers_version", "architectures", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    (out / LLM_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(out / EMA_WEIGHTS))


# ---- the FLUX autoencoder in BFL layout ---------------------------------------------------------
def bfl_vae_shapes(
    ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2, z: int = 16
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a BFL/LDM autoencoder state dict (§6): encoder.down.{i}.block.{j},
    downsample, mid.{block_1,attn_1,block_2}, norm_out, conv_out, and the decoder's up.{i}
    (num_res_blocks + 1 blocks each, upsample for i > 0). Written from the spec, so it checks
    the converter independently (244 tensors for FLUX's ch 128, [1, 2, 4, 4], 2 blocks)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name: str, c: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resblock(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(prefix: str, c: int) -> None:
        resblock(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{n}", c, c, 1)
        resblock(f"{prefix}.mid.block_2", c, c)

    levels = len(ch_mult)
    conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, 2 * z, 3)

    cin = ch * ch_mult[-1]
    conv("decoder.conv_in", z, cin, 3)
    mid("decoder", cin)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, 3, 3)
    return out


def vae_config_from_bfl(sd: dict[str, Tensor]) -> dict[str, Any]:
    """diffusers AutoencoderKL kwargs for a BFL state dict, read from its tensor shapes."""
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    widths = [
        sd[f"encoder.down.{i}.block.{blocks - 1}.conv2.weight"].shape[0] for i in range(levels)
    ]
    z = sd["decoder.conv_in.weight"].shape[1]
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(widths),
        layers_per_block=blocks,
        latent_channels=z,
        norm_num_groups=32,  # GroupNorm(32) throughout (§6)
        scaling_factor=VAE_SCALE,
        shift_factor=VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        sample_size=1024,
    )


def load_flux_vae(path: str | Path, *, dtype: torch.dtype, device: torch.device | str) -> Any:
    """`ae.safetensors` (BFL layout) as a diffusers AutoencoderKL; strict: every tensor maps."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise _missing(path.parent, path.name)
    sd = load_file(str(path))
    cfg = vae_config_from_bfl(sd)
    vae = AutoencoderKL(**cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, cfg), strict=True)
    vae = vae.to(device=device)
    if dtype != torch.float32:  # (diffusers warns on any dtype cast, even a no-op one)
        vae = vae.to(dtype=dtype)
    return vae.eval().requires_grad_(False)


def bfl_from_diffusers(vae: Any) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL's weights under the BFL names of `bfl_vae_shapes` (to write a
    tiny `ae.safetensors`). The map is the converter's, read by converting a probe: every BFL
    tensor filled with its own index."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = dict(vae.config)
    ch = cfg["block_out_channels"][0]
    shapes = bfl_vae_shapes(
        ch,
        tuple(c // ch for c in cfg["block_out_channels"]),
        cfg["layers_per_block"],
        cfg["latent_channels"],
    )
    names = list(shapes)
    probe = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(shapes.items())}
    converted = convert_ldm_vae_checkpoint(probe, cfg)
    sd = vae.state_dict()
    if set(converted) != set(sd):
        raise RuntimeError("BFL names do not convert onto this AutoencoderKL's state dict")
    out = {}
    for dk, t in converted.items():
        bfl = names[int(t.reshape(-1)[0])]
        out[bfl] = sd[dk].detach().reshape(shapes[bfl]).contiguous().cpu()
    return out
