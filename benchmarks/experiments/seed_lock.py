"""Does RL fix the seeds its base got wrong, or only keep the ones it got right?

    python benchmarks/experiments/seed_lock.py BASE_OUT POLICY_OUT [POLICY_OUT ...]

Each OUT is a folder written by `benchmarks/phrasing_transfer.py run` (images of the same
prompts and seeds, saved by `flowpo eval --save-images` under OUT/heldout and OUT/train). For
every (prompt, seed) the images of the base and of each policy are scored with GenEval's strict
rule and checked for both asked shapes; the script prints, per policy, how often a seed passes
given that the base passed or failed it, and how many of the policy's images with a shape
missing come from seeds where the base also left one out. A policy that learns the words should
fix failing seeds whatever the base drew; one that mostly keeps each seed's layout (the initial
noise decides where the shapes go) fixes only some and leaves the rest where the base had them
(docs/results.md, "The binding base").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from flowpo.rewards.geneval_rules import score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phrasing_transfer import detections  # noqa: E402  (reads a `flowpo eval --save-images` folder)


def judge(out: Path) -> dict[tuple[str, str, int], tuple[bool, bool]]:
    """(phrasing, prompt, seed index) -> (strict pass, both asked shapes found)."""
    res = {}
    for phrasing in ("heldout", "train"):
        if not (out / phrasing).is_dir():
            continue
        for prompt, (meta, found) in detections(out / phrasing).items():
            asked = [m["class"] for m in meta["include"]]
            for i, dets in enumerate(found):
                shapes = {d.shape for d in dets}
                res[(phrasing, prompt, i)] = (
                    bool(score(dets, meta)[0]),
                    all(a in shapes for a in asked),
                )
    if not res:
        raise SystemExit(f"no saved images under {out}: run `phrasing_transfer.py run` first")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("policies", type=Path, nargs="+")
    args = ap.parse_args()
    base = judge(args.base)
    keys = sorted(base)
    b_ok = np.array([base[k][0] for k in keys])
    b_both = np.array([base[k][1] for k in keys])
    print(
        f"{len(keys)} (prompt, seed) images; base: strict {b_ok.mean():.3f}, both shapes {b_both.mean():.3f}"
    )
    for pol_dir in args.policies:
        pol = judge(pol_dir)
        if sorted(pol) != keys:
            raise SystemExit(f"{pol_dir} holds other prompts or seeds than {args.base}")
        ok = np.array([pol[k][0] for k in keys])
        both = np.array([pol[k][1] for k in keys])
        print(
            f"{pol_dir.name}: strict {ok.mean():.3f} (given the base passed {ok[b_ok].mean():.3f}, "
            f"failed {ok[~b_ok].mean():.3f}); both shapes {both.mean():.3f} (given the base had "
            f"both {both[b_both].mean():.3f}, missed one {both[~b_both].mean():.3f}); images "
            f"missing a shape: {(~both).sum()}, of them on seeds the base missed too: "
            f"{(~both & ~b_both).sum()}"
        )


if __name__ == "__main__":
    main()
