"""`imagereward`: ImageReward v1.0 (Xu et al. 2023, arXiv 2304.05977).

The published model (THUDM/ImageReward, `ImageReward/ImageReward.py`): a BLIP ViT-L/16 image
encoder at 224 px (LayerNorm eps 1e-6), a BERT-base text encoder with cross-attention to the
image tokens in every layer (BLIP's `med.py`, vocabulary 30524 = bert-base-uncased + `[DEC]` +
`[ENC]`, no token-type embeddings), and an MLP 768-1024-128-64-16-1 (no activations) on the
text encoder's first ([CLS]) token. The prompt is tokenised to 35 tokens (padded, truncated);
the image goes through CLIP's eval transform (bicubic 224, centre crop, OpenAI mean/std). The
score is (mlp - 0.16717362830052426) / 1.0333394966054072: the published mean and std, which
put it near zero mean and unit spread over the ImageReward training prompts.

Here the same network runs as transformers' `BlipVisionModel` + `BlipTextModel` (the port of
BLIP's ViT and med.py) + the MLP; `IMAGEREWARD_TO_HF` maps the checkpoint's keys (its loader
uses strict=False, so its unused `blip.vision_proj`/`blip.text_proj` are ignored here too).
What this replaces: the `image-reward` package fetches its tokenizer and config from the hub,
unpickles the checkpoint with code, and pins timm/fairscale versions that conflict with this
stack. Options:
- `checkpoint`: ImageReward.pt, read with `torch.load(weights_only=True)`, or safetensors.
- `tokenizer_dir`: a local bert-base-uncased tokenizer directory; `[DEC]` and `[ENC]` are added
  here as BLIP's `init_tokenizer` adds them.
- `model_config`: optional JSON {"vision": BlipVisionConfig fields, "text": BlipTextConfig
  fields} overriding the published sizes (the tiny test model uses it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from flowpo.rewards.contract import RewardOutput
from flowpo.rewards.loading import clip_preprocess, load_state_file

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py, published
MAX_TOKENS = 35  # ImageReward.py: padding="max_length", truncation, max_length=35
FIX = (
    "download ImageReward.pt (hub repository THUDM/ImageReward) on a machine with network, copy "
    "it here and set reward.options.imagereward.checkpoint=PATH"
)
# BLIP ViT-L/16 at 224 px (create_vit("large")) and med_config.json with encoder_width 1024
VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
)
TEXT = dict(
    vocab_size=30524,
    hidden_size=768,
    encoder_hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
# BLIP ViT name (after `blip.visual_encoder.`) -> BlipVisionModel name
VIT = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
VIT_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
IGNORED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


class ImageRewardModel(nn.Module):
    def __init__(self, vision_cfg: dict, text_cfg: dict):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        from flowpo.rewards.aesthetic import AestheticHead

        self.vision = BlipVisionModel(BlipVisionConfig(**vision_cfg))
        self.text = BlipTextModel(BlipTextConfig(**text_cfg), add_pooling_layer=False)
        self.mlp = AestheticHead(text_cfg["hidden_size"])  # the same 5-linear layout

    def forward(self, pixels, input_ids, attention_mask) -> torch.Tensor:  # -> (B,) raw
        img = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, Dv)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=img,
            encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long, device=img.device),
        )
        return self.mlp(out.last_hidden_state[:, 0].float())


def imagereward_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published checkpoint's keys as ImageRewardModel's; unknown keys -> ValueError."""
    out, unknown = {}, []
    for key, t in state.items():
        if key.startswith(IGNORED):
            continue
        if key.startswith("blip.text_encoder."):
            out["text." + key.removeprefix("blip.text_encoder.")] = t
        elif key.startswith("mlp.layers."):
            out[key] = t
        elif key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
            if m and m.group(2) in VIT_BLOCK:
                out[f"vision.encoder.layers.{m.group(1)}.{VIT_BLOCK[m.group(2)]}.{m.group(3)}"] = t
            elif name in VIT:
                out["vision." + VIT[name]] = t
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an ImageReward state dict: unknown keys {unknown[:8]}")
    return out


def hf_to_imagereward(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `imagereward_to_hf` (for writing tiny checkpoints in the published layout)."""
    vit, block = {v: k for k, v in VIT.items()}, {v: k for k, v in VIT_BLOCK.items()}
    out = {}
    for key, t in state.items():
        if key.startswith("text."):
            out["blip.text_encoder." + key.removeprefix("text.")] = t
        elif key.startswith("mlp."):
            out[key] = t
        else:
            name = key.removeprefix("vision.")
            m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
            new = f"blocks.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}" if m else vit[name]
            out["blip.visual_encoder." + new] = t
    return out


def load_imagereward(checkpoint: str, tokenizer_dir: str, model_config: str = ""):
    """(ImageRewardModel in eval mode on CPU, tokenizer) from local files only."""
    from transformers import BertTokenizer

    where = "reward.options.imagereward"
    vision, text = dict(VISION), dict(TEXT)
    if model_config:
        try:
            cfg = json.loads(Path(model_config).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}.model_config: cannot read '{model_config}': {e}") from None
        vision.update(cfg.get("vision", {}))
        text.update(cfg.get("text", {}))
    state = load_state_file(checkpoint, f"{where}.checkpoint", FIX)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = ImageRewardModel(vision, text)
    try:
        missing, _ = model.load_state_dict(imagereward_to_hf(state), strict=False)
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"{where}.checkpoint: '{checkpoint}' does not fit ImageReward's architecture "
            f"({model_config or 'published sizes'}): {str(e)[:400]}"
        ) from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{where}.checkpoint: '{checkpoint}' lacks {missing[:6]}")
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        raise ValueError(
            f"{where}.tokenizer_dir: no directory '{tokenizer_dir}'; point it at a local "
            "bert-base-uncased tokenizer (vocab.txt + tokenizer_config.json)"
        )
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    # BLIP's init_tokenizer: [DEC] as bos, [ENC] as an extra special token (ids 30522, 30523)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != text["vocab_size"]:
        raise ValueError(
            f"{where}.tokenizer_dir: '{tokenizer_dir}' has {len(tokenizer)} tokens with [DEC] and "
            f"[ENC], the checkpoint {text['vocab_size']}; use the bert-base-uncased tokenizer"
        )
    return model.eval().requires_grad_(False), tokenizer


def imagereward(
    checkpoint: str,
    tokenizer_dir: str,
    model_config: str = "",
    device: str = "",
    dtype: str = "float32",
):
    from flowpo.rewards.clip_rewards import DTYPES, default_device

    if dtype not in DTYPES:
        raise ValueError(
            f"reward.options.imagereward.dtype '{dtype}': choose one of {sorted(DTYPES)}"
        )
    model, tokenizer = load_imagereward(checkpoint, tokenizer_dir, model_config)
    model = model.to(device or default_device(), DTYPES[dtype])
    model.mlp.float()  # the head runs in float32, as ImageReward's `.float()` before it
    dev = model.mlp.layers[0].weight.device
    size = model.vision.config.image_size

    @torch.no_grad()
    def fn(images, prompts, metadata) -> RewardOutput:
        pix = clip_preprocess(images, size).to(dev, DTYPES[dtype])
        tok = tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        raw = model(pix, tok["input_ids"].to(dev), tok["attention_mask"].to(dev)).cpu()
        return RewardOutput(scores=((raw - MEAN) / STD).float(), details={"raw": raw.float()})

    return fn
