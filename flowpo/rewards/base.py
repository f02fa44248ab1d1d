"""Reward contract, registry and weighted combination.

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


@dataclass
class RewardOutput:
    scores: torch.Tensor  # (B,) float32
    details: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,)


RewardFn = Callable[[torch.Tensor, list[str], list[dict[str, Any]]], RewardOutput]
REWARD_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    """Register a reward factory: `factory(**kwargs) -> RewardFn`."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        REWARD_REGISTRY[name] = factory
        return factory

    return deco


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    _import_builtin_rewards()
    if name not in REWARD_REGISTRY:
        known = ", ".join(sorted(REWARD_REGISTRY))
        raise ValueError(f"reward.weights: unknown reward '{name}'; choose one of: {known}")
    return REWARD_REGISTRY[name](**kwargs)


def known_rewards() -> list[str]:
    _import_builtin_rewards()
    return sorted(REWARD_REGISTRY)


def _import_builtin_rewards() -> None:
    from flowpo.rewards import jpeg, shapes  # noqa: F401  (register on import)


class WeightedReward:
    """Weighted sum of raw scores of several rewards; every reward's scores are kept in details."""

    def __init__(self, weights: dict[str, float], factories_kwargs: dict[str, dict] | None = None):
        kw = factories_kwargs or {}
        self.weights = dict(weights)
        self.fns = {name: build_reward(name, **kw.get(name, {})) for name in self.weights}

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        details: dict[str, torch.Tensor] = {}
        for name, fn in self.fns.items():
            out = fn(images, prompts, metadata)
            scores = out.scores.detach().float().cpu()
            if scores.shape != (images.shape[0],):
                raise RuntimeError(
                    f"reward '{name}' returned scores of shape {tuple(scores.shape)}, "
                    f"expected ({images.shape[0]},)"
                )
            if not torch.isfinite(scores).all():
                raise RuntimeError(f"reward '{name}' returned non-finite scores: {scores.tolist()}")
            details[name] = scores
            for key, value in out.details.items():
                details[f"{name}/{key}"] = value.detach().float().cpu()
            total += self.weights[name] * scores
        return RewardOutput(scores=total, details=details)


def to_uint8_hwc(images: torch.Tensor) -> list:
    """(B, 3, H, W) float [0, 1] -> list of (H, W, 3) uint8 numpy arrays."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [a.permute(1, 2, 0).cpu().numpy() for a in arr]
