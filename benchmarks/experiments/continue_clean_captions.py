"""Experiment: continue the committed base with the pretraining loss on clean position and
color_attr captions (half of every batch from those two tags), probing relation and binding
every 300 steps (8 seeds). docs/results.md, "Why position and color_attr do not move".

    OMP_NUM_THREADS=1 python benchmarks/experiments/continue_clean_captions.py STEPS LR
    (measured: 900 3e-4)

The weights are not saved: the point is the probe's trajectory."""

import json
import random
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from flowpo.sde import shift_sigmas
from flowpo.tasks.shapes.pretrain import CAPTION_NOISE, _images, encode_prompts
from flowpo.tasks.shapes.probe import binding_probe, ode_sampler, relation_probe
from flowpo.tasks.shapes.world import TAGS, splits

steps, lr, bs = int(sys.argv[1]), float(sys.argv[2]), 64
torch.manual_seed(0)
rng = random.Random(0)
pipe = StableDiffusion3Pipeline.from_pretrained(
    str(Path(__file__).resolve().parents[2] / "flowpo" / "tasks" / "shapes" / "base_model"),
    vae=None,
    local_files_only=True,
)
pipe.set_progress_bar_config(disable=True)
mods = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
params = [p for m in mods for p in m.parameters()]
for m in mods:
    m.train().requires_grad_(True)
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
sp = splits()
by_tag = {t: [m for m in sp["train"] if m["tag"] == t] for t in TAGS}
noise = {"counting": CAPTION_NOISE["counting"]}
t0 = time.time()
el = None
for step in range(1, steps + 1):
    metas = [
        rng.choice(by_tag[rng.choice(("position", "color_attr") if rng.random() < 0.5 else TAGS)])
        for _ in range(bs)
    ]
    x0 = _images(metas, rng, noise)
    prompts = ["" if rng.random() < 0.1 else m["prompt"] for m in metas]
    pe, pooled = encode_prompts(pipe, prompts)
    u = torch.rand(bs)
    ln = torch.sigmoid(torch.randn(bs))
    sigma = shift_sigmas(torch.where(u < 0.5, torch.rand(bs), ln), 1.0)
    eps = torch.randn_like(x0)
    s = sigma.view(-1, 1, 1, 1)
    v = pipe.transformer(
        hidden_states=(1 - s) * x0 + s * eps,
        encoder_hidden_states=pe,
        pooled_projections=pooled,
        timestep=sigma * 1000,
    ).sample
    loss = torch.mean((v - (eps - x0)) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    el = loss.item() if el is None else 0.98 * el + 0.02 * loss.item()
    if step % 50 == 0:
        print(f"step {step} loss {el:.4f} {time.time() - t0:.0f}s", flush=True)
    if step % 300 == 0 or step == steps:
        for m in mods:
            m.eval()
        r = relation_probe(ode_sampler(pipe), list(range(8)))
        b = binding_probe(ode_sampler(pipe), list(range(8)))
        print("PROBE", step, json.dumps(r), json.dumps(b), flush=True)
        for m in mods:
            m.train()
