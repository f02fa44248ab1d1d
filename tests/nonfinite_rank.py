"""`flowpo train ARGS` on every rank of a torchrun launch, with GRPO's loss made NaN on ONE rank
only (POISON_RANK) in the epochs POISON_EPOCHS (comma-separated): the other ranks see finite
values, and the skip must still be agreed by all (tests/test_robustness.py).

    torchrun --nproc_per_node 2 tests/nonfinite_rank.py POISON_RANK POISON_EPOCHS train ARGS...
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> int:
    rank_to_poison, epochs, *args = sys.argv[1:]
    poisoned = {int(e) for e in epochs.split(",")}
    from flowpo.cli import main as flowpo_main
    from flowpo.trainer.algorithms import GRPO

    real = GRPO.loss

    def loss(self, sub, j, embeds, adv, *, epoch, start):
        term = real(self, sub, j, embeds, adv, epoch=epoch, start=start)
        if epoch in poisoned and int(os.environ["RANK"]) == int(rank_to_poison):
            term.loss = term.loss * torch.tensor(float("nan"))
        return term

    GRPO.loss = loss
    return flowpo_main(args)


if __name__ == "__main__":
    sys.exit(main())
