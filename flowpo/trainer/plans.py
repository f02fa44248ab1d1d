"""Rollout plans: which steps of a rollout are stochastic, merged, shared, stored and trained.

A plan turns (the sigma schedule, the epoch, the sampling batch) into a `StepPlan`
(docs/algorithms.md §2). The sampler in rollout.py follows that declaration, the trainer consumes
what the sampler stores, and neither asks for the plan's name. Plans are registered by name
(`rollout.plan` in a recipe):

  full     Flow-GRPO: SDE at every step but the last, the first floor(T * fraction) trained.
  window   Flow-GRPO-Fast / MixGRPO: SDE in a window of w steps, ODE elsewhere; the window is
           placed at random per sampling batch, moves with training (progressive), or is fixed.
  branch   original Flow-GRPO-Fast: one ODE prefix per prompt to the branch step (the window
           start), the latent repeated G times, SDE for w steps, ODE to the end.
  entropy  E-GRPO: consecutive low-entropy steps merged into one SDE transition; each active
           transition forks G branches off one ODE anchor trajectory per prompt.

T steps, K trained transitions, G group size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from flowpo.sde import sde_std

if TYPE_CHECKING:
    from flowpo.config import Config

_HALF_LOG_2PIE = 0.5 * math.log(2 * math.pi * math.e)


@dataclass
class StepPlan:
    """What one sampling batch does at each of the T steps.

    Trajectory plans (full, window, branch) walk k = 0..T-1, taking at each k either one ODE
    step or the SDE transition that starts there and covers span[k] steps. With `branch_step`,
    the G trajectories of a prompt share one ODE prefix (computed once per prompt) and fork at
    that step. With `branch_each` (entropy), one ODE anchor trajectory runs per prompt and
    every SDE transition k -> k + span[k] is its own branch point: G branches take that one
    transition from the anchor's latent and continue by ODE, one image per (sample, transition).
    """

    sde: list[bool]  # (T,) a stochastic transition starts at step k
    noise_level: list[float]  # (T,) its noise level a (0 where sde is False)
    trained: list[int]  # (K,) start steps of the stored and trained transitions, ascending
    span: list[int] = field(default_factory=list)  # (T,) steps merged into k's transition
    branch_step: int | None = None  # a prompt's trajectories share the ODE prefix up to here
    branch_each: bool = False  # every SDE transition forks G branches off one anchor

    def __post_init__(self) -> None:
        n = len(self.sde)
        if not self.span:
            self.span = [1] * n
        if len(self.noise_level) != n or len(self.span) != n:
            raise ValueError("sde, noise_level and span must all have one entry per step")
        bad = [k for k in self.trained if not self.sde[k]]
        if bad:
            raise ValueError(f"rollout plan trains ODE steps {bad}: only SDE steps have a log-prob")
        if self.trained != sorted(set(self.trained)):
            raise ValueError(f"trained steps {self.trained} must be ascending and distinct")
        for k in range(n):
            if self.span[k] < 1 or k + self.span[k] > n or (self.span[k] > 1 and not self.sde[k]):
                raise ValueError(
                    f"step {k}: span {self.span[k]} must be >= 1, end by step {n}, "
                    "and exceed 1 only on SDE steps"
                )
            if self.sde[k] and self.noise_level[k] <= 0:
                raise ValueError(f"SDE step {k} needs noise_level > 0 (0 is the ODE step)")
        if self.branch_each and self.branch_step is not None:
            raise ValueError("branch_step and branch_each exclude each other")
        if self.branch_step is not None:
            if any(self.sde[: self.branch_step]):
                raise ValueError("the shared prefix before branch_step must be ODE only")
        if not self.branch_each:
            starts = {k for k, _, _ in self.walk()}
            skipped = [k for k in self.trained if k not in starts]
            if skipped:
                raise ValueError(f"trained steps {skipped} lie inside merged transitions")

    @property
    def num_steps(self) -> int:
        return len(self.sde)

    @property
    def images_per_sample(self) -> int:
        """R: final images per stored sample (one per trained transition under branch_each)."""
        return len(self.trained) if self.branch_each else 1

    def walk(self) -> list[tuple[int, int, bool]]:
        """(k, k_next, sde) of a trajectory: ODE steps and (possibly merged) SDE transitions."""
        out, k = [], 0
        while k < self.num_steps:
            nxt = k + (self.span[k] if self.sde[k] else 1)
            out.append((k, nxt, self.sde[k]))
            k = nxt
        return out

    def transitions(self) -> list[tuple[int, int]]:
        """(k, k + span) of every trained transition."""
        return [(k, k + self.span[k]) for k in self.trained]


PLAN_REGISTRY: dict[str, type[RolloutPlan]] = {}


def register_plan(name: str) -> Callable[[type[RolloutPlan]], type[RolloutPlan]]:
    def deco(cls: type[RolloutPlan]) -> type[RolloutPlan]:
        cls.name = name
        PLAN_REGISTRY[name] = cls
        return cls

    return deco


def _num_steps(sigmas: Tensor | int) -> int:
    return int(sigmas) if isinstance(sigmas, int) else len(sigmas) - 1


class RolloutPlan:
    """Base class: `step_plan(sigmas, epoch, batch)` for each sampling batch."""

    name: ClassVar[str] = ""
    shares_prefix: ClassVar[bool] = False
    """The G samples of a prompt must sit together in one sampling batch (branch, entropy)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.noise_level = cfg.sampling.noise_level

    def step_plan(self, sigmas: Tensor | int, epoch: int, batch: int = 0) -> StepPlan:
        """sigmas: (T+1,) schedule (or T for plans that need no schedule)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for settings this plan cannot run with."""

    def num_trained(self, sigmas: Tensor | int) -> int:
        """K, the same for every epoch and batch (DeepSpeed's accumulation count relies on it)."""
        return len(self.step_plan(sigmas, 0, 0).trained)


