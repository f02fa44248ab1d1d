"""CLIP image–text rewards: `pickscore` and `clipscore` (transformers CLIPModel from a local
directory; imported lazily).

- pickscore: PickScore (Kirstain et al. 2023, arXiv 2305.01569) is a CLIP ViT-H/14 fine-tuned
  on human preferences; its score is logit_scale.exp() * cos(image, text) (~20-23 for good
  images). `scale_by_26=True` divides by 26 as Flow-GRPO's PickScore reward does, putting it
  near [0, 1]. The published checkpoint (PickScore_v1) ships without processor files: point
  `processor_dir` at the matching CLIP-ViT-H-14 processor directory.
- clipscore: CLIPScore (Hessel et al. 2021, arXiv 2104.08718): w * max(cos(image, text), 0)
  with w = 2.5, on CLIP ViT-L/14 (any CLIP directory works).
"""

from __future__ import annotations

from typing import Any

import torch

from flowpo.rewards.contract import RewardOutput, to_uint8_hwc

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_clip(model_dir: str, processor_dir: str = "", device: str = "", dtype: str = "float32"):
    """(CLIPModel in eval mode, processor) from local directories only."""
    from transformers import AutoProcessor, CLIPModel

    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}': choose one of {sorted(DTYPES)}")
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=DTYPES[dtype])
    model = model.to(device or default_device()).eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(processor_dir or model_dir, local_files_only=True)
    return model, processor


def features_tensor(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; 4.x returned the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_cosine(model, processor, images: torch.Tensor, prompts: list[str]) -> tuple:
    """cos(image_b, text_b) (B,) float32 and the image embeddings (B, E), normalised."""
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pix = processor(images=to_uint8_hwc(images), return_tensors="pt")["pixel_values"]
    txt = processor(
        text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    img_emb = features_tensor(model.get_image_features(pixel_values=pix.to(dev, dtype)))
    txt_emb = features_tensor(
        model.get_text_features(
            input_ids=txt["input_ids"].to(dev), attention_mask=txt["attention_mask"].to(dev)
        )
    )
    # float32: the cosine of bf16 embeddings loses the differences rewards compare
    img_emb = torch.nn.functional.normalize(img_emb.float(), dim=-1)
    txt_emb = torch.nn.functional.normalize(txt_emb.float(), dim=-1)
    return (img_emb * txt_emb).sum(-1).cpu(), img_emb


def pickscore(
    model_dir: str,
    processor_dir: str = "",
    scale_by_26: bool = False,
    device: str = "",
    dtype: str = "float32",
):
    model, processor = load_clip(model_dir, processor_dir, device, dtype)

    def fn(images, prompts, metadata) -> RewardOutput:
        cos, _ = clip_cosine(model, processor, images, prompts)
        scores = model.logit_scale.exp().float().cpu() * cos
        if scale_by_26:  # Flow-GRPO's normalisation of PickScore
            scores = scores / 26.0
        return RewardOutput(scores=scores.float(), details={"cos": cos})

    return fn


def clipscore(model_dir: str, w: float = 2.5, device: str = "", dtype: str = "float32"):
    model, processor = load_clip(model_dir, "", device, dtype)

    def fn(images, prompts, metadata) -> RewardOutput:
        cos, _ = clip_cosine(model, processor, images, prompts)
        return RewardOutput(scores=(w * cos.clamp_min(0)).float(), details={"cos": cos})

    return fn
