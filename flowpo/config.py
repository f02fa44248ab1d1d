"""Typed configuration: dataclasses per section, YAML recipes, `--section.field=value` overrides.

A recipe is a YAML file with one mapping per section (`model:`, `sampling:`, ...). Values are
checked against the dataclass field types when loaded; unknown keys and wrong types raise a
`ConfigError` naming the key and the fix. Cross-field rules live in `Config.validate()`; the
checks against files and registries in `flowpo.trainer.preflight`. This module imports nothing
from flowpo: it is the ground the other layers stand on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what to do."""


@dataclass
class ModelConfig:
    family: str = "sd3"
    """Adapter family: sd3 | flux | qwen_image | bagel | auto (read from model_index.json, or
    from Bagel's official files: llm_config.json, ema.safetensors, ae.safetensors)."""
    path: str = "tiny:sd3"
    """Local diffusers model directory. `tiny:sd3` / `tiny:flux` / `tiny:qwen-image` builds a
    tiny random model inside the run directory (CPU demos and tests)."""
    dtype: str = "float32"
    """Dtype the transformer runs in: float32 | bfloat16 | float16. Step math is always fp32.
    Training: bfloat16 goes with engine.precision=bf16, float16 with engine.precision=fp16."""
    resolution: int = 0
    """Image side in pixels; 0 = the model's default sample size."""
    options: dict[str, Any] = field(default_factory=dict)
    """Family-specific adapter options, passed to the adapter's constructor; e.g. qwen_image:
    cfg_norm_rescale, negative_prompt, max_sequence_length; sd3/flux: max_sequence_length."""
    drop_text_encoders: bool = False
    """Encode every training and eval prompt once at start, keep the embeddings and free the
    text encoders (they can outweigh the policy: T5-XXL, Qwen2.5-VL)."""
    attn_backend: str = "native"
    """Attention backend, as diffusers' attention dispatcher names it: native (torch SDPA) |
    flash | flash_varlen | _flash_3 | sage | xformers | _native_math | ... for SD3, FLUX and
    Qwen-Image; native | flash (flash-attn varlen over the packed sequence) for Bagel. One that
    cannot run here (no GPU, package missing, dtype) stops at start (docs/gpu.md)."""


@dataclass
class SamplingConfig:
    num_steps: int = 10
    """Denoising steps T of a training rollout."""
    eval_num_steps: int = 0
    """Steps of ODE evaluation sampling; 0 = same as num_steps."""
    guidance_scale: float = 1.0
    """CFG scale (SD3, batched [neg; pos]) or distilled guidance (FLUX)."""
    noise_level: float = 0.7
    """SDE noise level a (docs/algorithms.md §1)."""
    sde_type: str = "flow"
    """flow | cps | dance."""
    logprob_reduce: str = "mean"
    """mean (published per-element mean) | sum (true log-density)."""
    cps_legacy_scale: bool = False
    """CPS only: published log p = -mean((x'-mu)^2) scale (pairs with clip 1e-5)."""
    shift: float = 0.0
    """Training-rollout schedule: 0 = the model's own (static shift for SD3, resolution-dependent
    for FLUX); > 0 = static shift s*sigma/(1+(s-1)*sigma) of linspace(1, 0, T+1), as DanceGRPO
    and E-GRPO sample FLUX (s = 3). Evaluation always uses the model's own schedule."""


