"""The checkpoint format, end to end: what a checkpoint directory holds, how it is written so that
a crash never leaves a half-written one that looks complete, how `latest` is found, how a run
resumes from it and how its trained weights are applied to a model (sample, eval, export).

    RUN/checkpoints/
      latest                     name of the newest complete checkpoint (replaced last)
      checkpoint-N/              N = the epoch it ends
        engine/                  DeepSpeed state of every rank (weights, optimizer, ZeRO shards)
        trainable.safetensors    the trained weights, gathered: LoRA (peft names) or full
        trainable_ema.safetensors  the EMA of those weights (train.ema runs)
        ema_rank{R}.pt           each rank's EMA state, for resume
        old_policy_rank{R}.pt    nft/awm: each rank's old (EMA) policy, for resume
        rng_rank{R}.pt           each rank's python / numpy / torch / CUDA RNG states
        trainer_state.json       epoch, lora, partial, history (evaluations, train rewards)
        config.yaml              the run's resolved config
        manifest.json            name and size of every file above; written last
      .tmp-checkpoint-N/         a save in progress (renamed to checkpoint-N when complete)

Saving and resuming are collective: every rank calls them, in the same order.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from flowpo.config import Config, config_from_dict
from flowpo.models.resolve import resolve_model_path
from flowpo.trainer.nonfinite import TrainingDiverged
from flowpo.trainer.tracking import print0

if TYPE_CHECKING:
    from flowpo.trainer.ema import EMA
    from flowpo.trainer.engine import Engine

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
TRAINABLE_EMA = "trainable_ema.safetensors"
CONFIG = "config.yaml"


# -- completeness and lookup ----------------------------------------------------------------------


def write_manifest(ckpt: Path) -> None:
    """Name and size of every file of a finished checkpoint; written last, inside it."""
    files = {
        str(f.relative_to(ckpt)): f.stat().st_size
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps(files, indent=0))


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` is not a complete checkpoint (missing manifest, file missing or truncated),
    or None when every file the manifest lists is there with its size."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    for name, size in json.loads(manifest.read_text()).items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def find_checkpoint(spec: str, run_dir: Path) -> Path:
    """`latest` -> the newest complete checkpoint of run_dir (the `latest` pointer's, else the
    newest whose manifest checks out); else a checkpoint directory, which must be complete."""
    if spec == "latest":
        root = run_dir / "checkpoints"
        pointer = root / "latest"
        candidates = [root / pointer.read_text().strip()] if pointer.is_file() else []
        candidates += sorted(
            (p for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
            key=lambda p: int(p.name.split("-")[1]),
            reverse=True,
        )
        for ckpt in candidates:
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            print(f"warning: skipping {ckpt}: {problem}", flush=True)
        raise FileNotFoundError(
            f"checkpoint.resume=latest: no complete checkpoint in {run_dir}; set "
            "logging.run_name to the run to continue, or pass a checkpoint directory"
        )
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"checkpoint.resume '{spec}' is not a flowpo checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"checkpoint.resume '{spec}' is incomplete: {problem}")
    return path


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    """Where the checkpoint that ends `epoch` lives (complete or not)."""
    return run_dir / "checkpoints" / f"checkpoint-{epoch}"


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (RUN/checkpoints/checkpoint-N -> RUN)."""
    return ckpt.parent.parent


def trainer_state(ckpt: Path) -> dict:
    """trainer_state.json: epoch, lora, partial (full fine-tuning of a subset), history."""
    return json.loads((ckpt / TRAINER_STATE).read_text())


def checkpoint_config(ckpt: Path) -> Config:
    """The resolved config the run was started with, as saved in the checkpoint."""
    import yaml

    return config_from_dict(yaml.safe_load((ckpt / CONFIG).read_text()))


def base_model_dir(ckpt: Path, cfg: Config) -> Path:
    """The model directory the run started from (its model.path, resolved; `tiny:*` models
    were built inside the run directory)."""
    return Path(resolve_model_path(cfg.model.path, ckpt.resolve().parents[1], build=False))


