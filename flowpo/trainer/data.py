"""Prompt datasets and the distributed K-repeat sampler.

The sampler draws, each epoch, `prompts_per_epoch` prompts, repeats each G times and deals the
images to ranks. Everything derives from (seed, epoch), so all ranks agree on the data order
without communicating and a resumed run continues the same sequence (the sampler position is
the epoch counter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowpo.config import ConfigError

BUILTIN_SOURCES = ("shapes:train", "shapes:heldout", "shapes:all")
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"


def bundled_sets() -> list[str]:
    """Names of the small prompt sets shipped in flowpo/data/prompts (`bundled:NAME`)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*") if p.suffix in (".txt", ".jsonl"))


def _resolve_source(prompt_file: str, field: str) -> Path:
    if prompt_file.startswith("bundled:"):
        name = prompt_file.split(":", 1)[1]
        for suffix in (".jsonl", ".txt"):
            if (BUNDLED_DIR / f"{name}{suffix}").is_file():
                return BUNDLED_DIR / f"{name}{suffix}"
        raise ConfigError(
            f"{field} '{prompt_file}': no bundled prompt set '{name}'; choose one of "
            + ", ".join(f"bundled:{n}" for n in bundled_sets())
        )
    path = Path(prompt_file)
    if not path.is_file():
        raise ConfigError(
            f"{field} '{prompt_file}' does not exist; give a .txt/.jsonl file or one of: "
            + ", ".join([*BUILTIN_SOURCES, *(f"bundled:{n}" for n in bundled_sets())])
        )
    return path


def _read_jsonl(path: Path, field: str) -> list[dict[str, Any]]:
    """GenEval metadata records, one JSON object with a "prompt" per non-empty line."""
    metas = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{field} '{path}' line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(m, dict) or not isinstance(m.get("prompt"), str):
            raise ConfigError(f"{field} '{path}' line {n} needs a 'prompt' string")
        for key in ("include", "exclude"):
            if key in m and not (
                isinstance(m[key], list)
                and all(isinstance(r, dict) and "class" in r and "count" in r for r in m[key])
            ):
                raise ConfigError(
                    f"{field} '{path}' line {n}: '{key}' must be a list of "
                    '{"class": ..., "count": ...} objects (GenEval metadata)'
                )
        metas.append(m)
    return metas


def load_prompt_items(
    prompt_file: str = "", prompts: list[str] | None = None, *, field: str = "rollout.prompt_file"
) -> tuple[list[str], list[dict[str, Any]]]:
    """Prompts and their metadata from a text file (one prompt per line), a GenEval-style JSONL
    file (one metadata object with a "prompt" per line), a built-in source (`shapes:train`,
    `shapes:heldout`, `shapes:all`), a bundled set (`bundled:geneval_small`, ...), or an
    inline list (metadata empty). Errors name the file and line."""
    if prompt_file in BUILTIN_SOURCES:
        from flowpo.tasks.shapes.world import all_prompts, splits

        split = prompt_file.split(":", 1)[1]
        metas = all_prompts() if split == "all" else splits()[split]
        return [m["prompt"] for m in metas], metas
    if prompt_file:
        path = _resolve_source(prompt_file, field)
        if path.suffix == ".jsonl":
            metas = _read_jsonl(path, field)
            if not metas:
                raise ConfigError(f"{field} '{prompt_file}' holds no prompts")
            return [m["prompt"] for m in metas], metas
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ConfigError(f"{field} '{prompt_file}' holds no prompts")
        return lines, [{} for _ in lines]
    if not prompts:
        raise ConfigError("rollout.prompts is empty; give prompts or rollout.prompt_file")
    return list(prompts), [{} for _ in prompts]


