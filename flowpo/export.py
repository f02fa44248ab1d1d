"""`flowpo export CKPT OUT`: a checkpoint's trained weights in the formats diffusers loads.

- LoRA runs: `OUT/pytorch_lora_weights.safetensors`, written by the pipeline class's own
  `save_lora_weights` with the adapter metadata (rank, alpha, targets), so
  `Pipeline.from_pretrained(BASE).load_lora_weights(OUT)` restores the policy, α included.
- Full fine-tuning: a complete model directory (the base model's files, the transformer
  replaced) that `Pipeline.from_pretrained(OUT)` loads. ZeRO-3 shards were already consolidated
  when the checkpoint was written (`trainable.safetensors`, gathered one parameter at a time).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flowpo.trainer.checkpoint import (
    TRAINABLE,
    TRAINABLE_EMA,
    TRAINER_STATE,
    base_model_dir,
    checkpoint_config,
    trainer_state,
)


class ExportError(ValueError):
    pass


def export_checkpoint(ckpt: str | Path, out: str | Path, *, ema: bool = False, base=None) -> Path:
    """Write the checkpoint's weights (or its EMA weights) to `out`; returns `out`."""
    from safetensors.torch import load_file

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / TRAINER_STATE).is_file():
        raise ExportError(f"'{ckpt}' is not a flowpo checkpoint (no trainer_state.json)")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output '{out}' exists and is not empty; choose a new directory")
    state = trainer_state(ckpt)
    cfg = checkpoint_config(ckpt)
    name = TRAINABLE_EMA if ema else TRAINABLE
    if not (ckpt / name).is_file():
        hint = " (the run had train.ema=false)" if ema else ""
        raise ExportError(f"'{ckpt}' has no {name}{hint}")
    base_dir = Path(base) if base else base_model_dir(ckpt, cfg)
    index = base_dir / "model_index.json"
    if not index.is_file():
        raise ExportError(
            f"base model '{base_dir}' (the run's model.path) has no model_index.json; "
            "pass --base DIR"
        )
    pipeline_cls = _pipeline_class(json.loads(index.read_text())["_class_name"])
    weights = load_file(str(ckpt / name))
    out.mkdir(parents=True, exist_ok=True)
    if state.get("partial"):
        raise ExportError(
            f"'{ckpt}' fine-tuned a subset of the model (e.g. Bagel's moe_gen weights); export "
            "writes diffusers pipelines only — use the checkpoint with `flowpo sample`"
        )
    if state["lora"]:
        from flowpo.models.base import adapter_class, detect_family

        family = cfg.model.family
        targets = adapter_class(detect_family(str(base_dir)) if family == "auto" else family)
        targets = targets.lora_targets
        meta = {
            "r": cfg.train.lora_rank,
            "lora_alpha": cfg.train.lora_alpha,
            "target_modules": sorted(targets),
        }
        pipeline_cls.save_lora_weights(
            str(out), transformer_lora_layers=weights, transformer_lora_adapter_metadata=meta
        )
    else:
        _write_full_model(base_dir, out, weights)
    (out / "flowpo_export.json").write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt.resolve()),
                "base": str(base_dir.resolve()),
                "ema": ema,
                "lora": bool(state["lora"]),
                "epoch": state["epoch"],
            },
            indent=1,
        )  # fmt: skip
    )
    return out


def _pipeline_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ExportError(f"model_index.json names pipeline '{name}', unknown to diffusers")
    return cls


def _write_full_model(base_dir: Path, out: Path, weights: dict) -> None:
    """Copy the base model directory, then save the fine-tuned transformer over its own."""
    import diffusers

    shutil.copytree(base_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer"))
    tcfg = json.loads((base_dir / "transformer" / "config.json").read_text())
    cls = getattr(diffusers, tcfg["_class_name"])
    model = cls.from_pretrained(str(base_dir / "transformer"), local_files_only=True)
    result = model.load_state_dict(weights, strict=True)
    del result
    model.save_pretrained(str(out / "transformer"), safe_serialization=True)
