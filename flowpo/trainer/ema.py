"""Exponential moving average of the trainable weights, for evaluation and export.

Flow-GRPO evaluates and exports an EMA of its LoRA weights (decay 0.9, updated every 8 steps,
decay warmed up as min((1 + n) / (10 + n), decay)); flowpo offers the same, written from that
description. The EMA holds float32 copies of the trainable parameters of this rank (under
ZeRO-3, of this rank's shards), so it costs one extra copy of the trainable weights — small
with LoRA — and never takes part in the training forward or backward.

    ema = EMA(module, decay=0.9, update_interval=8)
    ...after each optimizer step n (1, 2, ...):  ema.update(n)
    with ema.applied():          # the module runs with the EMA weights inside the block
        evaluate(...)

`TrainingEMA` is the trainer's side: it builds the EMA of the engine's module on first use and
folds the weights in after each optimizer step. The checkpoint files are `trainer.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn


def _data(p: nn.Parameter) -> Tensor:
    # ZeRO-3 keeps a rank's shard in ds_tensor and leaves p.data an empty placeholder
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    """EMA of the parameters of `module` that require grad (named, so it can be checkpointed)."""

    def __init__(
        self,
        module: nn.Module,
        *,
        decay: float = 0.9,
        update_interval: int = 1,
        warmup: bool = True,
        refresh: Callable[[list[nn.Parameter]], None] | None = None,
    ):
        """refresh(params): called after `applied()` writes the EMA weights in and after it
        restores the training ones; the engine's `refresh_gathered` (under ZeRO-3 the whole
        copies of gathered parameters would not see a change of their partitions)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay ({decay}) must be in [0, 1)")
        if update_interval < 1:
            raise ValueError(f"train.ema_update_interval ({update_interval}) must be >= 1")
        self.decay, self.update_interval, self.warmup = decay, update_interval, warmup
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("EMA: the module has no trainable parameters")
        self.shadow = {n: _data(p).detach().float().clone() for n, p in self.params.items()}
        self.num_updates = 0
        self.refresh = refresh or (lambda params: None)

    def current_decay(self, step: int) -> float:
        """Decay used at optimizer step `step`: min((1 + step) / (10 + step), decay) with
        warmup (early updates follow the weights closely), else decay."""
        return min((1 + step) / (10 + step), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Call after optimizer step `step` (counted from 1); updates every update_interval
        steps: shadow += (1 - decay) * (param - shadow). Returns whether it updated."""
        if step % self.update_interval:
            return False
        one_minus = 1.0 - self.current_decay(step)
        for n, p in self.params.items():
            self.shadow[n].add_(_data(p).float() - self.shadow[n], alpha=one_minus)
        self.num_updates += 1
        return True

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The module runs with the EMA weights inside the block; the training weights are
        restored on exit (also after an exception)."""
        saved = {}
        params = list(self.params.values())
        with torch.no_grad():
            for n, p in self.params.items():
                d = _data(p)
                saved[n] = d.clone()
                d.copy_(self.shadow[n].to(d.dtype))
        try:
            self.refresh(params)
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    _data(p).copy_(saved[n])
            self.refresh(params)

    def state_dict(self) -> dict:
        return {
            "shadow": {n: t.cpu() for n, t in self.shadow.items()},
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n, t in state["shadow"].items():
            if n in self.shadow:
                self.shadow[n].copy_(t)
        self.num_updates = int(state.get("num_updates", 0))

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class TrainingEMA:
    """train.ema for the trainer: an EMA of the engine's trainable weights, built on first use
    (from the weights at that moment: after a resume, the loaded ones) and updated after each
    optimizer step. DeepSpeed steps only at the accumulation boundary, so the engine's step
    counter, not the call, decides when. Without train.ema every method is a no-op."""

    def __init__(self, engine, train_cfg):
        self.engine, self.cfg = engine, train_cfg
        self._ema: EMA | None = None
        self._seen = 0

    def get(self) -> EMA | None:
        """The EMA (built on the first call) when train.ema is on, else None."""
        t = self.cfg
        if not t.ema:
            return None
        if self._ema is None:
            self._ema = EMA(
                self.engine.module,
                decay=t.ema_decay,
                update_interval=t.ema_update_interval,
                warmup=t.ema_warmup,
                refresh=getattr(self.engine, "refresh_gathered", None),
            )
            self._seen = self.engine.optimizer_steps
        return self._ema

    def scope(self):
        """Context manager: the EMA weights inside the block (evaluation, export); a no-op
        without train.ema."""
        ema = self.get()
        return ema.applied() if ema is not None else contextlib.nullcontext()

    def after_step(self) -> None:
        """Fold the weights in if the engine took an optimizer step since the last call."""
        ema = self.get()
        if ema is None:
            return
        steps = self.engine.optimizer_steps
        if steps != self._seen:
            self._seen = steps
            ema.update(steps)
