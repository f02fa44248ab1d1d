"""Checks every rank makes together at startup, before any model loads: that all ranks run the
same config, and that every rank reaches the reward services it will call. Collective: every
rank calls them, so all ranks stop together when one fails."""

from __future__ import annotations

import json

from flowpo.config import Config
from flowpo.rewards.base import check_reward_services
from flowpo.rewards.client import RewardServiceError
from flowpo.trainer.engine import Collectives


def check_same_config(cfg: Config, dist: Collectives) -> None:
    """Every rank must run the same config (each node parses its own command line)."""
    if dist.world_size == 1:
        return
    mine = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    everyone = dist.all_gather_object(mine)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            a, b = json.loads(everyone[0]), json.loads(theirs)
            diff = [
                f"{sec}.{k}: {a[sec][k]!r} (rank 0) vs {b[sec].get(k)!r} (rank {rank})"
                for sec in a
                for k in a[sec]
                if a[sec][k] != b[sec].get(k)
            ]
            raise RuntimeError(
                "ranks were started with different configs; give every node the same "
                "recipe and overrides. Differences: " + "; ".join(diff[:5])
            )


def check_reward_services_on_every_rank(cfg: Config, dist: Collectives) -> None:
    """Every rank scores its own images, so every rank checks the services it will call; the
    outcome is shared so that all ranks stop together (one rank stopping alone would leave the
    others waiting at the next barrier)."""
    try:
        check_reward_services(cfg.reward.weights, cfg.reward.options)
        mine = ""
    except RewardServiceError as e:
        mine = str(e)
    failed = [(r, m) for r, m in enumerate(dist.all_gather_object(mine)) if m]
    if failed:
        where = "" if dist.world_size == 1 else f" (rank(s) {', '.join(str(r) for r, _ in failed)})"
        raise RewardServiceError(failed[0][1] + where)
