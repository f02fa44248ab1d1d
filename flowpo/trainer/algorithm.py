"""The algorithm interface and its registry (see `flowpo.trainer.algorithms` for what each
method does and which algorithms exist). Its own module so that algorithm modules
(`algorithms.py`, `forward_rl.py`) import it and the registry module imports them, with no
import circle."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor

from flowpo.config import Config
from flowpo.trainer.update import StepLoss

ALGORITHM_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        ALGORITHM_REGISTRY[name] = cls
        return cls

    return deco


class Algorithm:
    """Base: see the module docstring. `trainer` is the GRPOTrainer that runs the loop."""

    name: ClassVar[str] = ""
    rollouts: ClassVar[str] = "SDE rollouts"  # how training images are sampled (the summary)
    # CFG scale the rollouts sample (and their prompts are encoded) with; None = the adapter's
    rollout_guidance_scale: float | None = None

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg: Config = trainer.cfg

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError (naming the field and the fix) for settings this cannot run."""

    def plan_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def sample_batch(self, embeds, epoch: int, batch: int, sigmas: Tensor, gen):
        raise NotImplementedError

    def cat(self, parts: list):
        raise NotImplementedError

    def begin_update(self, data, epoch: int) -> None:
        """Called once per epoch before the first micro-batch."""

    def loss(self, sub, j: int, embeds, adv: Tensor, *, epoch: int, start: int) -> StepLoss:
        raise NotImplementedError

    def end_update(self, epoch: int) -> dict[str, float]:
        """Called once per epoch after the last engine step; returns extra metrics."""
        return {}

    def states(self) -> dict:
        """name -> object with save(path)/load(path) (an EMA), saved per rank."""
        return {}