def tag_strata(
    metadata: list[dict[str, Any]], tag_weights: dict[str, float], *, source: str = ""
) -> list[tuple[float, list[int]]] | None:
    """Strata for `rollout.tag_weights`: (weight, prompt indices) per tag with weight > 0, so
    that a tag's share of the draws is its weight over the sum whatever its number of prompts
    (GenEval's overall is a mean over tags). None when tag_weights is empty."""
    if not tag_weights:
        return None
    by_tag: dict[str, list[int]] = {}
    for n, m in enumerate(metadata):
        tag = m.get("tag")
        if tag is None:
            raise ConfigError(
                f"rollout.tag_weights needs a 'tag' in every prompt's metadata; prompt {n + 1} of "
                f"{source or 'the prompts'} has none (use a GenEval-style .jsonl or shapes:train, "
                "or set rollout.tag_weights={})"
            )
        by_tag.setdefault(tag, []).append(n)
    missing = sorted(t for t, w in tag_weights.items() if w > 0 and t not in by_tag)
    if missing:
        raise ConfigError(
            f"rollout.tag_weights names {missing}, which no prompt of {source or 'the prompts'} "
            f"has (its tags: {sorted(by_tag)})"
        )
    strata = [(float(w), by_tag[t]) for t, w in tag_weights.items() if w > 0]
    if not strata:
        raise ConfigError(f"rollout.tag_weights ({tag_weights}) gives every tag weight 0")
    return strata


@dataclass
class PromptItem:
    prompt: str
    group_id: int  # global id of the (epoch, prompt draw) group
    metadata: dict[str, Any]


class KRepeatSampler:
    """Per epoch: draw P = images/G prompts (without replacement while the pool allows), repeat
    each G times, shuffle, and give rank r the r-th contiguous slice of the shuffled list.

    Groups may span ranks; group ids are global so statistics can be gathered across ranks.
    """

    def __init__(
        self,
        prompts: list[str],
        *,
        group_size: int,
        images_per_rank: int,
        world_size: int,
        rank: int,
        seed: int,
        metadata: list[dict[str, Any]] | None = None,
        strata: list[tuple[float, list[int]]] | None = None,
    ):
        total = images_per_rank * world_size
        if total % group_size:
            raise ConfigError(
                f"rollout.group_size ({group_size}) must divide the images per epoch ({total})"
            )
        self.prompts = prompts
        self.metadata = metadata or [{} for _ in prompts]
        self.group_size = group_size
        self.images_per_rank = images_per_rank
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.prompts_per_epoch = total // group_size
        self.strata = strata
        self._tag_weights = (
            None if strata is None else torch.tensor([w for w, _ in strata], dtype=torch.float64)
        )

    def epoch_items(self, epoch: int, contiguous_groups: bool = False) -> list[PromptItem]:
        """This rank's `images_per_rank` items for `epoch` (deterministic in seed and epoch).

        contiguous_groups: deal whole groups, their G items adjacent (rollout plans whose
        trajectories of one prompt share a prefix or an anchor need the group in one batch);
        needs G to divide images_per_rank.
        """
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.prompts)
        if self.strata is not None:
            # each draw picks a tag by weight, then a prompt of that tag (without replacement
            # while the tag has unused prompts)
            tags = torch.multinomial(
                self._tag_weights, self.prompts_per_epoch, replacement=True, generator=g
            )
            idx = torch.empty(self.prompts_per_epoch, dtype=torch.long)
            for t, (_, members) in enumerate(self.strata):
                slots = (tags == t).nonzero().flatten()
                k, m = slots.numel(), len(members)
                if not k:
                    continue
                pick = (
                    torch.randperm(m, generator=g)[:k]
                    if k <= m
                    else torch.randint(0, m, (k,), generator=g)
                )
                idx[slots] = torch.tensor(members)[pick]
        elif self.prompts_per_epoch <= n:
            idx = torch.randperm(n, generator=g)[: self.prompts_per_epoch]
        else:
            idx = torch.randint(0, n, (self.prompts_per_epoch,), generator=g)
        if contiguous_groups:
            if self.images_per_rank % self.group_size:
                raise ConfigError(
                    f"rollout.group_size ({self.group_size}) must divide the images per rank "
                    f"({self.images_per_rank}) when groups are dealt whole"
                )
            order = torch.randperm(self.prompts_per_epoch, generator=g)
            groups = order.repeat_interleave(self.group_size)
        else:
            groups = torch.arange(self.prompts_per_epoch).repeat_interleave(self.group_size)
            order = torch.randperm(groups.numel(), generator=g)
            groups = groups[order]
        lo = self.rank * self.images_per_rank
        items = []
        for gid in groups[lo : lo + self.images_per_rank].tolist():
            p = int(idx[gid])
            items.append(
                PromptItem(
                    prompt=self.prompts[p],
                    group_id=epoch * self.prompts_per_epoch + gid,
                    metadata=self.metadata[p],
                )
            )
        return items
