"""Experiment: continue the committed base with the pretraining loss (half of every batch from
the position and color_attr tags), optionally plus an auxiliary text loss that makes each shape
token of the conditioning sequence (CLIP and T5 positions) predict its own colour (color_attr
captions) and its relation to the other shape (position captions) through linear heads; probes
every 300 steps (8 seeds). docs/results.md, "Why position and color_attr do not move".

    OMP_NUM_THREADS=1 python benchmarks/experiments/continue_pretraining.py STEPS LR AUX_WEIGHT [clean]
        [--sigma LO HI [--band-frac F]] [--focus-frac F] [--probe-every N] [--seeds N]

`--sigma LO HI` draws the noise level of a fraction F of every batch (default all of it) uniformly
from [LO, HI] instead of the pretraining's distribution; `--focus-frac` is the fraction of every
batch drawn from the position and color_attr tags (default 0.5).

Measured: `900 3e-4 1.0` (the auxiliary loss, the pretraining's caption noise) and `900 3e-4 0
clean` (the control: no auxiliary loss, clean position and color_attr captions).

The weights are not saved: the point is the probe's trajectory."""

import argparse
import json
import random
import time

import torch

from flowpo.models.resolve import SHAPES_BASE
from flowpo.sde import shift_sigmas
from flowpo.tasks.shapes.pretrain import (
    CAPTION_NOISE,
    RELATIONS,
    _images,
    aux_text_loss,
    aux_text_targets,
    caption_contrast_loss,
    counterfactual_prompt,
    encode_prompts,
    flow_matching_sq_error,
    load_base,
    trained_modules,
)
from flowpo.tasks.shapes.probe import binding_probe, ode_sampler, relation_probe, text_sensitivity
from flowpo.tasks.shapes.world import COLORS, TAGS, splits

ap = argparse.ArgumentParser()
ap.add_argument("steps", type=int)
ap.add_argument("lr", type=float)
ap.add_argument("aux_w", type=float)
ap.add_argument("clean", nargs="?", choices=["clean"])
ap.add_argument("--sigma", type=float, nargs=2, default=None)
ap.add_argument("--band-frac", type=float, default=1.0)
ap.add_argument("--focus-frac", type=float, default=0.5)
ap.add_argument("--probe-every", type=int, default=300)
ap.add_argument("--seeds", type=int, default=8)
ap.add_argument("--contrast", type=float, default=0.0)
ap.add_argument("--beta", type=float, default=100.0)
args = ap.parse_args()
steps, lr, aux_w, clean = args.steps, args.lr, args.aux_w, args.clean == "clean"
bs = 64
torch.manual_seed(0)
rng = random.Random(0)
pipe = load_base(SHAPES_BASE)
mods = trained_modules(pipe)
params = [p for m in mods for p in m.parameters()]
heads = {}
if aux_w > 0:  # created only then: the control keeps the same random streams without them
    heads = {
        "color": torch.nn.Linear(64, len(COLORS)),
        "relation": torch.nn.Linear(64, len(RELATIONS)),
    }
for m in mods:
    m.train().requires_grad_(True)
opt = torch.optim.AdamW(
    params + [p for h in heads.values() for p in h.parameters()],
    lr=lr,
    weight_decay=0.01,
    betas=(0.9, 0.99),
)
sp = splits()
by_tag = {t: [m for m in sp["train"] if m["tag"] == t] for t in TAGS}
train_prompts = {m["prompt"] for m in sp["train"]}  # counterfactuals never name a held-out one
noise = {"counting": CAPTION_NOISE["counting"]} if clean else dict(CAPTION_NOISE)


def probe(step):
    for m in mods:
        m.eval()
    s = text_sensitivity(pipe)
    r = relation_probe(ode_sampler(pipe), list(range(args.seeds)))
    b = binding_probe(ode_sampler(pipe), list(range(args.seeds)))
    print("PROBE", step, json.dumps(s), json.dumps(r), json.dumps(b), flush=True)
    for m in mods:
        m.train()


t0 = time.time()
el = ea = ec = None
for step in range(1, steps + 1):
    metas = [
        rng.choice(
            by_tag[
                rng.choice(("position", "color_attr") if rng.random() < args.focus_frac else TAGS)
            ]
        )
        for _ in range(bs)
    ]
    x0 = _images(metas, rng, noise)
    prompts = ["" if rng.random() < 0.1 else m["prompt"] for m in metas]
    pe, pooled = encode_prompts(pipe, prompts)
    u = torch.rand(bs)
    ln = torch.sigmoid(torch.randn(bs))
    sigma = shift_sigmas(torch.where(u < 0.5, torch.rand(bs), ln), 1.0)
    if args.sigma:
        lo, hi = args.sigma
        band = lo + (hi - lo) * torch.rand(bs)
        sigma = torch.where(torch.rand(bs) < args.band_frac, band, sigma)
    eps = torch.randn_like(x0)
    err = flow_matching_sq_error(pipe.transformer, x0, eps, sigma, pe, pooled)
    loss = torch.mean(err)
    con = torch.zeros(())
    if args.contrast > 0:
        rows, counter = [], []
        for i, (m, p) in enumerate(zip(metas, prompts)):
            q = counterfactual_prompt(m, rng, train_prompts) if p else None
            if q is not None:
                rows.append(i)
                counter.append(q)
        if rows:
            idx = torch.tensor(rows)
            pe2, pooled2 = encode_prompts(pipe, counter)
            err2 = flow_matching_sq_error(
                pipe.transformer, x0[idx], eps[idx], sigma[idx], pe2, pooled2
            )
            con = caption_contrast_loss(
                err[idx].mean(dim=(1, 2, 3)), err2.mean(dim=(1, 2, 3)), args.beta
            )
    aux = (
        aux_text_loss(heads, pe, aux_text_targets(pipe, metas, prompts))
        if heads
        else torch.zeros(())
    )
    total = loss + aux_w * aux + args.contrast * con
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    el = loss.item() if el is None else 0.98 * el + 0.02 * loss.item()
    ea = aux.item() if ea is None else 0.98 * ea + 0.02 * aux.item()
    ec = con.item() if ec is None else 0.98 * ec + 0.02 * con.item()
    if step % 50 == 0:
        print(
            f"step {step} fm {el:.4f} aux {ea:.3f} contrast {ec:.3f} {time.time() - t0:.0f}s",
            flush=True,
        )
    if step % args.probe_every == 0 or step == steps:
        probe(step)
