"""SIGTERM/SIGINT during training: checkpoint at the next safe point, then stop.

The first signal only sets a flag; the loop reads it (over all ranks, so that they stop
together) after each rollout and each update, checkpoints and raises `TrainingInterrupted`.
A second signal stops at once, without a checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT reached the trainer: the state was checkpointed and the run stopped."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum, self.checkpoint = signum, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no epoch finished)"
        super().__init__(f"stopped by {signal.Signals(signum).name}; {where}")


class StopSignals:
    """Handlers for SIGTERM and SIGINT that record the signal (`received`, 0 = none)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.received = 0
        self._old: dict = {}

    def install(self) -> None:
        def handler(signum, frame):
            if self.received:  # a second signal: stop now, without a checkpoint
                raise KeyboardInterrupt
            self.received = signum
            print(
                f"[rank {self.rank}] {signal.Signals(signum).name}: checkpointing at the next "
                "safe point (end of this rollout or update); send it again to stop at once",
                flush=True,
            )

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (embedded use): leave signals alone
                pass

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
