"""RL algorithms behind `train.algorithm`: the few methods the epoch loop calls.

The loop in grpo.py is the same for every algorithm: sample batches and score them, compute
group advantages, then for each micro-batch and each of its K trained items one loss, one
backward and one engine step, then evaluate and checkpoint. What differs is the object
registered here (the way rollout plans and rewards are registered):

  grpo  Flow-GRPO family (docs/algorithms.md §1-§5): SDE rollouts under a rollout plan, the
        stored transitions re-scored; item j = trained transition j.
  nft   DiffusionNFT (§7): clean ODE samples of the old (EMA) policy; item j = training time j.
  awm   Advantage Weighted Matching (§8): clean samples; advantage-weighted flow matching.

An algorithm provides:
  check_config(cfg)                  ConfigError for settings it cannot run (preflight)
  plan_shape()                       (K items per sample, R images per sample)
  sample_batch(embeds, epoch, b, sigmas, gen) -> (stored batch, metrics)
  cat(parts)                         the stored batches of an epoch as one
  begin_update(data, epoch)          before the first micro-batch
  loss(sub, j, embeds, adv, epoch, start) -> StepLoss   one item of a micro-batch
  end_update(epoch) -> metrics       after the last optimizer step of the epoch
  states() -> {name: EMA}            per-rank state a checkpoint must hold for exact resume

Shapes: B samples of a micro-batch, K items per sample, R images per sample.
"""

from __future__ import annotations

import functools

from flowpo.config import Config, ConfigError
from flowpo.models.base import adapter_class, family_of
from flowpo.trainer import forward_rl  # noqa: F401  (registers nft and awm)
from flowpo.trainer.algorithm import (  # noqa: F401  (re-exported: the registry's home)
    ALGORITHM_REGISTRY,
    Algorithm,
    register_algorithm,
)
from flowpo.trainer.rollout import Rollout, sample_rollout
from flowpo.trainer.update import StepLoss, reference_policy, step_loss


@register_algorithm("grpo")
class GRPO(Algorithm):
    """Flow-GRPO and its variants (§1-§5): the plan's SDE transitions are stored with their
    log-probs and re-scored by `update.step_loss`."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.forward.rollout_guidance_scale:
            raise ConfigError(
                f"forward.rollout_guidance_scale ({cfg.forward.rollout_guidance_scale}) is for "
                "train.algorithm=nft|awm; Flow-GRPO's log-probabilities need the rollouts' own "
                "guidance in training (set sampling.guidance_scale instead, and "
                "forward.rollout_guidance_scale=0)"
            )
        # the first ratio is exactly 1 only if re-scoring sees what sampling saw; a model whose
        # rows depend on their batch (Bagel) must re-score in the sampling batches themselves
        family = family_of(cfg.model.family, cfg.model.path)
        mb, bs = cfg.micro_batch_size, cfg.rollout.batch_size
        if family is not None and not adapter_class(family).batch_invariant and mb != bs:
            raise ConfigError(
                f"train.micro_batch_size ({mb}) differs from rollout.batch_size ({bs}), but "
                f"{family}'s velocity of a row depends on the rows it runs with (the text is cut "
                "to the batch's longest prompt), so re-scoring would not reproduce the rollout "
                f"and the first ratio would not be 1; set rollout.batch_size={mb} (more "
                "rollout.num_batches) or train.micro_batch_size=0"
            )

    def plan_shape(self) -> tuple[int, int]:
        plan = self.trainer.plan.step_plan(self.trainer.schedule(), 0, 0)
        return len(plan.trained), plan.images_per_sample

    def sample_batch(self, embeds, epoch, batch, sigmas, gen):
        step_plan = self.trainer.plan.step_plan(sigmas, epoch, batch)
        t = self.trainer  # stored log-probs from the re-scoring's backend: first ratio 1
        ro = sample_rollout(t.adapter, embeds, step_plan, sigmas, self.cfg, gen,
                            backend=t.kernel_backend)  # fmt: skip
        return ro, {"rollout/first_trained_step": float(step_plan.trained[0])}

    def cat(self, parts: list[Rollout]) -> Rollout:
        return Rollout.cat(parts)

    def begin_update(self, data, epoch: int) -> None:
        t = self.trainer
        self._reference = functools.partial(reference_policy, t.adapter, t.engine)  # beta > 0

    def loss(self, sub, j, embeds, adv, *, epoch, start) -> StepLoss:
        t = self.trainer
        r = sub.images_per_sample
        a = adv[:, min(j, r - 1)].to(t.device)  # transition j is judged by image min(j, R-1)
        return step_loss(
            t.adapter, sub, j, embeds, a, self.cfg, sigma_max=t.sigma_max,
            backend=t.kernel_backend, reference=self._reference,
        )  # fmt: skip


def build_algorithm(trainer) -> Algorithm:
    """The algorithm named by train.algorithm, bound to a set-up trainer (adapter, engine,
    plan, sizes, generators)."""
    return ALGORITHM_REGISTRY[trainer.cfg.train.algorithm](trainer)