@dataclass
class RolloutConfig:
    plan: str = "full"
    """Rollout plan (registry in trainer/plans.py): full (Flow-GRPO) | window (Flow-GRPO-Fast,
    MixGRPO) | branch (shared ODE prefix, then G branches) | entropy (E-GRPO)."""
    group_size: int = 4
    """G: images per prompt."""
    batch_size: int = 16
    """Images per rank per sampling batch."""
    num_batches: int = 2
    """Sampling batches per rank per epoch."""
    timestep_fraction: float = 1.0
    """full plan: share of the SDE steps that are trained (first floor(T*fraction)). nft: K =
    floor(T*fraction) training times per sample; awm: its strata span steps [1, T*fraction)."""
    window_size: int = 2
    """window / branch plans: w, the SDE steps (stored and trained) after the window start."""
    window_range: list[int] = field(default_factory=list)
    """[lo, hi): steps where the window (window, branch) or E-GRPO's branch points (entropy) may
    lie; empty = [0, T // 2], Flow-GRPO-Fast's sde_window_range. hi <= T - 1."""
    window_placement: str = "random"
    """random (per sampling batch, Flow-GRPO-Fast) | progressive (moves with training, MixGRPO)
    | fixed (at window_range[0])."""
    window_shift_every: int = 25
    """progressive: epochs between window moves."""
    window_shift_stride: int = 1
    """progressive: steps the window moves each time (it stops at the end of the range)."""
    entropy_tau: float = 0.5
    """entropy plan: threshold tau on a transition's per-dimension entropy
    h/D = log(2*pi*e*std^2)/2 in nats; consecutive steps merge until they reach it. 0.5 nats
    is std ~ 0.40 (unit noise has 1.42). E-GRPO's tau = 2.2 is in units it does not define."""
    entropy_merge_length: int = 0
    """entropy plan: 0 = adaptive merging by entropy_tau; > 0 = merge this many steps each."""
    prompt_file: str = ""
    """Text file with one prompt per line; empty = `prompts` below."""
    tag_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight of each prompt tag (the metadata's "tag", e.g. GenEval's six): a tag's
    share of the epoch's prompt draws is its weight over the sum, spread evenly over its
    prompts; empty = every prompt equally likely. Tags not named are never drawn."""
    prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle",
            "a blue square",
            "a green triangle",
            "two yellow circles",
        ]
    )
    """Inline prompt list (used when prompt_file is empty)."""


@dataclass
class TrainConfig:
    algorithm: str = "grpo"
    """grpo (Flow-GRPO family: SDE rollouts, log-probs, clipped ratio) | nft (DiffusionNFT:
    forward-process flow matching on clean ODE samples, docs/algorithms.md §7) | awm
    (Advantage Weighted Matching, §8). nft/awm settings: the `forward` section."""
    epochs: int = 150
    learning_rate: float = 1e-2
    """AdamW lr. The default suits the tiny CPU demo; real-model recipes set their own
    (Flow-GRPO LoRA: 3e-4)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batch_size: int = 0
    """Samples per training forward; 0 = rollout.batch_size (keeps the rollout's batch
    composition, so the first ratio is exactly 1), or one optimizer step's samples when
    steps_per_epoch makes a step smaller than a rollout batch."""
    steps_per_epoch: int = 1
    """Optimizer steps per epoch; each accumulates over its share of samples x trained steps."""
    clip_range: float = 1e-4
    """epsilon of the clipped objective (tiny: log-probs are per-element means)."""
    clip_range_low: float = -1.0
    """Asymmetric lower epsilon; <0 = clip_range."""
    clip_range_high: float = -1.0
    """Asymmetric upper epsilon; <0 = clip_range."""
    beta: float = 0.0
    """KL weight; 0 skips the reference forward entirely. nft/awm: weight of
    mean_D((v_theta - v_ref)^2) (docs/algorithms.md §7)."""
    kl_estimator: str = "flow_grpo"
    """flow_grpo (published) | exact."""
    adv_clip_max: float = 5.0
    global_std: bool = True
    """Normalise advantages by the std of all rewards of the epoch (published default)."""
    drop_zero_std: bool = False
    """Drop groups whose rewards are all equal from the update."""
    kernels: str = "auto"
    """Re-scoring/loss kernels: auto (Triton on CUDA, torch elsewhere) | triton | torch."""
    ratio_norm: bool = False
    """GRPO-Guard RatioNorm: log-ratio = mean_D(eps * (mu_theta - mu_old)), eps the rollout
    noise; the rollout stores its SDE means for it (docs/algorithms.md §5)."""
    gradient_reweight: bool = False
    """GRPO-Guard: divide each step's policy loss by |dt| (squared batch mean of sqrt|dt|)."""
    ema: bool = False
    """Keep an EMA of the trainable weights; evaluation and trainable_ema.safetensors use it."""
    ema_decay: float = 0.9
    """EMA decay (Flow-GRPO: 0.9), warmed up as min((1 + n) / (10 + n), decay)."""
    ema_update_interval: int = 8
    """Update the EMA every N optimizer steps (Flow-GRPO: 8)."""
    ema_warmup: bool = True
    """Ramp the decay from 0.1 with min((1 + n) / (10 + n), decay), n = optimizer steps."""
    max_nonfinite_steps: int = 3
    """Consecutive optimizer steps that may be skipped for a non-finite loss, log-probability
    or gradient norm before the run stops with an error naming the epoch and the quantity. A
    skipped step leaves the weights and the optimizer state as they were (counted in
    train/skipped_steps); a later finite step resets the count."""
    lora: bool = True
    """LoRA through peft (default) or full fine-tuning."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    anchor_weight: float = 0.0
    """Drawing anchor: weight of a flow-matching loss on clean images of the task's own world,
    added to every training loss beside the RL loss, so the policy keeps drawing as its base
    did while the reward moves it (docs/algorithms.md, "The drawing anchor"). 0 = off. Needs
    a pixel-space shapes-world model (its scenes are the images)."""
    anchor_batch: int = 8
    """Images of the anchor per training loss."""
    anchor_prompts: str = "empty"
    """empty: the anchor's images are denoised unconditionally (no caption: it teaches how the
    world looks, not which words go with it) | captions: under their pretraining captions, with
    the base's caption noise (the base's own objective, "ptx")."""


@dataclass
class ForwardConfig:
    """train.algorithm = nft | awm: forward-process RL on clean samples (docs/algorithms.md §7,
    §8). Defaults are the published SD3.5-M settings."""

    nft_beta: float = 1.0
    """DiffusionNFT beta: v+ = v_old + beta (v_theta - v_old), v- = v_old - beta (...); 1.0
    published (GenEval, PickScore), 0.1 for OCR and the multi-reward run."""
    adaptive_weighting: bool = True
    """nft: the paper's self-normalised x0-space loss weight; false = plain velocity MSE."""
    nft_positive_only: bool = False
    """nft: clip the optimality probability r to [1/2, 1], so samples below their group's mean
    are not pushed away from (their loss only holds the policy at the old one) and the update
    learns from the better samples alone, as reward-weighted fine-tuning does. An experiment
    against the drift of long runs (docs/results.md, "Without the negative branch"); the paper
    uses both branches (false)."""
    old_decay_rate: float = 0.001
    """Old-policy (EMA) decay eta = min(rate * max(n - delay, 0), max), n = optimizer steps;
    old <- eta old + (1 - eta) theta after every epoch."""
    old_decay_max: float = -1.0
    """Cap of eta; < 0 = the algorithm's published value (nft 0.5, awm 0.3)."""
    old_decay_delay: int = 0
    """Optimizer steps before eta leaves 0 (DiffusionNFT OCR: 75, rate 0.0075, max 0.999)."""
    rollout_guidance_scale: float = 0.0
    """CFG scale of the rollouts (the samples the policy learns from); 0 = sampling.guidance_scale.
    The training forwards and the evaluations keep sampling.guidance_scale (eval.guidance_scale):
    e.g. 3 here and 1 there trains a CFG-free policy on guided samples of its old policy, which
    the reward then sorts into better and worse (the loss needs only clean samples and their
    rewards, not their sampler). It does not distill the guidance: on the shapes world it made
    the CFG-free policy worse (docs/algorithms.md §7, docs/results.md)."""
    num_times: int = 0
    """K training times per sample; 0 = floor(T * rollout.timestep_fraction) (schedule times),
    one less (stratified). AWM published 6 (T = 14, fraction 0.9)."""
    times: str = "auto"
    """auto (nft: schedule, awm: stratified) | schedule (per sample, K of the rollout's sigmas
    without replacement) | stratified (one step index per stratum, shared by the batch)."""
    awm_weighting: str = "ghuber"
    """AWM time weighting of the flow-matching log-likelihood: uniform | t | t2 | huber |
    ghuber (docs/algorithms.md §8)."""
    awm_ghuber_power: float = 0.25
    awm_clip_range: float = 1.0
    """AWM ratio clip epsilon (published 1.0)."""
    awm_adv_scale: float = 1.0
    """AWM advantages are A / train.adv_clip_max * this (published advantage_max = 1)."""
    awm_ema_beta: float = 1.0
    """AWM weight of mean_D((v_theta - v_ema)^2), the KL to the EMA (old) policy."""


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"jpeg_incompressibility": 1.0})
    """Reward name -> weight; the training reward is the weighted sum of raw scores."""
    num_workers: int = 2
    """Threads scoring images while the next batch samples."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per reward: {name: {option: value}}. Scorer options (model_dir, ...) go to the reward;
    `failure: raise|mask` is the failure policy (mask = drop unscorable samples from the update
    and count them); `url` (+ token/token_env, timeout_s, deadline_s, batch_size,
    max_concurrency, backoff_s) scores through a `flowpo serve-reward` service instead."""
    group_normalize: bool = False
    """Normalise each reward within its group (mean/std of the G images of a prompt) before
    weighting, so weights set relative importance whatever each reward's scale."""


