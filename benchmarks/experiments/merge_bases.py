"""Experiment: interpolate the weights of two shapes-world bases that share an ancestor.

    python benchmarks/experiments/merge_bases.py BASE_A BASE_B ALPHA OUT [--only transformer]

Writes OUT, a copy of BASE_A in which every floating-point tensor of every component (the
transformer and the three text encoders, or only those named by --only) is
`(1 - ALPHA) * A + ALPHA * B`. ALPHA 0 is A, 1 is B; values outside [0, 1] extrapolate along
B - A (task arithmetic, cf. Ilharco et al. 2023, "Editing Models with Task Arithmetic",
arXiv 2212.04089; weight averaging of fine-tuned models, Wortsman et al. 2022, "Model soups",
arXiv 2203.05482). The question it answers here: the committed base draws but ignores the
relation word, and a second stage with the caption contrast places by it but draws worse
(docs/results.md, "Why the flow-matching loss does not teach word order"); does a point between
them keep both? Both bases must have the same architecture (B is usually `pretrain-shapes
--init-from A`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def merge_state(a: dict, b: dict, alpha: float) -> dict:
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))[:5]
        raise SystemExit(f"the two bases differ in their tensors (e.g. {missing}): not mergeable")
    out = {}
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape:
            raise SystemExit(f"tensor {k}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        if ta.is_floating_point():
            out[k] = ((1.0 - alpha) * ta.double() + alpha * tb.double()).to(ta.dtype).contiguous()
        else:
            out[k] = ta.clone()
    return out


def copy_base(src: Path, out: Path) -> None:
    """A copy of the model directory `src` at `out` (a new path), without pretraining state,
    snapshots, pictures or logs: the weights and configs a pipeline loads."""
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new OUT")
    ignore = shutil.ignore_patterns("pretrain_state.pt", "snapshots", "*.png", "*.log")
    shutil.copytree(src, out, ignore=ignore)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base_a", type=Path)
    ap.add_argument("base_b", type=Path)
    ap.add_argument("alpha", type=float)
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", nargs="+", choices=COMPONENTS, default=list(COMPONENTS))
    args = ap.parse_args()
    copy_base(args.base_a, args.out)
    for comp in args.only:
        files = sorted((args.base_a / comp).glob("*.safetensors"))
        if not files:
            raise SystemExit(f"{args.base_a / comp}: no safetensors weights")
        for fa in files:
            fb = args.base_b / comp / fa.name
            merged = merge_state(load_file(fa), load_file(fb), args.alpha)
            save_file(merged, args.out / comp / fa.name, metadata={"format": "pt"})
    print(f"wrote {args.out}: alpha {args.alpha} of {args.base_b} into {args.base_a} ({args.only})")


if __name__ == "__main__":
    main()
