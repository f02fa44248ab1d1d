"""Experiment: can the committed base learn to tell two prompts that differ only in word order
apart, when it is trained on nothing else? Continues the base with the pretraining loss (clean
captions, the pretraining's noise-level distribution) on a fixed prompt pair and samples each
prompt with 32 seeds every N steps. docs/results.md, "Why position and color_attr do not move".

    OMP_NUM_THREADS=1 python benchmarks/experiments/overfit_pair.py PAIRS STEPS LR [--every N]

PAIRS is `position`: "a photo of a circle above a square" and "... below ..."; `position4`: that
pair and three more, each prompt's partner its counterfactual; `position16`: 16 such pairs of
training prompts; or `binding`: "a photo of a red circle and a blue square" and its colour swap.
Prints, per prompt, GenEval's strict accuracy, and the mean relation alignment (position) or the
bound / swapped fractions (binding) over the samples in which both shapes are found. The weights are not saved."""

import argparse
import random
import time

import numpy as np
import torch

from flowpo.models.resolve import SHAPES_BASE
from flowpo.rewards.geneval_rules import OPPOSITE, relation_alignment
from flowpo.sde import shift_sigmas
from flowpo.tasks.shapes.detect import detect, score
from flowpo.tasks.shapes.pretrain import (
    _images,
    caption_contrast_loss,
    encode_prompts,
    flow_matching_sq_error,
    load_base,
    ode_samples,
    trained_modules,
)
from flowpo.tasks.shapes.world import all_prompts, splits

PAIRS = {
    "position": ["a photo of a circle above a square", "a photo of a circle below a square"],
    # four pairs at once (each prompt's counterfactual is its pair partner): does placing by the
    # relation scale past one pair?
    "position4": [
        "a photo of a circle above a square",
        "a photo of a circle below a square",
        "a photo of a triangle left of a diamond",
        "a photo of a triangle right of a diamond",
        "a photo of a ring above a triangle",
        "a photo of a ring below a triangle",
        "a photo of a square left of a circle",
        "a photo of a square right of a circle",
    ],
    "binding": [
        "a photo of a red circle and a blue square",
        "a photo of a blue circle and a red square",
    ],
}

ap = argparse.ArgumentParser()
ap.add_argument("pair", choices=sorted(PAIRS) + ["position16"])
ap.add_argument("steps", type=int)
ap.add_argument("lr", type=float)
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--contrast", type=float, default=0.0)
ap.add_argument("--beta", type=float, default=1000.0)
args = ap.parse_args()


def training_pairs(n: int) -> list[str]:
    """The first n training position prompts whose relation-flipped twin is also a training
    prompt, each followed by that twin."""
    train = [m for m in splits()["train"] if m["tag"] == "position"]
    names = {m["prompt"] for m in train}
    out: list[str] = []
    for m in train:
        rel = m["include"][1]["position"][0]
        twin = m["prompt"].replace(f" {rel} ", f" {OPPOSITE[rel]} ")
        if twin in names and m["prompt"] not in out:
            out += [m["prompt"], twin]
    return out[: 2 * n]


metas = {m["prompt"]: m for m in all_prompts()}
chosen = training_pairs(16) if args.pair == "position16" else PAIRS[args.pair]
pair = [metas[p] for p in chosen]
torch.manual_seed(0)
rng = random.Random(0)
pipe = load_base(SHAPES_BASE)
mods = trained_modules(pipe)
params = [p for m in mods for p in m.parameters()]
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))


def report(step: int) -> None:
    for m in mods:
        m.eval()
    imgs = ode_samples(pipe, [m["prompt"] for m in pair], list(range(32)))
    position = args.pair.startswith("position")
    parts = []
    for i, m in enumerate(pair):
        oks, stat = [], []
        for im in imgs[i * 32 : (i + 1) * 32]:
            dets = detect(im)
            oks.append(score(dets, m)[0])
            if position:
                ref, placed = m["include"]
                a = [d for d in dets if d.shape == placed["class"]]
                b = [d for d in dets if d.shape == ref["class"]]
                if a and b:
                    stat.append(relation_alignment(a[0].box, b[0].box, placed["position"][0]))
            else:
                (s1, c1), (s2, c2) = [(c["class"], c["color"]) for c in m["include"]]
                col1 = {d.color for d in dets if d.shape == s1}
                col2 = {d.color for d in dets if d.shape == s2}
                if col1 & {c1, c2} and col2 & {c1, c2}:
                    stat.append((c1 in col1 and c2 in col2) - (c2 in col1 and c1 in col2))
        what = "alignment" if position else "bound-swapped"
        parts.append(
            f"[{m['prompt'][12:]}] acc {np.mean(oks):.3f} {what} "
            f"{np.mean(stat) if stat else float('nan'):.3f} (n {len(stat)})"
        )
    print("REPORT", step, " | ".join(parts), flush=True)
    for m in mods:
        m.train()


report(0)
t0 = time.time()
for step in range(1, args.steps + 1):
    batch = [pair[rng.randrange(len(pair))] for _ in range(args.batch)]
    x0 = _images(batch, rng)
    pe, pooled = encode_prompts(pipe, [m["prompt"] for m in batch])
    u = torch.rand(args.batch)
    ln = torch.sigmoid(torch.randn(args.batch))
    sigma = shift_sigmas(torch.where(u < 0.5, torch.rand(args.batch), ln), 1.0)
    eps = torch.randn_like(x0)
    err = flow_matching_sq_error(pipe.transformer, x0, eps, sigma, pe, pooled)
    loss = torch.mean(err)
    total = loss
    if args.contrast > 0:  # the other prompt of the pair must fit this scene worse
        other = [pair[pair.index(m) ^ 1]["prompt"] for m in batch]
        pe2, pooled2 = encode_prompts(pipe, other)
        err2 = flow_matching_sq_error(pipe.transformer, x0, eps, sigma, pe2, pooled2)
        total = loss + args.contrast * caption_contrast_loss(
            err.mean(dim=(1, 2, 3)), err2.mean(dim=(1, 2, 3)), args.beta
        )
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % 25 == 0:
        print(
            f"step {step} loss {loss.item():.4f} total {total.item():.4f} {time.time() - t0:.0f}s",
            flush=True,
        )
    if step % args.every == 0:
        report(step)
