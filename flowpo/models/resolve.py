"""From a config's model fields to what the loaders take: a model directory and a torch dtype.

`model.path` is a directory, or one of two built-in names:
- `shapes:base`: the committed shapes-world base model (flowpo/tasks/shapes/base_model/);
- `tiny:FAMILY`: a tiny random model of that family, built once under RUN_DIR/base_model.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES_BASE = Path(__file__).resolve().parents[1] / "tasks" / "shapes" / "base_model"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """`model.dtype` -> the torch dtype (float32 | bfloat16 | float16)."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype '{name}': choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_model_path(spec: str, run_dir: Path, *, seed: int = 0, build: bool = True) -> str:
    """`shapes:base` -> the committed shapes-world base model; `tiny:FAMILY` -> a tiny random
    model under run_dir/base_model, built from `seed` when build=True and not built yet (one
    rank builds it; the others pass build=False); anything else is a path, returned as is."""
    if spec == "shapes:base":
        return str(SHAPES_BASE)
    if not spec.startswith("tiny:"):
        return spec
    from flowpo.models.tiny import make_tiny

    out = Path(run_dir) / "base_model"
    # diffusers layout (model_index.json) or the official Bagel layout (llm_config.json)
    built = any((out / f).is_file() for f in ("model_index.json", "llm_config.json"))
    if build and not built:
        make_tiny(spec.split(":", 1)[1], str(out), seed=seed)
    return str(out)
