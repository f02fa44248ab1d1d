"""From a config's model fields to what the loaders take: a model directory and a torch dtype.

`model.path` is a directory, or one of two built-in names:
- `shapes:base`: the committed shapes-world base model (flowpo/tasks/shapes/base_model/);
- `tiny:FAMILY`: a tiny random model of that family, built once under RUN_DIR/base_model.

With the environment variable FLOWPO_TINY_CACHE naming a directory, a `tiny:FAMILY` model is built
once per (family, seed) in that directory and copied into each run directory: the same bytes as a
fresh build, without paying for the build (and the tokenizer training) in every run. The tests
set it to one directory per session.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

SHAPES_BASE = Path(__file__).resolve().parents[1] / "tasks" / "shapes" / "base_model"

TINY_CACHE_ENV = "FLOWPO_TINY_CACHE"  # a directory: build each tiny model once, copy it

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """`model.dtype` -> the torch dtype (float32 | bfloat16 | float16)."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype '{name}': choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_model_path(spec: str, run_dir: Path, *, seed: int = 0, build: bool = True) -> str:
    """`shapes:base` -> the committed shapes-world base model; `tiny:FAMILY` -> a tiny random
    model under run_dir/base_model, built from `seed` when build=True and not built yet (one
    rank builds it; the others pass build=False; with $FLOWPO_TINY_CACHE, copied from the
    cache's build); anything else is a path, returned as is."""
    if spec == "shapes:base":
        return str(SHAPES_BASE)
    if not spec.startswith("tiny:"):
        return spec
    from flowpo.models.tiny import make_tiny

    out = Path(run_dir) / "base_model"
    if build and not _is_model_dir(out):
        family = spec.split(":", 1)[1]
        cache = os.environ.get(TINY_CACHE_ENV, "")
        if cache:
            shutil.copytree(cached_tiny(family, cache, seed=seed), out, dirs_exist_ok=True)
        else:
            make_tiny(family, str(out), seed=seed)
    return str(out)


def _is_model_dir(path: Path) -> bool:
    # diffusers layout (model_index.json) or the official Bagel layout (llm_config.json)
    return any((path / f).is_file() for f in ("model_index.json", "llm_config.json"))


def _tiny_source_digest() -> str:
    """What a tiny model's bytes depend on: the models layer's source (the builders, the Bagel
    modeling code) and the library versions."""
    import diffusers
    import transformers

    models = Path(__file__).resolve().parent
    h = hashlib.sha256(f"{diffusers.__version__} {transformers.__version__}".encode())
    for f in sorted(models.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def cached_tiny(family: str, cache_dir: str | Path, *, seed: int = 0) -> str:
    """The tiny `family` model of `seed` in `cache_dir`, built there on first use (`make_tiny`,
    written to a temporary directory and renamed into place, so concurrent processes never see a
    partial model); keyed by family, seed and the models layer's source. Returns its directory."""
    from flowpo.models.tiny import make_tiny

    cache = Path(cache_dir)
    out = cache / f"{family}-seed{seed}-{_tiny_source_digest()}"
    if not _is_model_dir(out):
        tmp = cache / f".tmp-{out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny(family, str(tmp), seed=seed)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished it first: same bytes
            shutil.rmtree(tmp, ignore_errors=True)
            if not _is_model_dir(out):
                raise
    return str(out)
