"""The drawing anchor (train.anchor_weight > 0): a flow-matching loss on clean images of the
task's world, added to every training loss beside the RL loss (docs/algorithms.md, "The drawing
anchor").

Why: on the shapes world, RL past a KL of about 0.05 from the base unlearns drawing (fewer
pixels inside recognised shapes, held-out accuracy falling after its peak), and a KL weight only
trades the gain for distance along the same line. The anchor asks instead that the policy keep
denoising the world's own images as its base learned to, which says nothing about which prompt
gets which image when its images are denoised unconditionally (`anchor_prompts: empty`, the
default); `captions` denoises them under their pretraining captions, caption noise included:
the base's own objective, as InstructGPT's "ptx" term mixes pretraining into PPO.

The images are rendered scenes of the shapes world's training split, so the anchor needs a
pixel-space shapes-world model (latents are the images). Each (epoch, micro-batch, item, rank)
draws its own scenes, noise and times from the run's seed, so a rerun or a resumed run draws the
same ones.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from flowpo.config import ConfigError
from flowpo.tasks.shapes.pretrain import training_captions, training_scenes
from flowpo.tasks.shapes.world import SIZE


class DrawingAnchor:
    """loss(epoch, start, j) -> (weighted loss, stats) for one training loss of the update."""

    def __init__(self, trainer):
        self.trainer = trainer
        t = trainer.cfg.train
        self.weight, self.batch = float(t.anchor_weight), int(t.anchor_batch)
        self.captions = t.anchor_prompts == "captions"
        shape = tuple(trainer.adapter.latent_shape)
        if shape != (3, SIZE, SIZE):
            raise ConfigError(
                f"train.anchor_weight > 0 trains on rendered scenes of the shapes world as clean "
                f"latents, so it needs a pixel-space shapes-world model (latents (3, {SIZE}, "
                f"{SIZE})); model.path={trainer.cfg.model.path!r} has latents {shape}. Use "
                "model.path=shapes:base (or a directory made by `flowpo pretrain-shapes`), or "
                "set train.anchor_weight=0"
            )

    def prompts(self) -> list[str]:
        """The prompts the anchor encodes (for the trainer's embedding cache)."""
        return training_captions() if self.captions else [""]

    def draw(self, epoch: int, start: int, j: int) -> tuple[Tensor, list[str], Tensor, Tensor]:
        """(clean images x0, prompts, noise, times) of the anchor of training loss (start, j)
        of `epoch` on this rank: the same for the same (seed, epoch, start, j, rank)."""
        tr = self.trainer
        gen = tr._generator(epoch, 29, tr.rank, start, j)
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
        x0, prompts = training_scenes(self.batch, rng, captions=self.captions)
        x0 = x0.to(tr.device)
        eps = torch.randn(x0.shape, generator=gen, device=tr.device)
        sigma = torch.rand(self.batch, generator=gen, device=tr.device)
        return x0, prompts, eps, sigma

    def flow_matching_loss(self, x0: Tensor, prompts: list[str], eps: Tensor, sigma: Tensor):
        """mean((v(x_sigma) - (eps - x0))^2), x_sigma = (1 - sigma) x0 + sigma eps: the
        rectified-flow loss the base was pretrained with, through the policy."""
        adapter = self.trainer.adapter
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        with adapter.guidance(1.0):  # the model's own velocity, no CFG combination
            embeds = adapter.encode_prompts(prompts)
            v = adapter.velocity((1 - s) * x0 + s * eps, sigma, embeds)
        return ((v - (eps - x0)) ** 2).mean()

    def loss(self, epoch: int, start: int, j: int) -> tuple[Tensor, dict[str, Tensor]]:
        """anchor_weight x the flow-matching loss of this training loss's draw, and its stats."""
        fm = self.flow_matching_loss(*self.draw(epoch, start, j))
        return self.weight * fm, {"anchor_loss": fm.detach()}
