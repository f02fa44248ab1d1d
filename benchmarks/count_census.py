"""What a model draws for counting prompts: for each prompt of one or more `flowpo eval
--save-images` folders, the histogram of how many objects of the asked shape the detector finds
(and how many other objects: other shapes, unrecognised blobs), so a flat counting accuracy can
be told apart as too few, too many, or the wrong shapes.

    flowpo eval --save-images --eval.prompt_file=COUNTING.jsonl --eval.seeds=0,...,31 --out A
    flowpo eval --save-images ... --checkpoint RUN/checkpoints/checkpoint-N --ema --out B
    python benchmarks/count_census.py A B [--csv benchmarks/results/count_census.csv]

Prints one block per prompt: for each folder, the share of samples with 0, 1, ..., 4, 5 or more
objects of the asked shape, the strict pass rate (exactly the asked number; GenEval's counting rule), the
mean number of other shapes and of unrecognised components per image, and (`kept`) the share of
seeds whose count equals the one the first folder drew from the same seed: when it is high,
the count is set by the initial noise and the model change moved few seeds.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from flowpo.tasks.shapes.detect import analyse


def census(folder: Path) -> dict[str, dict]:
    """prompt -> {asked, counts: Counter of the asked shape's count, others, unrecognised, n}."""
    out: dict[str, dict] = {}
    for sub in sorted(p for p in folder.iterdir() if (p / "metadata.jsonl").is_file()):
        meta = json.loads((sub / "metadata.jsonl").read_text().splitlines()[0])
        if meta.get("tag") != "counting":
            continue
        want = meta["include"][0]
        row = out.setdefault(
            meta["prompt"],
            {
                "asked": want["count"],
                "counts": Counter(),
                "seq": [],
                "others": 0,
                "unrec": 0,
                "n": 0,
            },
        )
        for png in sorted((sub / "samples").glob("*.png")):
            found, stats = analyse(np.asarray(Image.open(png).convert("RGB")))
            same = sum(d.shape == want["class"] for d in found)
            row["counts"][same] += 1
            row["seq"].append(same)  # per seed, in seed order
            row["others"] += len(found) - same
            row["unrec"] += stats["components"] - stats["recognised"]
            row["n"] += 1
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="flowpo eval --save-images outputs")
    p.add_argument("--csv", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    tables = [census(f) for f in args.folders]
    rows = []
    prompts = list(dict.fromkeys(p for t in tables for p in t))  # in first-seen order
    for prompt in prompts:
        asked = next(t[prompt]["asked"] for t in tables if prompt in t)
        print(f"\n{prompt} (asks {asked})")
        print(
            f"{'folder':<40} "
            + " ".join(f"{k:>5}" for k in range(6))
            + "+ strict  other  blobs  kept"
        )
        for folder, t in zip(args.folders, tables):
            r = t.get(prompt)
            if not r:
                continue
            share = [r["counts"].get(k, 0) / r["n"] for k in range(5)]
            share.append(sum(v for k, v in r["counts"].items() if k >= 5) / r["n"])  # 5 or more
            strict = r["counts"].get(asked, 0) / r["n"]
            other, unrec = r["others"] / r["n"], r["unrec"] / r["n"]
            first = next(t[prompt] for t in tables if prompt in t)
            kept = float("nan")
            if first is not r and len(first["seq"]) == len(r["seq"]):
                kept = sum(a == b for a, b in zip(first["seq"], r["seq"])) / r["n"]
            cells = " ".join(f"{s:5.2f}" for s in share)
            line = f"{folder.name[-40:]:<40} {cells}  {strict:6.2f}  {other:5.2f}  {unrec:5.2f}"
            print(line + ("" if kept != kept else f"  {kept:4.2f}"))
            rows.append([str(folder), prompt, asked, r["n"], *share, strict, other, unrec, kept])
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        head = "folder,prompt,asked,n," + ",".join(f"share_{k}" for k in range(5)) + ",share_5plus"
        lines = [head + ",strict,other_shapes,unrecognised,same_count_as_first"]
        lines += [",".join(f'"{v}"' if isinstance(v, str) else f"{v:.4g}" for v in r) for r in rows]
        args.csv.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
