"""Does a model draw a scene as well from a caption it never trained on as from one it did?

Every held-out position prompt of the shapes world ("a circle right of a square") describes the
same scenes as a training prompt with the mirrored phrasing ("a square left of a circle"): the
same two shapes, the same relation between them. Both the base (whose pretraining captions come
from the training split only) and an RL policy (trained on training prompts) have seen the
second phrasing and never the first. The gap between the two, from the same seeds, measures
how much of what a model does is tied to the caption's wording rather than to its meaning: the
transfer that the held-out evaluation asks for.

    python benchmarks/phrasing_transfer.py run OUT_BASE [--seeds 32]
    python benchmarks/phrasing_transfer.py run OUT_RL -- -c configs/shapes_long.yaml \\
        --checkpoint RUN/checkpoints/checkpoint-39 --ema
    python benchmarks/phrasing_transfer.py table OUT_BASE OUT_RL [--csv FILE]

`run` writes OUT/heldout.jsonl and OUT/train.jsonl (the pairs, in the same order) and runs
`flowpo eval --save-images` on each into OUT/heldout and OUT/train (arguments after `--` go to
both evaluations). `table` scores the saved images with GenEval's strict rule and prints, per
pair and overall, the strict accuracy of each phrasing, how often the two phrasings of a
seed agree (both pass or both fail), and how often the held-out prompt's image instead passes
the rule of its swap: the training prompt with the same words and the opposite meaning ("a
square right of a circle"), the layout a model that reads the caption as a bag of words would
copy.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from flowpo.rewards.geneval_rules import OPPOSITE, score
from flowpo.tasks.shapes.detect import detect
from flowpo.tasks.shapes.world import article, splits

_POSITION = re.compile(r"a photo of an? (\w+) (left of|right of|above|below) an? (\w+)$")


def _training_prompt(train: dict, prompt: str, what: str, of: str) -> dict:
    if prompt not in train:
        raise SystemExit(f"{prompt!r} (the {what} of {of!r}) is not a training prompt")
    return train[prompt]


def mirrored_pairs() -> list[tuple[dict, dict]]:
    """(held-out position prompt, the training prompt with the mirrored phrasing) for every
    held-out position prompt; raises if a mirror is not in the training split."""
    return [(h, m) for h, m, _ in mirrored_triples()]


def mirrored_triples() -> list[tuple[dict, dict, dict]]:
    """(held-out position prompt, its mirror, its swap) for every held-out position prompt: the
    mirror names the shapes in the other order with the opposite relation (the same scenes),
    the swap names them in the other order with the same relation (the same words, the opposite
    scenes: what a model that reads the caption as a bag of words cannot tell apart)."""
    sp = splits()
    train = {m["prompt"]: m for m in sp["train"]}
    out = []
    for m in sp["heldout"]:
        if m["tag"] != "position":
            continue
        placed, rel, ref = _POSITION.match(m["prompt"]).groups()
        mirror = f"a photo of {article(ref)} {ref} {OPPOSITE[rel]} {article(placed)} {placed}"
        swap = f"a photo of {article(ref)} {ref} {rel} {article(placed)} {placed}"
        out.append(
            (
                m,
                _training_prompt(train, mirror, "mirror", m["prompt"]),
                _training_prompt(train, swap, "swap", m["prompt"]),
            )
        )
    return out


def run(out: Path, seeds: int, eval_args: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pairs = mirrored_pairs()
    seed_list = ",".join(str(s) for s in range(seeds))
    for side, k in (("heldout", 0), ("train", 1)):
        path = out / f"{side}.jsonl"
        path.write_text("".join(json.dumps(p[k]) + "\n" for p in pairs))
        cmd = [sys.executable, "-m", "flowpo", "eval", "--save-images", "--out", str(out / side)]
        cmd += [f"--eval.prompt_file={path}", f"--eval.seeds={seed_list}", *eval_args]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"flowpo eval failed for {side} (its error is above)")


def detections(folder: Path) -> dict[str, tuple[dict, list]]:
    """prompt -> (its metadata, the detections of each saved image in seed order) of a `flowpo
    eval --save-images` folder."""
    out = {}
    for sub in sorted(p for p in folder.iterdir() if (p / "metadata.jsonl").is_file()):
        meta = json.loads((sub / "metadata.jsonl").read_text().splitlines()[0])
        out[meta["prompt"]] = (
            meta,
            [
                detect(np.asarray(Image.open(png).convert("RGB")))
                for png in sorted((sub / "samples").glob("*.png"))
            ],
        )
    return out


def _passes(found: list, meta: dict) -> list[bool]:
    return [score(d, meta)[0] for d in found]


def table(folders: list[Path], csv: Path | None) -> None:
    swaps = {h["prompt"]: s for h, _, s in mirrored_triples()}
    rows = []
    for folder in folders:
        held, train = detections(folder / "heldout"), detections(folder / "train")
        order = [json.loads(line)["prompt"] for line in (folder / "heldout.jsonl").open()]
        mirrors = [json.loads(line)["prompt"] for line in (folder / "train.jsonl").open()]
        print(f"\n{folder}")
        print(f"{'held-out prompt':<42} {'held-out':>8} {'mirror':>8} {'agree':>6} {'as swap':>8}")
        all_h, all_t, agree, all_s = [], [], [], []
        for hp, tp in zip(order, mirrors):
            (meta, found), (tmeta, tfound) = held[hp], train[tp]
            h, t, s = _passes(found, meta), _passes(tfound, tmeta), _passes(found, swaps[hp])
            a = [x == y for x, y in zip(h, t)]
            all_h += h
            all_t += t
            agree += a
            all_s += s
            cells = f"{np.mean(h):8.3f} {np.mean(t):8.3f} {np.mean(a):6.2f} {np.mean(s):8.3f}"
            print(f"{hp[11:]:<42} {cells}")
            rows.append(
                [str(folder), hp, tp, len(h), np.mean(h), np.mean(t), np.mean(a), np.mean(s)]
            )
        n = len(all_h)
        mh, mt = float(np.mean(all_h)), float(np.mean(all_t))
        se = math.sqrt(mh * (1 - mh) / n + mt * (1 - mt) / n)
        cells = f"{mh:8.3f} {mt:8.3f} {np.mean(agree):6.2f} {np.mean(all_s):8.3f}"
        print(
            f"{'all (' + str(n) + ' samples each)':<42} {cells}   gap {mt - mh:+.3f} (SE {se:.3f})"
        )
        rows.append([str(folder), "all", "all", n, mh, mt, np.mean(agree), np.mean(all_s)])
    if csv:
        csv.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            "folder,heldout_prompt,mirror_prompt,samples,heldout_strict,mirror_strict,agree,"
            "heldout_as_swap"
        ]
        lines += [",".join(f'"{v}"' if isinstance(v, str) else f"{v:.4g}" for v in r) for r in rows]
        csv.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {csv}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="evaluate one model on both phrasings")
    r.add_argument("out", type=Path)
    r.add_argument("--seeds", type=int, default=32)
    t = sub.add_parser("table", help="score and compare saved evaluations")
    t.add_argument("folders", nargs="+", type=Path)
    t.add_argument("--csv", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.out, args.seeds, extra)
    else:
        table(args.folders, args.csv)


if __name__ == "__main__":
    main()
