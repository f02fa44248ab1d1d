"""JPEG (in)compressibility: the size of the image encoded as JPEG, in kB (DDPO's toy reward,
arXiv 2305.13301). Pillow only; quality 95 as in DDPO."""

from __future__ import annotations

import io

import torch
from PIL import Image

from flowpo.rewards.contract import RewardOutput, to_uint8_hwc


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    sizes = []
    for arr in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_incompressibility(quality: int = 95):
    def fn(images, prompts, metadata) -> RewardOutput:
        return RewardOutput(scores=jpeg_size_kb(images, quality))

    return fn


def jpeg_compressibility(quality: int = 95):
    def fn(images, prompts, metadata) -> RewardOutput:
        return RewardOutput(scores=-jpeg_size_kb(images, quality))

    return fn
