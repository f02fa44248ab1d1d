"""Probes of what a shapes-world model does with the words GenEval's hard tags depend on.

GenEval's position check passes by chance for a model that ignores "left of": from the same
noise it then draws the same layout for "a circle left of a square" and "... right of ...".
The probes sample every position and color_attr prompt of the world with the same seeds (a
`sample(prompts, seeds)` callable, prompt-major; `ode_sampler(pipe)` is `flowpo eval`'s ODE
sampler) and measure, over the samples in which both named shapes are found:

- relations: `alignment`, the mean cosine between the placed shape's offset from the reference
  shape and the asked direction (`geneval_rules.relation_alignment`): about 0 for a model blind
  to the relation (the four relations of a pair then score one layout against opposite
  directions), 1 for one that places exactly; `layout_shift_cells`, the mean distance in cells
  between the placed shape's centre under a relation and under its opposite for the same seed
  (0 when the word changes nothing);
- binding ("a C1 S1 and a C2 S2" and its swap "a C2 S1 and a C1 S2" are both prompts of the
  world): `bound`, the fraction of samples in which S1 has C1 and S2 has C2, `swapped` the
  fraction in which S1 has C2 and S2 has C1; a model blind to the binding has bound = swapped.

`text_sensitivity` asks the transformer directly: the relative change of its velocity when one
word of the prompt changes (the relation, the binding, a shape word, a colour word), at the same
noisy input. Used by benchmarks/probe_conditioning.py; docs/results.md reports the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flowpo.rewards.geneval_rules import OPPOSITE, box_centre, relation_alignment
from flowpo.tasks.shapes.detect import detect, score
from flowpo.tasks.shapes.world import CELL, SIZE, all_prompts, render, splits

Sampler = Callable[[list[str], list[int]], Any]  # prompt-major images, one per (prompt, seed)


def ode_sampler(pipe, guidance: float = 1.0, steps: int = 10) -> Sampler:
    from flowpo.tasks.shapes.pretrain import ode_samples

    return lambda prompts, seeds: ode_samples(pipe, prompts, seeds, steps, guidance)


def render_sampler() -> Sampler:
    """The world's renderer as a model that follows every word: the probes' reference values."""
    metas = {m["prompt"]: m for m in all_prompts()}
    return lambda prompts, seeds: [render(metas[p], s) for p in prompts for s in seeds]


def position_parts(meta: dict) -> tuple[str, str, str]:
    """(placed class, reference class, relation) of a GenEval position prompt, whose metadata
    lists the reference object first and the placed one, with its relation, second."""
    ref, placed = meta["include"]
    return placed["class"], ref["class"], placed["position"][0]


def relation_probe(sample: Sampler, seeds: list[int], split: str | None = None) -> dict[str, float]:
    """The relation probe over the world's position prompts, or over those of one split
    ("train" or "heldout": does a placement learned on the training prompts carry to new
    combinations?). The layout shift pairs a prompt with its flipped twin only within the set."""
    pool = all_prompts() if split is None else splits()[split]
    metas = {m["prompt"]: m for m in pool if m["tag"] == "position"}
    prompts = sorted(metas)
    imgs = sample(prompts, seeds)
    per: dict[str, list] = {}  # prompt -> per seed (placed centre | None, alignment | None, ok)
    for i, p in enumerate(prompts):
        a_cls, b_cls, rel = position_parts(metas[p])
        rows = []
        for im in imgs[i * len(seeds) : (i + 1) * len(seeds)]:
            dets = detect(im)
            ok = score(dets, metas[p])[0]
            a = [d for d in dets if d.shape == a_cls]
            b = [d for d in dets if d.shape == b_cls]
            if a and b:
                rows.append((box_centre(a[0].box), relation_alignment(a[0].box, b[0].box, rel), ok))
            else:
                rows.append((None, None, ok))
        per[p] = rows
    align = [al for rows in per.values() for _, al, _ in rows if al is not None]
    shifts = []
    for p, rows in per.items():
        rel = position_parts(metas[p])[2]
        q = p.replace(f" {rel} ", f" {OPPOSITE[rel]} ")
        for (ca, _, _), (cb, _, _) in zip(rows, per.get(q, [])):
            if ca is not None and cb is not None:
                shifts.append(float(np.linalg.norm(ca - cb)) / CELL)
    n = len(prompts) * len(seeds)
    return {
        "prompts": len(prompts),
        "samples": n,
        "both_found": len(align) / n,
        "accuracy": float(np.mean([ok for rows in per.values() for *_, ok in rows])),
        "alignment": float(np.mean(align)) if align else float("nan"),
        "layout_shift_cells": float(np.mean(shifts)) if shifts else float("nan"),
    }


def binding_probe(sample: Sampler, seeds: list[int]) -> dict[str, float]:
    metas = [m for m in all_prompts() if m["tag"] == "color_attr"]
    imgs = sample([m["prompt"] for m in metas], seeds)
    bound = swapped = both = 0
    oks = []
    for i, m in enumerate(metas):
        (s1, c1), (s2, c2) = [(c["class"], c["color"]) for c in m["include"]]
        for im in imgs[i * len(seeds) : (i + 1) * len(seeds)]:
            dets = detect(im)
            oks.append(score(dets, m)[0])
            col1 = {d.color for d in dets if d.shape == s1} & {c1, c2}
            col2 = {d.color for d in dets if d.shape == s2} & {c1, c2}
            if not col1 or not col2:
                continue
            both += 1
            bound += c1 in col1 and c2 in col2
            swapped += c2 in col1 and c1 in col2
    return {
        "prompts": len(metas),
        "samples": len(oks),
        "both_found": both / len(oks),
        "accuracy": float(np.mean(oks)),
        "bound": bound / max(both, 1),
        "swapped": swapped / max(both, 1),
    }


# one prompt pair per kind of change (the same words otherwise)
SENSITIVITY_PAIRS = {
    "relation word": [
        ("a photo of a circle left of a square", "a photo of a circle right of a square"),
        ("a photo of a circle above a triangle", "a photo of a circle below a triangle"),
    ],
    "colour binding": [
        ("a photo of a red circle and a blue square", "a photo of a blue circle and a red square"),
        (
            "a photo of a green circle and a yellow triangle",
            "a photo of a yellow circle and a green triangle",
        ),
    ],
    "shape word": [
        ("a photo of a circle left of a square", "a photo of a circle left of a triangle"),
        ("a photo of a circle above a triangle", "a photo of a square above a triangle"),
    ],
    "colour word": [
        ("a photo of a red circle and a blue square", "a photo of a red circle and a green square"),
        (
            "a photo of a green circle and a yellow triangle",
            "a photo of a blue circle and a yellow triangle",
        ),
    ],
}


@torch.no_grad()
def text_sensitivity(
    pipe, sigmas: tuple[float, ...] = (1.0, 0.9, 0.7, 0.5), n: int = 8
) -> dict[str, float]:
    """Mean relative change |v(b) - v(a)| / |v(a)| of the transformer's velocity at the same
    noisy inputs (n fixed noises, each sigma) when prompt a becomes prompt b, per kind of
    change in SENSITIVITY_PAIRS."""
    from flowpo.tasks.shapes.pretrain import encode_prompts

    x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    out = {}
    for kind, pairs in SENSITIVITY_PAIRS.items():
        vals = []
        for a, b in pairs:
            pe, pooled = encode_prompts(pipe, [a] * n + [b] * n)
            for s in sigmas:
                t = torch.full((n,), s * 1000.0)
                v = [
                    pipe.transformer(
                        hidden_states=x,
                        encoder_hidden_states=pe[k * n : (k + 1) * n],
                        pooled_projections=pooled[k * n : (k + 1) * n],
                        timestep=t,
                    ).sample
                    for k in (0, 1)
                ]
                vals.append(float((v[1] - v[0]).norm() / v[0].norm()))
        out[kind] = float(np.mean(vals))
    return out
