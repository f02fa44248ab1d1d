"""Does a shapes-world model's layout depend on the relation word, and its colours on the binding?

    python benchmarks/probe_conditioning.py [--model DIR] [--name base] [--seeds 32] [--cfg 1 3]

A model that ignores "left of" draws the same layout for "a circle left of a square" and "a
circle right of a square" from the same noise; GenEval's position check then passes by chance.
For every position prompt of the world (training and held-out: the probe asks what the model
does with the words, not how it generalises) and the same seeds, this samples the model (the
ODE sampler of `flowpo eval`) and reports, over the samples in which both named shapes are
found:

- `alignment`: the mean cosine between the first shape's offset from the second and the asked
  direction (`geneval_rules.relation_alignment`): 0 for a model blind to the relation, 1 for one
  that always places it exactly (a model that draws one fixed layout for every relation
  averages to about 0 over the four relations);
- `layout_shift`: the mean distance (in 8-px cells) between the first shape's centre under the
  asked relation and under its opposite for the same seed: 0 when the word changes nothing.

For every color_attr prompt "a C1 S1 and a C2 S2" (and its swap "a C2 S1 and a C1 S2", same
seeds): among samples with both shapes found in a prompt colour, `bound` is the fraction where
S1 has C1 and S2 has C2, `swapped` where S1 has C2 and S2 has C1. A model blind to the binding
has bound ~= swapped.

Writes benchmarks/results/conditioning_probe.csv (one row per model, CFG, probe; appended).
A trained LoRA checkpoint is probed on its base with `--lora DIR`, DIR written by `flowpo export
RUN/checkpoints/checkpoint-N DIR --ema` (the EMA weights its own evaluations use).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "benchmarks" / "results" / "conditioning_probe.csv"
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
FIELDS = [
    "name",
    "cfg",
    "probe",
    "prompts",
    "samples",
    "both_found",
    "accuracy",
    "alignment",
    "layout_shift_cells",
    "bound",
    "swapped",
    "seconds",
    "when",
]


def _centre(box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], np.float64)


def probe_relations(pipe, seeds: list[int], cfg: float) -> dict:
    from flowpo.rewards.geneval_rules import relation_alignment
    from flowpo.tasks.shapes.detect import detect, score
    from flowpo.tasks.shapes.pretrain import ode_samples
    from flowpo.tasks.shapes.world import CELL, all_prompts

    metas = {m["prompt"]: m for m in all_prompts() if m["tag"] == "position"}
    prompts = sorted(metas)
    imgs = ode_samples(pipe, prompts, seeds, guidance=cfg)
    per = {}  # prompt -> per seed (first shape's centre or None, alignment or None, strict)
    for i, p in enumerate(prompts):
        m = metas[p]
        # GenEval's layout: the reference object first, the placed one with its relation second
        b_cls, a_cls = m["include"][0]["class"], m["include"][1]["class"]
        rel = m["include"][1]["position"][0]
        rows = []
        for im in imgs[i * len(seeds) : (i + 1) * len(seeds)]:
            dets = detect(im)
            ok = score(dets, m)[0]
            a = [d for d in dets if d.shape == a_cls]
            b = [d for d in dets if d.shape == b_cls]
            if a and b:
                rows.append((_centre(a[0].box), relation_alignment(a[0].box, b[0].box, rel), ok))
            else:
                rows.append((None, None, ok))
        per[p] = rows
    align = [al for rows in per.values() for _, al, _ in rows if al is not None]
    shifts = []
    for p, rows in per.items():
        rel = metas[p]["include"][1]["position"][0]
        q = p.replace(f" {rel} ", f" {OPPOSITE[rel]} ")
        for (ca, _, _), (cb, _, _) in zip(rows, per.get(q, [])):
            if ca is not None and cb is not None:
                shifts.append(float(np.linalg.norm(ca - cb)) / CELL)
    n = len(prompts) * len(seeds)
    return {
        "probe": "relation",
        "prompts": len(prompts),
        "samples": n,
        "both_found": len(align) / n,
        "accuracy": float(np.mean([ok for rows in per.values() for *_, ok in rows])),
        "alignment": float(np.mean(align)) if align else float("nan"),
        "layout_shift_cells": float(np.mean(shifts)) if shifts else float("nan"),
    }


def probe_binding(pipe, seeds: list[int], cfg: float) -> dict:
    from flowpo.tasks.shapes.detect import detect, score
    from flowpo.tasks.shapes.pretrain import ode_samples
    from flowpo.tasks.shapes.world import all_prompts

    metas = [m for m in all_prompts() if m["tag"] == "color_attr"]
    imgs = ode_samples(pipe, [m["prompt"] for m in metas], seeds, guidance=cfg)
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
        "probe": "binding",
        "prompts": len(metas),
        "samples": len(oks),
        "both_found": both / len(oks),
        "accuracy": float(np.mean(oks)),
        "bound": bound / max(both, 1),
        "swapped": swapped / max(both, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "flowpo" / "tasks" / "shapes" / "base_model"))
    ap.add_argument("--lora", default=None, help="LoRA weights written by `flowpo export`")
    ap.add_argument("--name", default="base")
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--csv", default=str(CSV))
    args = ap.parse_args(argv)

    import torch
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, vae=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        pipe.load_lora_weights(args.lora)
        pipe.fuse_lora()
    seeds = list(range(args.seeds))
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()
        for cfg in args.cfg:
            for fn in (probe_relations, probe_binding):
                t0 = time.time()
                row = fn(pipe, seeds, cfg)
                row.update(
                    name=args.name,
                    cfg=cfg,
                    seconds=round(time.time() - t0, 1),
                    when=time.strftime("%Y-%m-%d %H:%M"),
                )
                row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                w.writerow(row)
                f.flush()
                print(", ".join(f"{k}={v}" for k, v in row.items() if k in FIELDS), flush=True)


if __name__ == "__main__":
    sys.exit(main())
