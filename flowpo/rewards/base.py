"""The rewards of a run: options, scorers (in process or a service's client) and their weighted
combination.

The reward contract (`RewardOutput`, `RewardError`, `to_uint8_hwc`) lives in
`flowpo.rewards.contract` and the registry of reward names in `flowpo.rewards.registry`; both
are re-exported here, so `from flowpo.rewards.base import ...` names the whole reward API.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from flowpo.rewards.contract import RewardError, RewardFn, RewardOutput, to_uint8_hwc
from flowpo.rewards.registry import (
    POLICY_KEYS,
    REMOTE_KEYS,
    REWARD_REGISTRY,
    build_reward,
    check_factory_kwargs,
    known_rewards,
    register_reward,
)

__all__ = [
    "FAILURE_POLICIES",
    "POLICY_KEYS",
    "REMOTE_KEYS",
    "REWARD_REGISTRY",
    "RewardError",
    "RewardFn",
    "RewardOutput",
    "WeightedReward",
    "build_reward",
    "build_scorer",
    "check_factory_kwargs",
    "check_reward_options",
    "check_reward_services",
    "group_normalized_total",
    "known_rewards",
    "register_reward",
    "split_options",
    "to_uint8_hwc",
]

log = logging.getLogger(__name__)

FAILURE_POLICIES = ("raise", "mask")


def split_options(name: str, opts: dict[str, Any] | None) -> tuple[str, dict, dict]:
    """reward.options.<name> -> (failure policy, remote-client kwargs or {}, factory kwargs)."""
    opts = dict(opts or {})
    failure = str(opts.pop("failure", "raise"))
    remote = {k: opts.pop(k) for k in REMOTE_KEYS if k in opts}
    return failure, remote, opts


def check_reward_options(weights: dict[str, float], options: dict[str, dict[str, Any]]) -> None:
    """Raise ValueError naming `reward.options.<name>.<key>` and the fix for any bad option."""
    for name in options:
        if name not in weights:
            raise ValueError(
                f"reward.options.{name}: '{name}' has no weight; add it to reward.weights or "
                "drop its options"
            )
    for name in weights:
        opts = options.get(name, {})
        where = f"reward.options.{name}"
        if not isinstance(opts, dict):
            raise ValueError(f"{where}: expected a mapping of options, got {opts!r}")
        failure, remote, kwargs = split_options(name, opts)
        if failure not in FAILURE_POLICIES:
            raise ValueError(f"{where}.failure '{failure}': choose raise or mask")
        if remote:
            if "url" not in remote:
                raise ValueError(
                    f"{where}: {sorted(remote)} configure the reward-service client; set "
                    f"{where}.url=http://HOST:PORT too"
                )
            if kwargs:
                raise ValueError(
                    f"{where}: {sorted(kwargs)} are scorer options, but the reward is served at "
                    f"{remote['url']}; pass them to `flowpo serve-reward` instead"
                )
            from flowpo.rewards.client import check_client_options

            check_client_options(where, remote)
            continue
        check_factory_kwargs(name, kwargs, where)


def build_scorer(name: str, opts: dict[str, Any] | None = None) -> tuple[RewardFn, str]:
    """(scorer, failure policy) for reward `name`: the service client when options name a
    `url`, else the in-process reward built with the remaining options."""
    where = f"reward.options.{name}"
    failure, remote, kwargs = split_options(name, opts)
    if failure not in FAILURE_POLICIES:
        raise ValueError(f"{where}.failure '{failure}': choose raise or mask")
    if remote:
        from flowpo.rewards.client import RemoteReward

        return RemoteReward(name=name, **remote), failure
    if name in REWARD_REGISTRY:
        check_factory_kwargs(name, kwargs, where)
    return build_reward(name, **kwargs), failure


def check_reward_services(
    weights: dict[str, float],
    options: dict[str, dict[str, Any]] | None,
    wait_s: float | None = None,
) -> None:
    """Fail fast, before any model loads, when a configured reward service (a reward with a
    `url` option) does not answer within its deadline_s (or `wait_s`) or serves another reward:
    RewardServiceError naming the fix."""
    from flowpo.rewards.client import RemoteReward

    for name in weights:
        opts = (options or {}).get(name) or {}
        if "url" in opts:
            fn, _ = build_scorer(name, opts)
            assert isinstance(fn, RemoteReward)
            fn.check(wait_s)


class WeightedReward:
    """Weighted sum of raw scores of several rewards; every reward's scores are kept in details.

    Failure policy per reward (`reward.options.<name>.failure`): `raise` (default) turns an
    exception or a non-finite score into a RewardError; `mask` gives the affected samples a NaN
    total (the trainer drops them from the update) and records `details["<name>/failed"]`.
    A reward marks single samples it could not score with NaN (e.g. an unparseable judge answer).
    A ValueError (the reward rejects its inputs or options, a service answers 4xx) always
    raises: masking would hide a configuration error behind a metric.
    """

    def __init__(self, weights: dict[str, float], options: dict[str, dict[str, Any]] | None = None):
        opts = options or {}
        self.weights = dict(weights)
        self.fns: dict[str, RewardFn] = {}
        self.failure: dict[str, str] = {}
        for name in self.weights:
            self.fns[name], self.failure[name] = build_scorer(name, opts.get(name))

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        b = images.shape[0]
        total = torch.zeros(b, dtype=torch.float32)
        details: dict[str, torch.Tensor] = {}
        for name, fn in self.fns.items():
            mask = self.failure[name] == "mask"
            try:
                out = fn(images, prompts, metadata)
            except ValueError:
                raise  # the reward rejects its inputs or options: a configuration error
            except Exception as e:
                if not mask:
                    if isinstance(e, RewardError):
                        raise
                    raise RewardError(f"reward '{name}' failed: {type(e).__name__}: {e}") from e
                log.warning("reward '%s' failed on %d samples (masked): %s", name, b, e)
                out = RewardOutput(scores=torch.full((b,), float("nan")))
            scores = out.scores.detach().float().cpu()
            if scores.shape != (b,):
                raise RewardError(
                    f"reward '{name}' returned scores of shape {tuple(scores.shape)}, "
                    f"expected ({b},)"
                )
            bad = ~torch.isfinite(scores)
            if bad.any() and not mask:
                raise RewardError(
                    f"reward '{name}' could not score {int(bad.sum())} of {b} samples "
                    f"(non-finite scores: {scores.tolist()}); fix the reward, or set "
                    f"reward.options.{name}.failure=mask to drop such samples from the update"
                )
            scores = scores.masked_fill(bad, float("nan"))
            details[name] = scores
            if mask:
                details[f"{name}/failed"] = bad.float()
            for key, value in out.details.items():
                details[f"{name}/{key}"] = value.detach().float().cpu()
            total += self.weights[name] * scores
        return RewardOutput(scores=total, details=details)


def group_normalized_total(
    details: dict[str, torch.Tensor],
    weights: dict[str, float],
    group_ids: torch.Tensor,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Sum over rewards of w_k * (r_k - mean_group(r_k)) / (std_group(r_k) + eps).

    Normalising each reward inside its group before weighting keeps a reward with a large
    scale (JPEG kB, PickScore logits) from drowning the others, so weights mean relative
    importance. Samples with NaN (masked) scores stay NaN and are left out of the group
    statistics. Shapes: details[name] (N,), group_ids (N,) integer.
    """
    _, idx = torch.unique(group_ids, return_inverse=True)
    n = int(idx.max()) + 1
    total = torch.zeros(group_ids.shape[0], dtype=torch.float64)
    for name, w in weights.items():
        r = details[name].double()
        ok = torch.isfinite(r)
        r0 = torch.where(ok, r, torch.zeros_like(r))
        cnt = torch.zeros(n, dtype=r.dtype).index_add_(0, idx, ok.double()).clamp_min(1)
        mean = torch.zeros(n, dtype=r.dtype).index_add_(0, idx, r0) / cnt
        dev = torch.where(ok, r - mean[idx], torch.zeros_like(r))
        std = (torch.zeros(n, dtype=r.dtype).index_add_(0, idx, dev.square()) / cnt).sqrt()
        z = (r - mean[idx]) / (std[idx] + eps)  # NaN stays NaN
        total += w * z
    return total.float()
