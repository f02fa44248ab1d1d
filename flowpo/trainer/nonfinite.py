"""Non-finite values never reach the weights, and a run that keeps producing them stops loudly.

Per backward the trainer asks `NonFiniteGuard.check` for the loss to backpropagate: a loss or
log-probability that is NaN or infinite is turned into a NaN loss, so that its gradients are NaN
on every parameter it touches. DeepSpeed's gradient reduction carries them to every rank, and at
the accumulation boundary `Engine.step` skips the optimizer step on all ranks together (the
weights and the optimizer state stay as they were). `after_step` counts the skipped steps and
raises `TrainingDiverged` after `train.max_nonfinite_steps` consecutive ones. Checkpoints refuse
non-finite weights (`trainer.checkpoint.save_checkpoint`).

Codes, ordered from the root cause down (the worst one seen is reported):
1 gradient norm, 2 loss, 3 log-probability.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRAD_NORM, LOSS, LOG_PROB = 1, 2, 3
QUANTITY = {GRAD_NORM: "gradient norm", LOSS: "loss", LOG_PROB: "log-probability"}


class TrainingDiverged(RuntimeError):
    """The run stopped on non-finite values; the message is one line naming the epoch, the
    quantity and what to do."""


def nonfinite_code(loss: Tensor, log_probs: tuple[Tensor, ...] = ()) -> int:
    """LOG_PROB if any log-probability is NaN or infinite, else LOSS if the loss is, else 0."""
    if any(not bool(torch.isfinite(lp.detach()).all()) for lp in log_probs):
        return LOG_PROB
    if not bool(torch.isfinite(loss.detach()).all()):
        return LOSS
    return 0


class NonFiniteGuard:
    """The trainer's bookkeeping of skipped optimizer steps (one per run, on every rank)."""

    def __init__(self, limit: int):
        self.limit = limit  # train.max_nonfinite_steps
        self.window = 0  # worst code this rank saw since the last optimizer step
        self.streak = 0  # consecutive skipped optimizer steps, across epochs
        self.epoch_skipped = 0
        self.total_skipped = 0

    def check(self, loss: Tensor, log_probs: tuple[Tensor, ...] = ()) -> Tensor:
        """The loss to backpropagate. A non-finite log-probability may leave the loss finite
        (e.g. clipped away), so a bad term is made NaN outright: its NaN gradients are what
        makes DeepSpeed (or the engine, without ZeRO) skip the step on every rank."""
        code = nonfinite_code(loss, log_probs)
        self.window = max(self.window, code)
        return loss * float("nan") if code else loss

    def begin_epoch(self) -> None:
        self.epoch_skipped = 0

    def after_step(self, code: int | None, epoch: int) -> None:
        """`code`: what `Engine.step` returned (None between accumulation boundaries, 0 for an
        applied update, else the agreed non-finite code). Raises TrainingDiverged when the
        skipped steps in a row reach the limit."""
        if code is None:
            return
        self.window = 0
        if not code:
            self.streak = 0
            return
        self.streak += 1
        self.epoch_skipped += 1
        self.total_skipped += 1
        if self.streak >= self.limit:
            raise TrainingDiverged(
                f"epoch {epoch}: {self.streak} optimizer steps in a row skipped for a non-finite "
                f"{QUANTITY[code]} (train.max_nonfinite_steps={self.limit}); the weights are "
                "those of the last finite step and no checkpoint holds non-finite values; lower "
                "train.learning_rate, check model.dtype and the rewards, or resume from the last "
                "checkpoint"
            )

    def metrics(self) -> dict[str, float]:
        return {
            "train/skipped_steps": float(self.epoch_skipped),
            "train/skipped_steps_total": float(self.total_skipped),
        }
