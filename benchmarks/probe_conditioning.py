"""Does a shapes-world model's layout follow the relation word, and its colours the binding?

    python benchmarks/probe_conditioning.py [--model DIR] [--lora DIR] [--name base] \
        [--seeds 16] [--cfg 1 3]

Samples every position and color_attr prompt of the world with the same seeds (the ODE sampler
of `flowpo eval`) and reports the probes of `flowpo.tasks.shapes.probe`: for relations the
mean alignment of the placed shape with the asked direction (0 = blind, 1 = exact) and how far
the placed shape moves when the relation flips (0 cells = the word changes nothing); for colour
binding the fractions of bound and swapped colourings (equal = blind); and the transformer's
relative velocity change when one word changes (relation, binding, shape, colour). Training and
held-out prompts alike: the probe asks what the model does with the words.

`--renderer` probes the world's renderer instead (every word followed: the reference values).
A trained LoRA checkpoint is probed on its base with `--lora DIR`, DIR written by `flowpo export
RUN/checkpoints/checkpoint-N DIR --ema` (the EMA weights its own evaluations use).
Appends rows to benchmarks/results/conditioning_probe.csv (one per model, CFG and probe).
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "benchmarks" / "results" / "conditioning_probe.csv"
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
    "relation word",
    "colour binding",
    "shape word",
    "colour word",
    "seeds",
    "seconds",
    "when",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "flowpo" / "tasks" / "shapes" / "base_model"))
    ap.add_argument("--lora", default=None, help="LoRA weights written by `flowpo export`")
    ap.add_argument("--name", default="base")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--csv", default=str(CSV))
    ap.add_argument("--renderer", action="store_true", help="probe the ground-truth renderer")
    args = ap.parse_args(argv)

    import torch
    from diffusers import StableDiffusion3Pipeline

    from flowpo.tasks.shapes.probe import (
        binding_probe,
        ode_sampler,
        relation_probe,
        render_sampler,
        text_sensitivity,
    )

    torch.manual_seed(0)
    pipe = None
    if args.renderer:
        args.name, args.cfg = "renderer (ground truth)", [None]
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(args.model, vae=None, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if args.lora:
            pipe.load_lora_weights(args.lora)
            pipe.fuse_lora()
    seeds = list(range(args.seeds))
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    stamp = time.strftime("%Y-%m-%d %H:%M")
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()

        def emit(row: dict) -> None:
            row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            row = {k: ("" if v is None else v) for k, v in row.items()}
            w.writerow(row)
            f.flush()
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

        if pipe is not None:
            t0 = time.time()
            sens = text_sensitivity(pipe)
            emit(
                {"name": args.name, "probe": "velocity change", **sens}
                | {"seconds": time.time() - t0, "when": stamp}
            )
        for cfg in args.cfg:
            sampler = render_sampler() if pipe is None else ode_sampler(pipe, guidance=cfg)
            held = functools.partial(relation_probe, split="heldout")
            for probe, fn in (
                ("relation", relation_probe),
                ("relation, held-out prompts", held),
                ("binding", binding_probe),
            ):
                t0 = time.time()
                row = fn(sampler, seeds)
                emit(
                    {"name": args.name, "cfg": cfg, "probe": probe, **row}
                    | {"seeds": len(seeds), "seconds": time.time() - t0, "when": stamp}
                )


if __name__ == "__main__":
    sys.exit(main())
