"""The reward contract, which every reward and the reward-service client satisfy.

A reward is a callable `(images, prompts, metadata) -> RewardOutput`: images are float tensors
in [0, 1], shape (B, 3, H, W); scores are a float32 tensor (B,). In-process rewards and HTTP
clients satisfy the same contract. A reward that cannot score must raise: a failed score never
silently becomes a number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class RewardError(RuntimeError):
    """A reward could not score a batch (after its retries); the message names the reward."""


@dataclass
class RewardOutput:
    scores: torch.Tensor  # (B,) float32
    details: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,)


RewardFn = Callable[[torch.Tensor, list[str], list[dict[str, Any]]], RewardOutput]


def to_uint8_hwc(images: torch.Tensor) -> list:
    """(B, 3, H, W) float [0, 1] -> list of (H, W, 3) uint8 numpy arrays."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [a.permute(1, 2, 0).cpu().numpy() for a in arr]