@register_plan("full")
class FullPlan(RolloutPlan):
    """Flow-GRPO: SDE at every step but the last (its Gaussian is too sharp); trains the first
    floor(T * timestep_fraction) of them."""

    def step_plan(self, sigmas: Tensor | int, epoch: int, batch: int = 0) -> StepPlan:
        num_steps = _num_steps(sigmas)
        sde = [k < num_steps - 1 for k in range(num_steps)]
        fraction = self.cfg.rollout.timestep_fraction
        k_train = max(1, min(num_steps - 1, math.floor(num_steps * fraction)))
        return StepPlan(
            sde=sde,
            noise_level=[self.noise_level if s else 0.0 for s in sde],
            trained=list(range(k_train)),
        )


# -- windows (window, branch) -------------------------------------------------------------------


def window_range(cfg: Config, num_steps: int) -> tuple[int, int]:
    """[lo, hi) of the steps a window (or E-GRPO's branch points) may start in; default the
    first half, as Flow-GRPO-Fast's sde_window_range = (0, T // 2)."""
    r = cfg.rollout.window_range
    return (r[0], r[1]) if r else (0, num_steps // 2)


def window_start(cfg: Config, num_steps: int, epoch: int, batch: int) -> int:
    """First step of the w-step window for this (epoch, sampling batch).

    random:      uniform in [lo, hi - w] per sampling batch, from (seed, epoch, batch) so that
                 every rank and a resumed run draw the same (Flow-GRPO-Fast);
    progressive: lo + (epoch // window_shift_every) * window_shift_stride, stopping at hi - w
                 (MixGRPO's sliding window, moving from high to low noise as training goes);
    fixed:       lo.
    """
    r = cfg.rollout
    lo, hi = window_range(cfg, num_steps)
    last = hi - r.window_size
    if r.window_placement == "fixed":
        return lo
    if r.window_placement == "progressive":
        return min(lo + (epoch // r.window_shift_every) * r.window_shift_stride, last)
    rng = random.Random((cfg.train.seed * 1_000_003 + epoch) * 1_000_003 + batch)
    return rng.randint(lo, last)


def _check_window(cfg: Config, need_width: bool) -> None:
    from flowpo.config import ConfigError

    r, t_steps = cfg.rollout, cfg.sampling.num_steps
    if len(r.window_range) not in (0, 2):
        raise ConfigError(
            f"rollout.window_range {r.window_range} must be [lo, hi] (two steps) or empty "
            f"(= [0, T // 2])"
        )
    lo, hi = window_range(cfg, t_steps)
    if not 0 <= lo < hi <= t_steps - 1:
        raise ConfigError(
            f"rollout.window_range [{lo}, {hi}) must satisfy 0 <= lo < hi <= sampling.num_steps - 1"
            f" ({t_steps - 1}): the last step is always ODE"
        )
    if r.window_shift_every < 1 or r.window_shift_stride < 0:
        raise ConfigError("rollout.window_shift_every must be >= 1 and window_shift_stride >= 0")
    if need_width:
        if r.window_size < 1:
            raise ConfigError(f"rollout.window_size ({r.window_size}) must be >= 1")
        if r.window_size > hi - lo:
            raise ConfigError(
                f"rollout.window_size ({r.window_size}) does not fit rollout.window_range "
                f"[{lo}, {hi}); widen the range or shrink the window"
            )


def _check_groups_together(cfg: Config) -> None:
    from flowpo.config import ConfigError

    g, bs, mb = cfg.rollout.group_size, cfg.rollout.batch_size, cfg.micro_batch_size
    if bs % g:
        raise ConfigError(
            f"rollout.plan={cfg.rollout.plan} shares one prefix/anchor per prompt: "
            f"rollout.group_size ({g}) must divide rollout.batch_size ({bs})"
        )
    if mb % g:
        raise ConfigError(
            f"rollout.plan={cfg.rollout.plan}: train.micro_batch_size ({mb}) must be a multiple "
            f"of rollout.group_size ({g}) so a prompt's branches train together; use 0"
        )


@register_plan("window")
class WindowPlan(RolloutPlan):
    """Flow-GRPO-Fast / MixGRPO: SDE in a window of `rollout.window_size` steps, ODE elsewhere;
    only the window steps are stored and trained."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        _check_window(cfg, need_width=True)

    def step_plan(self, sigmas: Tensor | int, epoch: int, batch: int = 0) -> StepPlan:
        num_steps = _num_steps(sigmas)
        start = window_start(self.cfg, num_steps, epoch, batch)
        steps = list(range(start, start + self.cfg.rollout.window_size))
        sde = [k in steps for k in range(num_steps)]
        return StepPlan(
            sde=sde, noise_level=[self.noise_level if s else 0.0 for s in sde], trained=steps
        )


@register_plan("branch")
class BranchPlan(WindowPlan):
    """Original Flow-GRPO-Fast: one ODE trajectory per prompt to the branch step (the window
    start, placed like the window plan's), the latent repeated G times, SDE for w steps, ODE to
    the end. The prefix and the branch step's forward run once per prompt."""

    shares_prefix = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        _check_window(cfg, need_width=True)
        _check_groups_together(cfg)

    def step_plan(self, sigmas: Tensor | int, epoch: int, batch: int = 0) -> StepPlan:
        plan = super().step_plan(sigmas, epoch, batch)
        plan.branch_step = plan.trained[0]
        return plan


# -- entropy (E-GRPO) ---------------------------------------------------------------------------


def entropy_per_dim(std: Tensor | float) -> Tensor:
    """h / D = ½·log(2πe·s²), in nats: the entropy per dimension of N(μ, s²·I)."""
    return _HALF_LOG_2PIE + torch.log(torch.as_tensor(std, dtype=torch.float64))


def select_entropy_transitions(
    sigmas: Tensor,
    *,
    sde_type: str,
    noise_level: float,
    tau: float,
    merge_length: int = 0,
    start: int = 0,
    end: int | None = None,
) -> list[tuple[int, int]]:
    """E-GRPO's active transitions (k, l): from σ_k to σ_{k+l} as ONE SDE step.

    From k = start, take the smallest l whose merged transition (std by the SDE type's formula
    with dt = σ_{k+l} - σ_k) reaches per-dimension entropy `tau` (nats), or l = merge_length
    when it is > 0; then continue at k + l. A k whose transition cannot reach tau before the
    last step is skipped. Starts lie in [start, end); transitions end at step T-1 at the latest
    (the last step stays ODE). Deterministic in (sigmas, sde_type, noise_level, tau).
    Flow-SDE's sigma_t at σ = 1 uses σ_1, as the sampler does.
    """
    s = sigmas.double().cpu()
    t_steps = len(s) - 1
    end = t_steps // 2 if end is None else end
    sigma_max = float(s[1])

    def ent(k: int, span: int) -> float:
        std = sde_std(
            float(s[k]), float(s[k + span]), noise_level, sde_type=sde_type, sigma_max=sigma_max
        )
        return float(entropy_per_dim(std)) if float(std) > 0 else -math.inf

    out, k = [], start
    while k < end:
        if merge_length > 0:
            if k + merge_length > t_steps - 1:
                break
            out.append((k, merge_length))
            k += merge_length
            continue
        span = 1
        while k + span <= t_steps - 1 and ent(k, span) < tau:
            span += 1
        if k + span > t_steps - 1:
            k += 1  # tau not reachable from k
            continue
        out.append((k, span))
        k += span
    return out


@register_plan("entropy")
class EntropyPlan(RolloutPlan):
    """E-GRPO (arXiv 2601.00423): merged high-entropy transitions, each its own branch point.

    One ODE anchor trajectory per prompt; at each active transition k -> k + l (chosen by
    `select_entropy_transitions` inside rollout.window_range), G branches take that one SDE
    step from the anchor's latent x_k and continue by ODE. Advantages are normalised within
    each branch point's G branches; training runs one transformer forward per (prompt, active
    transition) and scores all G branch targets against it.
    """

    shares_prefix = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._cache: dict[tuple[float, ...], list[tuple[int, int]]] = {}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        from flowpo.config import ConfigError

        _check_window(cfg, need_width=False)
        _check_groups_together(cfg)
        if cfg.rollout.entropy_merge_length < 0:
            raise ConfigError(
                f"rollout.entropy_merge_length ({cfg.rollout.entropy_merge_length}) must be >= 0 "
                "(0 = adaptive merging by rollout.entropy_tau)"
            )

    def transitions(self, sigmas: Tensor) -> list[tuple[int, int]]:
        key = tuple(float(x) for x in sigmas)
        if key not in self._cache:
            r, s = self.cfg.rollout, self.cfg.sampling
            lo, hi = window_range(self.cfg, len(sigmas) - 1)
            found = select_entropy_transitions(
                sigmas,
                sde_type=s.sde_type,
                noise_level=s.noise_level,
                tau=r.entropy_tau,
                merge_length=r.entropy_merge_length,
                start=lo,
                end=hi,
            )
            if not found:
                from flowpo.config import ConfigError

                std0 = sde_std(
                    float(sigmas[lo]),
                    float(sigmas[-2]),
                    s.noise_level,
                    sde_type=s.sde_type,
                    sigma_max=float(sigmas[1]),
                )
                raise ConfigError(
                    f"rollout.entropy_tau ({r.entropy_tau} nats) is reached by no transition in "
                    f"rollout.window_range [{lo}, {hi}) (the widest from step {lo} reaches "
                    f"{float(entropy_per_dim(std0)):.3f}); lower entropy_tau or raise "
                    "sampling.noise_level"
                )
            self._cache[key] = found
        return self._cache[key]

    def step_plan(self, sigmas: Tensor | int, epoch: int, batch: int = 0) -> StepPlan:
        if isinstance(sigmas, int):
            raise TypeError("the entropy plan needs the sigma schedule, not only the step count")
        num_steps = len(sigmas) - 1
        found = self.transitions(sigmas)
        sde, span = [False] * num_steps, [1] * num_steps
        for k, merged in found:
            sde[k], span[k] = True, merged
        return StepPlan(
            sde=sde,
            noise_level=[self.noise_level if x else 0.0 for x in sde],
            trained=[k for k, _ in found],
            span=span,
            branch_each=True,
        )


def build_plan(cfg: Config) -> RolloutPlan:
    if cfg.rollout.plan not in PLAN_REGISTRY:
        known = ", ".join(sorted(PLAN_REGISTRY))
        raise ValueError(f"rollout.plan '{cfg.rollout.plan}' is unknown; choose one of: {known}")
    return PLAN_REGISTRY[cfg.rollout.plan](cfg)
