"""The reward registry: reward name -> factory `factory(**options) -> RewardFn`.

The built-in rewards are listed by name as "module:function" and imported when first built or
inspected, so listing the rewards imports none of them (and this module imports no reward
module: the rewards sit beside it, not below it). `register_reward(name)` adds a factory
object (a user's reward, a test's).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from flowpo.rewards.contract import RewardFn

# reward.options.<name> keys read by WeightedReward / the service client, not by the factory
POLICY_KEYS = ("failure",)
REMOTE_KEYS = (
    "url",
    "token",
    "token_env",
    "timeout_s",
    "deadline_s",
    "batch_size",
    "max_concurrency",
    "backoff_s",
)

# name -> factory, or "module:function" of a built-in factory not imported yet
REWARD_REGISTRY: dict[str, Callable[..., RewardFn] | str] = {
    "aesthetic": "flowpo.rewards.aesthetic:aesthetic",
    "clipscore": "flowpo.rewards.clip_rewards:clipscore",
    "geneval": "flowpo.rewards.geneval:geneval",
    "hpsv2": "flowpo.rewards.hpsv2:hpsv2",
    "imagereward": "flowpo.rewards.imagereward:imagereward",
    "jpeg_compressibility": "flowpo.rewards.jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "flowpo.rewards.jpeg:jpeg_incompressibility",
    "ocr": "flowpo.rewards.ocr:ocr",
    "pickscore": "flowpo.rewards.clip_rewards:pickscore",
    "shapes": "flowpo.tasks.shapes.reward:shapes_reward",
    "unifiedreward": "flowpo.rewards.unifiedreward:unifiedreward",
}


def register_reward(name: str):
    """Register a reward factory: `factory(**kwargs) -> RewardFn`."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        REWARD_REGISTRY[name] = factory
        return factory

    return deco


def known_rewards() -> list[str]:
    return sorted(REWARD_REGISTRY)


def reward_factory(name: str) -> Callable[..., RewardFn]:
    """The factory registered as `name` (a registered name), importing a built-in's module."""
    factory = REWARD_REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = REWARD_REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return factory


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    if name not in REWARD_REGISTRY:
        known = ", ".join(sorted(REWARD_REGISTRY))
        raise ValueError(f"reward.weights: unknown reward '{name}'; choose one of: {known}")
    return reward_factory(name)(**kwargs)


def check_factory_kwargs(name: str, kwargs: dict[str, Any], where: str) -> None:
    """Unknown or missing scorer options -> ValueError listing what the factory accepts."""
    if name not in REWARD_REGISTRY:
        raise ValueError(f"{where}: unknown reward '{name}'; choose one of: {known_rewards()}")
    factory = reward_factory(name)
    unsupported = getattr(factory, "unsupported", "")
    if unsupported:
        raise ValueError(unsupported)
    params = inspect.signature(factory).parameters
    accepted = [p for p in params if params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in accepted:
                raise ValueError(
                    f"{where}.{key}: reward '{name}' has no option '{key}'; it accepts "
                    f"{accepted + list(POLICY_KEYS) + list(REMOTE_KEYS)}"
                )
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in kwargs
    ]
    if missing:
        raise ValueError(
            f"{where}: reward '{name}' needs {missing}; set e.g. {where}.{missing[0]}=... "
            f"(or serve it and set {where}.url)"
        )
