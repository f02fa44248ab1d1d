"""Experiment: fold an exported LoRA into a copy of its base, so a second RL run can start there.

    flowpo export RUN/checkpoints/checkpoint-N LORA_DIR --ema
    python benchmarks/experiments/fuse_lora.py BASE LORA_DIR OUT
    flowpo train ... --model.path=OUT

Writes OUT, a copy of BASE whose transformer weights are W + (alpha / r) * B @ A for every LoRA
pair in LORA_DIR/pytorch_lora_weights.safetensors (the scaling PEFT applies, read from the
file's adapter metadata). The question it answers: does a second algorithm, started where the
first one ended, go past the level where each one alone stops (docs/results.md, "The binding
base": every recipe ends held-out between 0.61 and 0.68)?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bases import copy_base  # noqa: E402  (the same copy of a model directory)


def fuse(weights: dict, lora: dict, scale: float) -> dict:
    """W + scale * B @ A for each `transformer.<module>.lora_A/B.weight` pair."""
    out = dict(weights)
    pairs = sorted(k[: -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight"))
    if not pairs:
        raise SystemExit("no lora_A weights in the LoRA file")
    for p in pairs:
        name = p.removeprefix("transformer.") + ".weight"
        if name not in out:
            raise SystemExit(f"LoRA module {p}: no {name} in the base transformer")
        a, b = lora[p + ".lora_A.weight"].double(), lora[p + ".lora_B.weight"].double()
        w = out[name]
        out[name] = (w.double() + scale * (b @ a)).to(w.dtype).contiguous()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("lora_dir", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    path = args.lora_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
    copy_base(args.base, args.out)
    files = sorted((args.base / "transformer").glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"{args.base}/transformer: expected one safetensors file, got {files}")
    fused = fuse(load_file(files[0]), load_file(path), scale)
    save_file(fused, args.out / "transformer" / files[0].name, metadata={"format": "pt"})
    print(f"wrote {args.out}: {path} (scale {scale:g}) folded into {args.base}")


if __name__ == "__main__":
    main()