# -- RNG state ------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: dict) -> None:
    """Restore the states `rng_state` returned (CUDA's only where CUDA is available)."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# -- EMA ------------------------------------------------------------------------------------------


def save_ema(
    ckpt: Path, ema: EMA, rank: int, export: Callable[[], dict[str, torch.Tensor]]
) -> None:
    """This rank's EMA state as ema_rank{rank}.pt (for resume) and, on rank 0, the EMA weights
    as trainable_ema.safetensors, written by `export` (the engine's trainable_state_dict, run
    on every rank as ZeRO-3 gathers need) under `ema.applied()`."""
    ema.save(Path(ckpt) / f"ema_rank{rank}.pt")
    with ema.applied():
        weights = export()
    if rank == 0:
        from safetensors.torch import save_file

        save_file(weights, str(Path(ckpt) / TRAINABLE_EMA))


def load_ema(ckpt: Path, ema: EMA, rank: int) -> bool:
    """Load ema_rank{rank}.pt from a checkpoint if it has one; returns whether it did."""
    path = Path(ckpt) / f"ema_rank{rank}.pt"
    if path.is_file():
        ema.load(path)
    return path.is_file()


# -- save, prune, resume --------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    *,
    engine: Engine,
    cfg: Config,
    history: dict,
    ema: EMA | None = None,
    states: dict | None = None,
) -> Path:
    """Write checkpoint-{epoch} of the run (collective). Everything goes to a temporary
    directory first; rank 0 writes the manifest last, renames it into place, then moves the
    `latest` pointer and prunes to checkpoint.keep_last_n, so an interrupted save is never
    taken for a complete one; weights holding NaN or inf are refused (TrainingDiverged) before
    anything is written. states: the algorithm's per-rank state (name -> object with
    save/load, e.g. DiffusionNFT's old policy), written as {name}_rank{rank}.pt."""
    if engine.max_over_ranks(int(engine.has_nonfinite_weights())):
        # skipped optimizer steps keep NaN out of the weights; this is the last line of defence
        raise TrainingDiverged(
            f"checkpoint-{epoch} not written: the trainable weights hold NaN or infinite values "
            "(an update applied non-finite gradients); resume from the last checkpoint with a "
            "lower train.learning_rate"
        )
    root = run_dir / "checkpoints"
    final = checkpoint_dir(run_dir, epoch)
    tmp = root / f".tmp-checkpoint-{epoch}"
    if engine.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save(tmp, client_state={"epoch": epoch})
    torch.save(rng_state(), tmp / f"rng_rank{engine.rank}.pt")
    if ema is not None:
        save_ema(tmp, ema, engine.rank, engine.trainable_state_dict)
    for name, state in (states or {}).items():
        state.save(tmp / f"{name}_rank{engine.rank}.pt")
    trainable = engine.trainable_state_dict()
    if engine.is_rank0:
        from safetensors.torch import save_file

        save_file(trainable, str(tmp / TRAINABLE))
        state = {
            "epoch": epoch,
            "lora": cfg.train.lora,
            # full fine-tuning of a subset (Bagel's moe_gen): the file holds only that subset
            "partial": not cfg.train.lora
            and any(not p.requires_grad for p in engine.module.module.parameters()),
            "history": history,
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        cfg.save(tmp / CONFIG)
    engine.barrier()
    if engine.is_rank0:
        write_manifest(tmp)  # last file in: a checkpoint without it is incomplete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")  # updated last: a partial save is never latest
        prune_checkpoints(root, cfg.checkpoint.keep_last_n)
    engine.barrier()
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints under root (keep <= 0: keep all)."""
    ckpts = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resume(
    ckpt: Path,
    engine: Engine,
    ema: Callable[[], EMA | None] = lambda: None,
    states: Callable[[], dict] = dict,
) -> tuple[int, dict]:
    """Load a checkpoint into a set-up trainer (collective): the engine's state, this rank's RNG
    states, and the EMA's state; `ema()` is called after the weights are loaded, so an EMA
    built on first use starts from them. Returns (the epoch to continue from, the history)."""
    client = engine.load(ckpt)
    state = trainer_state(ckpt)
    rng_file = ckpt / f"rng_rank{engine.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    start_epoch = int(client.get("epoch", state["epoch"])) + 1
    history = state.get("history", {})
    averaged = ema()
    if averaged is not None:
        load_ema(ckpt, averaged, engine.rank)
    for name, state in states().items():  # built after the weights are loaded, like the EMA
        path = ckpt / f"{name}_rank{engine.rank}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{ckpt} has no {path.name} (train.algorithm needs its {name}); resume it with "
                "the train.algorithm and world size that wrote it"
            )
        state.load(path)
    print0(f"resumed from {ckpt} at epoch {start_epoch}", rank=engine.rank)
    return start_epoch, history


# -- trained weights onto a model -----------------------------------------------------------------


def load_trainable(adapter, ckpt: Path, *, ema: bool = False) -> None:
    """Apply a checkpoint's trainable weights (LoRA adapters or full state dict) to the adapter;
    `ema`: its EMA of them instead (trainable_ema.safetensors, written by train.ema runs, whose
    own evaluations use it)."""
    from safetensors.torch import load_file

    if not (ckpt / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"--checkpoint '{ckpt}' is not a flowpo checkpoint (no trainer_state.json); "
            "give a RUN/checkpoints/checkpoint-N directory"
        )
    problem = checkpoint_problem(ckpt)
    if problem:
        raise FileNotFoundError(f"--checkpoint '{ckpt}' is incomplete: {problem}")
    name = TRAINABLE_EMA if ema else TRAINABLE
    if not (ckpt / name).is_file():
        raise FileNotFoundError(
            f"--checkpoint '{ckpt}' has no {name} (the run had train.ema=false); drop --ema"
        )
    state = trainer_state(ckpt)
    weights = load_file(str(ckpt / name))
    module = adapter.trainable_module
    if state["lora"]:
        from peft import LoraConfig, set_peft_model_state_dict

        cfg = checkpoint_config(ckpt)
        module.add_adapter(
            LoraConfig(
                r=cfg.train.lora_rank,
                lora_alpha=cfg.train.lora_alpha,
                target_modules=adapter.lora_targets,
            )
        )
        result = set_peft_model_state_dict(module, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint has unexpected LoRA keys: {result.unexpected_keys[:5]}")
    else:
        # a partial file (full fine-tuning of a subset) leaves the other weights at the base's
        result = module.load_state_dict(weights, strict=not state.get("partial", False))
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint has unexpected keys: {result.unexpected_keys[:5]}")