@dataclass
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 | 2 | 3 (templates in ds_configs/)."""
    ds_config: str = ""
    """Custom DeepSpeed JSON template; empty = ds_configs/zero{stage}.json."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (DeepSpeed mixed precision). fp16 is DeepSpeed's fp16 mode: the
    transformer in float16 (model.dtype=float16), fp32 master weights in the optimizer, and
    dynamic loss scaling (the fp16_* fields); steps whose scaled gradients overflow are skipped
    and counted (train/overflow_steps). SD3 only: FLUX, Qwen-Image and Bagel train in bf16."""
    fp16_initial_scale_power: int = 16
    """fp16: the loss scale starts at 2**power (DeepSpeed's fp16.initial_scale_power)."""
    fp16_loss_scale_window: int = 1000
    """fp16: optimizer steps without an overflow before the loss scale doubles
    (fp16.loss_scale_window)."""
    fp16_hysteresis: int = 2
    """fp16: overflows tolerated before the loss scale is halved (fp16.hysteresis, the delayed
    shift; ZeRO-2/3 only: without ZeRO every overflow halves it)."""
    fp16_min_loss_scale: int = 1
    """fp16: the loss scale never goes below this (fp16.min_loss_scale); an overflow at this
    scale is a non-finite gradient, counted toward train.max_nonfinite_steps."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the transformer blocks (recompute in backward)."""
    offload_optimizer: bool = False
    """ZeRO-2/3: keep the optimizer state (fp32 master, Adam moments) in CPU memory."""
    offload_params: bool = False
    """ZeRO-3 only: keep the partitioned parameters in CPU memory between uses."""
    shard_frozen: bool = False
    """ZeRO-3 only: partition the frozen text encoders and VAE too (inference engines); every
    prompt is then encoded once at start."""
    compile: bool = False
    """torch.compile each repeated transformer block (regional compilation), LoRA or full
    fine-tuning, ZeRO-0/2. CPU, tiny SD3: 1.46x faster steady epochs after a ~2 min cold
    compile (docs/gpu.md)."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs"
    """Parent folder of run directories."""
    run_name: str = ""
    """Run directory name; empty = <recipe>-<timestamp>."""
    wandb: str = "auto"
    """auto (online if WANDB_API_KEY is set, else offline) | offline | online | off."""
    tensorboard: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    every: int = 25
    """Evaluate every N epochs (0 = only at start and end)."""
    at_start: bool = True
    """Evaluate before the first epoch (the summary's `before`; kept in the checkpoint for
    resume). false: no start evaluation, and the summary has no eval_start."""
    at_end: bool = True
    """Evaluate after the last epoch (samples_end.png, the summary's `after`). false: no end
    evaluation, and the summary has no eval_end."""
    prompt_file: str = ""
    """Eval prompts (.txt, GenEval .jsonl, or shapes:heldout); empty = `prompts`, else the
    training prompts."""
    prompts: list[str] = field(default_factory=list)
    num_prompts: int = 4
    """Use the first N eval prompts (0 = all)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Initial-noise seeds: every prompt is sampled once per seed (ODE, deterministic)."""
    guidance_scale: float = 0.0
    """CFG scale of the evaluations; 0 = sampling.guidance_scale (the rollouts'). E.g. 3
    evaluates a CFG-free DiffusionNFT run the way configs/shapes.yaml's Flow-GRPO runs sample."""
    grid_prompts: int = 8
    """Prompts shown in the sample grids (rows); columns are the seeds (at most 8)."""
    train_prompts: int = 0
    """Also evaluate this many training prompts (spread evenly over the training set, first 8
    seeds), reported beside the held-out accuracy as eval_train/*; 0 = off."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N epochs (0 = only at the end)."""
    keep_last_n: int = 2
    resume: str = ""
    """Checkpoint directory or `latest` (the newest in the run directory)."""


SECTIONS = {
    "model": ModelConfig,
    "sampling": SamplingConfig,
    "rollout": RolloutConfig,
    "train": TrainConfig,
    "forward": ForwardConfig,
    "reward": RewardConfig,
    "engine": EngineConfig,
    "logging": LoggingConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
}

_CHOICES = {
    ("model", "family"): ("sd3", "flux", "qwen_image", "bagel", "auto"),
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("sampling", "sde_type"): ("flow", "cps", "dance"),
    ("sampling", "logprob_reduce"): ("mean", "sum"),
    ("rollout", "window_placement"): ("random", "progressive", "fixed"),
    ("train", "algorithm"): ("grpo", "nft", "awm"),
    ("train", "kl_estimator"): ("flow_grpo", "exact"),
    ("train", "anchor_prompts"): ("empty", "captions"),
    ("forward", "times"): ("auto", "schedule", "stratified"),
    ("forward", "awm_weighting"): ("uniform", "t", "t2", "huber", "ghuber"),
    ("train", "kernels"): ("auto", "triton", "torch"),
    ("engine", "zero_stage"): (0, 2, 3),
    ("engine", "precision"): ("fp32", "bf16", "fp16"),
    ("logging", "wandb"): ("auto", "offline", "online", "off"),
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    recipe: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def clip_low(self) -> float:
        c = self.train.clip_range_low
        return self.train.clip_range if c < 0 else c

    @property
    def clip_high(self) -> float:
        c = self.train.clip_range_high
        return self.train.clip_range if c < 0 else c

    @property
    def micro_batch_size(self) -> int:
        """train.micro_batch_size, or for 0 the rollout batch (one optimizer step's samples when
        steps_per_epoch splits the epoch finer than its rollout batches)."""
        if self.train.micro_batch_size:
            return self.train.micro_batch_size
        per_step = self.samples_per_rank() // max(self.train.steps_per_epoch, 1)
        return min(self.rollout.batch_size, per_step) if per_step > 0 else self.rollout.batch_size

    def samples_per_rank(self) -> int:
        return self.rollout.batch_size * self.rollout.num_batches

    def derived_sizes(
        self, world_size: int, num_trained_steps: int, images_per_sample: int = 1
    ) -> dict[str, int]:
        """Sizes implied by the config for a world size, the plan's trained transitions per
        sample K and images per sample R (K for E-GRPO's per-transition branches, else 1).

        The update makes K backward calls per micro-batch (one per trained transition), so
        DeepSpeed's gradient_accumulation_steps is (samples per optimizer step / micro-batch)
        x K: the optimizer steps exactly at the end of each share of the epoch."""
        per_rank = self.samples_per_rank()
        per_step = per_rank // self.train.steps_per_epoch
        mb = self.micro_batch_size
        return {
            "world_size": world_size,
            "images_per_epoch": per_rank * world_size * images_per_sample,
            "prompts_per_epoch": per_rank * world_size // self.rollout.group_size,
            "group_size": self.rollout.group_size,
            "samples_per_rank_per_optimizer_step": per_step,
            "micro_batch_size": mb,
            "trained_steps_per_sample": num_trained_steps,
            "gradient_accumulation_steps": (per_step // mb) * num_trained_steps,
            "optimizer_steps_per_epoch": self.train.steps_per_epoch,
        }

    def validate(self, world_size: int = 1, training: bool = True) -> None:
        """Cross-field rules; each error names the field and the fix. `training=False` (flowpo
        eval) skips the rules that only the training engine needs. The checks against things
        outside the config (files, registries) are `flowpo.trainer.preflight`, which runs this
        first."""
        for (section, name), choices in _CHOICES.items():
            value = getattr(getattr(self, section), name)
            if value not in choices:
                raise ConfigError(
                    f"{section}.{name}={value!r} is not allowed; choose one of: "
                    + ", ".join(str(c) for c in choices)
                )
        check_finite(self)
        r, t, s = self.rollout, self.train, self.sampling
        positive = [
            ("rollout.group_size", r.group_size),
            ("rollout.batch_size", r.batch_size),
            ("rollout.num_batches", r.num_batches),
            ("sampling.num_steps", s.num_steps),
            ("train.epochs", t.epochs),
            ("train.steps_per_epoch", t.steps_per_epoch),
            ("train.max_nonfinite_steps", t.max_nonfinite_steps),
        ]
        for key, value in positive:
            if value < 1:
                raise ConfigError(f"{key} ({value}) must be >= 1")
        if s.num_steps < 2:
            raise ConfigError("sampling.num_steps must be >= 2 (the last step is always ODE)")
        if self.eval.guidance_scale < 0:
            raise ConfigError(
                f"eval.guidance_scale ({self.eval.guidance_scale}) must be >= 0 "
                "(0 = sampling.guidance_scale)"
            )
        if not 0.0 < r.timestep_fraction <= 1.0:
            raise ConfigError(
                f"rollout.timestep_fraction ({r.timestep_fraction}) must be in (0, 1]"
            )
        if s.noise_level <= 0:
            raise ConfigError("sampling.noise_level must be > 0 (0 is the ODE: no log-probability)")
        images = world_size * self.samples_per_rank()
        if images % r.group_size:
            raise ConfigError(
                f"rollout.group_size ({r.group_size}) must divide the images per epoch "
                f"(world {world_size} x rollout.batch_size {r.batch_size} x rollout.num_batches "
                f"{r.num_batches} = {images}); change group_size or the batch layout"
            )
        per_rank = self.samples_per_rank()
        if per_rank % t.steps_per_epoch:
            raise ConfigError(
                f"train.steps_per_epoch ({t.steps_per_epoch}) must divide the samples per rank "
                f"per epoch ({per_rank} = rollout.batch_size x rollout.num_batches)"
            )
        mb = self.micro_batch_size
        if (per_rank // t.steps_per_epoch) % mb:
            raise ConfigError(
                f"train.micro_batch_size ({mb}) must divide the samples per rank per optimizer "
                f"step ({per_rank // t.steps_per_epoch}); use a divisor or 0 (= rollout.batch_size, or the step's samples if fewer)"
            )
        if not r.prompt_file and not r.prompts:
            raise ConfigError("rollout.prompts is empty; give prompts or rollout.prompt_file")
        if r.tag_weights and (
            any(not isinstance(w, (int, float)) or w < 0 for w in r.tag_weights.values())
            or sum(r.tag_weights.values()) <= 0
        ):
            raise ConfigError(
                f"rollout.tag_weights ({r.tag_weights}) must map tags to weights >= 0 with a "
                "positive sum, e.g. {two_object: 1, position: 1}; {} draws every prompt equally"
            )
        e = self.engine
        if e.offload_params and e.zero_stage != 3:
            raise ConfigError(
                f"engine.offload_params needs engine.zero_stage=3 (got {e.zero_stage}); "
                "set zero_stage=3 or offload_params=false"
            )
        if e.shard_frozen and e.zero_stage != 3:
            raise ConfigError(
                f"engine.shard_frozen needs engine.zero_stage=3 (got {e.zero_stage}); "
                "set zero_stage=3 or shard_frozen=false"
            )
        self._validate_precision(training)
        if e.compile and e.zero_stage == 3:
            # measured: dynamo traces into ZeRO-3's gather/release hooks of every submodule and
            # hits its recompile limit (the blocks fall back to eager, after minutes of tracing)
            raise ConfigError(
                "engine.compile does not work with engine.zero_stage=3 (torch.compile traces "
                "into ZeRO-3's parameter hooks); use zero_stage 0 or 2, or engine.compile=false"
            )
        if e.offload_optimizer and e.zero_stage == 0:
            raise ConfigError(
                "engine.offload_optimizer needs ZeRO (engine.zero_stage=2 or 3); set one of them "
                "or offload_optimizer=false"
            )
        if not self.reward.weights:
            raise ConfigError("reward.weights is empty; name at least one reward")
        if t.beta < 0:
            raise ConfigError(f"train.beta ({t.beta}) must be >= 0")
        if t.anchor_weight < 0:
            raise ConfigError(f"train.anchor_weight ({t.anchor_weight}) must be >= 0 (0 = off)")
        if t.anchor_batch < 1:
            raise ConfigError(f"train.anchor_batch ({t.anchor_batch}) must be >= 1")
        if t.ratio_norm and s.cps_legacy_scale:
            raise ConfigError(
                "train.ratio_norm needs Gaussian log-probs (its closed form is their identity); "
                "set sampling.cps_legacy_scale=false or train.ratio_norm=false"
            )
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay ({t.ema_decay}) must be in [0, 1)")
        if t.ema_update_interval < 1:
            raise ConfigError(f"train.ema_update_interval ({t.ema_update_interval}) must be >= 1")
        if s.shift < 0:
            raise ConfigError(f"sampling.shift ({s.shift}) must be >= 0 (0 = the model's own)")

    def _validate_precision(self, training: bool) -> None:
        """engine.precision against model.dtype, and the fp16 loss-scaler fields."""
        e, dtype = self.engine, self.model.dtype
        if not 0 <= e.fp16_initial_scale_power <= 64:
            raise ConfigError(
                f"engine.fp16_initial_scale_power ({e.fp16_initial_scale_power}) must be in "
                "0..64 (the loss scale starts at 2**power; DeepSpeed's default is 16)"
            )
        for key, value in (
            ("engine.fp16_loss_scale_window", e.fp16_loss_scale_window),
            ("engine.fp16_hysteresis", e.fp16_hysteresis),
            ("engine.fp16_min_loss_scale", e.fp16_min_loss_scale),
        ):
            if value < 1:
                raise ConfigError(f"{key} ({value}) must be >= 1")
        if e.fp16_min_loss_scale > 2**e.fp16_initial_scale_power:
            raise ConfigError(
                f"engine.fp16_min_loss_scale ({e.fp16_min_loss_scale}) must not exceed the "
                f"initial loss scale 2**engine.fp16_initial_scale_power "
                f"({2**e.fp16_initial_scale_power})"
            )
        if not training:
            return
        if dtype == "float16" and e.precision != "fp16":
            # DeepSpeed reduces float16 gradients only in its fp16 mode (loss scaling)
            raise ConfigError(
                f"model.dtype=float16 trains only with engine.precision=fp16 (loss scaling), "
                f"not {e.precision}; set engine.precision=fp16, or model.dtype=bfloat16 with "
                "engine.precision=bf16"
            )
        # DeepSpeed's bf16/fp16 engines cast the trained module to their dtype while the adapter
        # feeds it inputs in model.dtype: torch stops on the first layer with a dtype clash
        for precision, want in (("bf16", "bfloat16"), ("fp16", "float16")):
            if e.precision == precision and dtype != want:
                raise ConfigError(
                    f"engine.precision={precision} runs the transformer in {want}, but "
                    f"model.dtype is {dtype!r}; set model.dtype={want} (or engine.precision=fp32)"
                )


def check_finite(cfg: Config) -> None:
    """Every float of the config (lists and mappings of floats included) is a finite number:
    a NaN or infinite noise level, learning rate or weight would otherwise train on, silently,
    with a NaN loss. Free-form option mappings (`Any`) are their consumers' to check."""
    for section in SECTIONS:
        values = getattr(cfg, section)
        for name, tp in _field_types(type(values)).items():
            _check_finite_value(f"{section}.{name}", getattr(values, name), tp)


def _check_finite_value(key: str, value: Any, tp: Any) -> None:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check_finite_value(f"{key}[{i}]", v, item)
    elif origin is dict:
        _, vt = typing.get_args(tp)
        for k, v in value.items():
            _check_finite_value(f"{key}.{k}", v, vt)
    elif tp is float and isinstance(value, (int, float)) and not math.isfinite(value):
        raise ConfigError(f"{key} ({value}) must be a finite number")


# -- loading ---------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `key`."""
    if tp is Any:  # free-form values (reward.options), checked by their consumer
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _parse_mapping(key, value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan, inf, 1e999: never a usable setting
            raise ConfigError(f"{key} ({value}) must be a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _parse_mapping(key: str, text: str) -> dict:
    """`a:1,b:0.5` or JSON/YAML mapping text -> dict."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    out = {}
    for part in text.split(","):
        if ":" not in part:
            raise ConfigError(f"{key}: expected 'name:weight,...', got {text!r}")
        k, v = part.split(":", 1)
        out[k.strip()] = v.strip()
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"unknown config {kind} '{name}'{hint}")


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.field` on cfg from a YAML value or a command-line string."""
    if "." not in dotted:
        if dotted == "recipe":
            cfg.recipe = str(value)
            return
        raise _unknown("key", dotted, [f"{s}.<field>" for s in SECTIONS])
    section, name = dotted.split(".", 1)
    if section not in SECTIONS:
        raise _unknown("section", section, list(SECTIONS))
    types_ = _field_types(SECTIONS[section])
    if name not in types_:
        raise _unknown("key", dotted, [f"{section}.{k}" for k in types_])
    setattr(getattr(cfg, section), name, _coerce(dotted, value, types_[name]))


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML recipe <- `section.field=value` overrides."""
    cfg = Config()
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe '{recipe}' does not exist (recipes live in configs/)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe '{recipe}' must be a mapping of sections")
        cfg.recipe = path.stem
        for section, values in data.items():
            if section == "recipe":
                cfg.recipe = str(values)
                continue
            if section not in SECTIONS:
                raise _unknown("section", section, list(SECTIONS))
            if not isinstance(values, dict):
                raise ConfigError(f"section '{section}' in {recipe} must be a mapping")
            for name, value in values.items():
                set_value(cfg, f"{section}.{name}", value)
    apply_overrides(cfg, overrides or [])
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """Apply `--section.field=value` strings in order."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override '{item}' must look like --section.field=value")
        key, value = text.split("=", 1)
        set_value(cfg, key, value)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (resolved config files)."""
    cfg = Config()
    for section, values in data.items():
        if section == "recipe":
            cfg.recipe = values
            continue
        for name, value in values.items():
            set_value(cfg, f"{section}.{name}", value)
    return cfg
