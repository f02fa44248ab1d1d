"""Preflight: the config checked against the world outside it, before any model loads.

`Config.validate` checks the config alone; `preflight` runs it and then what it cannot see
from there: prompt files (read now, so a missing file or a bad line stops at once), the model
path, and the registries of tiny model families, rewards (with their options), rollout
plans and algorithms (train.algorithm), and whether model.attn_backend can run on this machine.
`flowpo train`, `flowpo eval` and the trainer run it; every error is a ConfigError that
names the field and the fix.
"""

from __future__ import annotations

from pathlib import Path

from flowpo.config import Config, ConfigError
from flowpo.models.tiny import tiny_families
from flowpo.rewards.base import check_reward_options, known_rewards
from flowpo.trainer.algorithms import ALGORITHM_REGISTRY
from flowpo.trainer.data import load_prompt_items
from flowpo.trainer.plans import PLAN_REGISTRY


def preflight(cfg: Config, world_size: int = 1, training: bool = True) -> None:
    """`cfg.validate(world_size, training)`, then the checks against files and registries."""
    cfg.validate(world_size=world_size, training=training)
    for key, value in (
        ("rollout.prompt_file", cfg.rollout.prompt_file),
        ("eval.prompt_file", cfg.eval.prompt_file),
    ):
        if value:  # read it now: a missing file or a bad line stops before any model loads
            load_prompt_items(value, field=key)
    path = cfg.model.path
    if path != "shapes:base" and not path.startswith("tiny:") and not Path(path).is_dir():
        raise ConfigError(
            f"model.path '{path}' does not exist; point it at a local diffusers model "
            f"directory, or use tiny:sd3 / tiny:flux (or 'flowpo make-tiny sd3 DIR')"
        )
    if path.startswith("tiny:") and path[5:] not in tiny_families():
        raise ConfigError(
            f"model.path '{path}': tiny models are "
            + ", ".join(f"tiny:{f}" for f in tiny_families())
        )
    if (problem := attention_problem(cfg)) is not None:
        raise ConfigError(problem)
    if training and (problem := fp16_problem(cfg)) is not None:
        raise ConfigError(problem)
    for name in cfg.reward.weights:
        if name not in known_rewards():
            raise ConfigError(
                f"reward.weights: unknown reward '{name}'; choose one of: "
                + ", ".join(known_rewards())
            )
    try:
        check_reward_options(cfg.reward.weights, cfg.reward.options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    plan = cfg.rollout.plan
    if plan not in PLAN_REGISTRY:
        raise ConfigError(
            f"rollout.plan '{plan}' is unknown; choose one of: " + ", ".join(PLAN_REGISTRY)
        )
    PLAN_REGISTRY[plan].check_config(cfg)
    algo = cfg.train.algorithm
    if algo not in ALGORITHM_REGISTRY:
        raise ConfigError(
            f"train.algorithm '{algo}' is unknown; choose one of: " + ", ".join(ALGORITHM_REGISTRY)
        )
    if training:
        ALGORITHM_REGISTRY[algo].check_config(cfg)


def model_family(cfg: Config) -> str | None:
    """The adapter family the run will load, without loading it: model.family, else read from
    model.path (tiny:FAMILY, shapes:base, or the directory's files); None if it cannot tell."""
    if cfg.model.family != "auto":
        return cfg.model.family
    path = cfg.model.path
    if path.startswith("tiny:"):
        return path[5:].replace("-", "_")
    if path == "shapes:base":
        return "sd3"
    from flowpo.models.base import ModelLoadError, detect_family

    try:
        return detect_family(path) if Path(path).is_dir() else None
    except ModelLoadError:
        return None


def fp16_problem(cfg: Config) -> str | None:
    """Why engine.precision=fp16 cannot train the run's model family (one line), or None."""
    if cfg.engine.precision != "fp16":
        return None
    from flowpo.models.base import adapter_class

    family = model_family(cfg)
    try:
        if family is None or adapter_class(family).fp16_training:
            return None
    except KeyError:  # an unknown family: the loader names the problem
        return None
    return (
        f"engine.precision=fp16: the {family} family does not run in float16 (Flow-GRPO: fp16 "
        "where possible, bf16 for models that do not support fp16 inference); use "
        "engine.precision=bf16 with model.dtype=bfloat16"
    )


def attention_problem(cfg: Config) -> str | None:
    """Why model.attn_backend cannot run on this machine (device, packages, model.dtype, GPU
    generation) for the run's model family, as one line with the fix; None if it can."""
    if cfg.model.attn_backend == "native":
        return None
    import torch

    from flowpo.models.attention import attention_backend_problem

    cuda = torch.cuda.is_available()
    return attention_backend_problem(
        cfg.model.attn_backend,
        model_family(cfg),
        cfg.model.dtype,
        "cuda" if cuda else "cpu",
        torch.cuda.get_device_capability(0) if cuda else None,
    )
