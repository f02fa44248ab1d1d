"""Everything DeepSpeed and everything distributed: the process group, ZeRO config, LoRA/full
fine-tuning, reference policy, backward/step, the engine's own state in a checkpoint, and every
collective (`Collectives`, which the Engine is). The only module that imports deepspeed, and the
only one that calls torch.distributed.

Launch lines:
    python -m flowpo train ...                       # one rank (CPU or one GPU)
    deepspeed --num_gpus 2 --module flowpo train ...         # one node, 2 ranks
    deepspeed --hostfile hostfile --module flowpo train ...  # several nodes
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowpo.config import Config, ConfigError
from flowpo.trainer.jit_lock import guard_extension_locks, lock_path
from flowpo.trainer.nonfinite import GRAD_NORM

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Start (or join) the process group; returns (rank, world_size, local_rank).

    A plain `python -m flowpo ...` gets a one-rank group on a free loopback port; under the
    `deepspeed`/`torchrun` launchers the environment variables they set are used as they are.
    """
    import deepspeed  # heavy: imported only when a run starts

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        # a stale JIT-build lock would make this wait forever: stop with the file and the fix
        with guard_extension_locks(_jit_lock_paths()):
            deepspeed.init_distributed(dist_backend=backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, world, local_rank


def _jit_lock_paths() -> list[Path]:
    """The JIT-build lock files DeepSpeed's process-group start takes in this process: its
    shared-memory comm op's, where the accelerator builds it on first use (CPU) rather than
    shipping it prebuilt (trainer/jit_lock.py)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return []
    if installed_ops.get(builder.NAME, False):
        return []
    return [lock_path(builder.NAME)]


def build_jit_ops() -> list[str]:
    """Build (or, when built, check) the ops DeepSpeed JIT-loads at the process-group start,
    under the stale-lock guard; returns their names. scripts/setup.sh runs it once, so that the
    first run does not spend a minute compiling under a lock a killed start-up would leave."""
    from deepspeed.accelerator import get_accelerator

    paths = _jit_lock_paths()
    if paths:  # the shm comm op, the one DeepSpeed JIT-loads at start
        with guard_extension_locks(paths):
            get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    return [p.parent.name for p in paths]


def close_distributed(barrier: bool = True) -> None:
    # gloo sometimes aborts a rank at exit when the group is left open (docs/environment.md)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _optimizer_step_suppressed(optimizer):
    """The torch optimizer's `step` is a no-op inside the block (an instance attribute shadows
    the class's method; removed on exit): DeepSpeed's step then keeps its own bookkeeping
    (counters, zero_grad) without touching the weights or the Adam moments."""
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step


def build_ds_config(cfg: Config, world_size: int, grad_accum: int) -> dict[str, Any]:
    """Fill a ds_configs/ template's batch, clipping and precision fields from the trainer config."""
    path = (
        Path(cfg.engine.ds_config)
        if cfg.engine.ds_config
        else DS_CONFIG_DIR / (f"zero{cfg.engine.zero_stage}.json")
    )
    if not path.is_file():
        raise ConfigError(f"engine.ds_config '{path}' does not exist")
    ds = json.loads(path.read_text())
    mb = cfg.micro_batch_size
    ds["train_micro_batch_size_per_gpu"] = mb
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = mb * grad_accum * world_size
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    bf16 = ds.setdefault("bf16", {})
    bf16["enabled"] = cfg.engine.precision == "bf16"
    # skip steps with non-finite gradients (DeepSpeed's default today; the trainer relies on it)
    bf16.setdefault("check_grad_overflow", True)
    e = cfg.engine
    fp16 = ds.setdefault("fp16", {})
    fp16["enabled"] = e.precision == "fp16"
    if fp16["enabled"]:  # dynamic loss scaling (loss_scale 0) with the engine.fp16_* fields
        fp16.update(
            loss_scale=0,
            initial_scale_power=e.fp16_initial_scale_power,
            loss_scale_window=e.fp16_loss_scale_window,
            hysteresis=e.fp16_hysteresis,
            min_loss_scale=e.fp16_min_loss_scale,
        )
    ds.setdefault("zero_optimization", {})["stage"] = cfg.engine.zero_stage
    zero = ds["zero_optimization"]
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # we pass a torch optimizer; DeepSpeed's CPU Adam is only needed for optimizer offload
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def reference_ds_config(policy_ds: dict[str, Any], world_size: int) -> dict[str, Any]:
    """An inference-only ZeRO-3 config for the frozen reference policy: sharded like the policy
    (same persistence threshold, precision and parameter offload), no optimizer."""
    pz = policy_ds.get("zero_optimization", {})
    zero = {"stage": 3}
    for key in ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size"):
        if key in pz:
            zero[key] = pz[key]
    if "offload_param" in pz:
        zero["offload_param"] = pz["offload_param"]
    mb = policy_ds["train_micro_batch_size_per_gpu"]
    return {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1,
        "train_batch_size": mb * world_size,
        "zero_optimization": zero,
        "bf16": dict(policy_ds.get("bf16", {"enabled": False})),
        "fp16": {"enabled": bool(policy_ds.get("fp16", {}).get("enabled", False))},
        "steps_per_print": policy_ds.get("steps_per_print", 10**9),
    }


def shard_frozen_modules(cfg: Config, modules: dict[str, nn.Module], world_size: int) -> list:
    """Partition frozen modules (text encoders, VAE) with ZeRO-3 inference engines
    (engine.shard_frozen). ZeRO-3's gather hooks sit on the modules themselves, so the pipeline
    keeps calling them as before; the returned engines must stay alive. Every call is collective:
    all ranks must make the same calls in the same order."""
    import deepspeed

    ds = reference_ds_config(build_ds_config(cfg, world_size, grad_accum=1), world_size)
    engines = []
    for name, m in modules.items():
        engine, *_ = deepspeed.initialize(model=m, config=ds)
        engine.eval()
        engines.append(engine)
        held = sum(
            p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in m.parameters()
        )
        total = sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters())
        if torch.distributed.get_rank() == 0:
            print(f"ZeRO-3 sharded {name}: {held:,} of {total:,} parameters on rank 0", flush=True)
    return engines


def check_fp16_supported() -> None:
    """Stop with one line where DeepSpeed's accelerator refuses fp16 ("Type fp16 is not supported
    on your device"): its CPU accelerator reports fp16 only where
    torch.ops.mkldnn._is_mkldnn_fp16_supported() is true (a CPU with AVX512-FP16 or AMX-FP16);
    docs/environment.md."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not acc.is_fp16_supported():
        raise ConfigError(
            f"engine.precision=fp16: DeepSpeed's {acc.device_name()} accelerator reports no fp16 "
            "support on this machine (on CPU it needs AVX512-FP16 or AMX-FP16); train with "
            "engine.precision=bf16 or fp32 here, fp16 on a GPU"
        )


def _setup_fp16(ds) -> bool:
    """After deepspeed.initialize in fp16 mode (deepspeed 0.19.8, each measured):
    - the ZeRO loss scaler floors at min_loss_scale instead of raising; the engine turns an
      overflow at the floor into a non-finite gradient (train.max_nonfinite_steps);
    - without ZeRO, FP16_UnfusedOptimizer's constructor runs one optimizer step on zero
      gradients to create the state: AdamW counts it (the first real update came out 0.74x as
      large, Adam's bias correction of step 2) and applies weight decay to the fp32 masters.
      Undone: the state is dropped (AdamW re-creates it) and the masters are copied back from
      the float16 weights they were cloned from.
    Returns whether the engine must scale the loss itself: without ZeRO, DeepSpeed's
    engine.backward never multiplies the loss by the scale while FP16_UnfusedOptimizer still
    divides the gradients by it (updates ~2**16 times too small, no overflow ever seen;
    deepspeedai/DeepSpeed PR #8393)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    opt = ds.optimizer
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "raise_error_at_min_scale"):
        scaler.raise_error_at_min_scale = False
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        opt.optimizer.state.clear()
        with torch.no_grad():
            for masters, weights in zip(opt.fp32_groups, opt.fp16_groups):
                for master, weight in zip(masters, weights):
                    master.copy_(weight)
    own = not isinstance(opt, ZeROOptimizer)
    return own and getattr(ds, "torch_autocast_z0_gradscaler", None) is None


class Collectives:
    """Every collective the trainer makes, over the process group of `init_distributed`. On one
    rank each is a no-op that returns its input, so a one-rank run never waits on the group.
    The Engine is one (it inherits these); the trainer uses a bare one only before the model,
    and so the Engine, exists."""

    def __init__(self, rank: int, world_size: int, device: torch.device | str | None = None):
        self.rank, self.world_size = rank, world_size
        if device is None:
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu"
        self.device = torch.device(device)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable objects)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order (picklable objects)."""
        if self.world_size == 1:
            return [obj]
        everyone: list = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, obj)
        return everyone

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from all ranks along dim 0 (rank order)."""
        if self.world_size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts, 0)

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's integer."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def mean_over_ranks(self, metrics: dict[str, float], maxed=()) -> dict[str, float]:
        """Mean over ranks of each value (max for the keys in `maxed`), in float64, so logs
        describe the global batch."""
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        m = torch.tensor([metrics[k] if k in maxed else 0.0 for k in keys], dtype=torch.float64)
        m = m.to(self.device)
        torch.distributed.all_reduce(t)
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
        return {
            k: float(m[i] if k in maxed else t[i] / self.world_size) for i, k in enumerate(keys)
        }


def process_group() -> Collectives:
    """Collectives over the process group this process is in; one rank (every collective a
    no-op) when there is none, e.g. under `flowpo eval`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Collectives(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Collectives(0, 1, device="cpu")


class Engine(Collectives):
    """Owns the DeepSpeed engine wrapping the trainable module, and (as Collectives) every
    distributed call."""

    def __init__(
        self,
        cfg: Config,
        module: nn.Module,
        *,
        lora_targets: list[str],
        full_trainable=None,
        grad_accum: int,
        rank: int,
        world_size: int,
        device: torch.device | str | None = None,
    ):
        import deepspeed

        super().__init__(rank, world_size, device)
        self.cfg = cfg
        self.lora = cfg.train.lora
        self.ref_module: nn.Module | None = None
        if cfg.engine.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        if self.lora:
            from peft import LoraConfig

            module.requires_grad_(False)
            # Gaussian A, zero B: the adapted model equals the base at init (Flow-GRPO's choice)
            module.add_adapter(
                LoraConfig(
                    r=cfg.train.lora_rank,
                    lora_alpha=cfg.train.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=lora_targets,
                )
            )
        else:
            # the frozen reference: a copy of the base taken before DeepSpeed wraps the policy
            # (only when the KL term needs it); under ZeRO-3 it is sharded like the policy
            ref = copy.deepcopy(module).requires_grad_(False).eval() if cfg.train.beta > 0 else None
            module.requires_grad_(True)
            if full_trainable is not None:  # the adapter's full-fine-tuning scope (Bagel: moe_gen)
                for name, p in module.named_parameters():
                    p.requires_grad_(bool(full_trainable(name)))
        self.compiled_blocks: list[str] = []
        if cfg.engine.compile:  # after LoRA: the compiled blocks trace the adapted layers
            from flowpo.models.compiled import compile_repeated_blocks

            self.compiled_blocks = compile_repeated_blocks(module)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("no trainable parameters; check train.lora and the LoRA targets")
        self.num_trainable = sum(p.numel() for p in params)
        t = cfg.train
        optimizer = torch.optim.AdamW(
            params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
            eps=t.adam_eps,
        )
        self.ds_config = build_ds_config(cfg, world_size, grad_accum)
        self.fp16 = cfg.engine.precision == "fp16"
        if self.fp16:
            check_fp16_supported()
        self.module, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.ds_config
        )
        self.overflow_steps = 0  # fp16: steps the loss scaler skipped (since this process began)
        self._prescale = self.fp16 and _setup_fp16(self.module)
        if not self.lora and ref is not None:
            if cfg.engine.zero_stage == 3:
                self.ref_module, *_ = deepspeed.initialize(
                    model=ref, config=reference_ds_config(self.ds_config, world_size)
                )
                self.ref_module.eval()
            else:
                self.ref_module = ref

    @property
    def zero3(self) -> bool:
        return self.cfg.engine.zero_stage == 3

    def partition_report(self) -> list[tuple[str, int, int, int]]:
        """(name, local numel, this rank's shard numel, full numel) per trainable-module
        parameter: under ZeRO-3 a partitioned parameter has local numel 0 and a 1/world shard."""
        rows = []
        for name, p in self.module.module.named_parameters():
            shard = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            full = int(getattr(p, "ds_numel", p.numel()))
            rows.append((name, p.numel(), shard, full))
        return rows

    # -- optimisation ---------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        if self._prescale:  # fp16 without ZeRO: the scaling DeepSpeed leaves out (_setup_fp16)
            loss = loss.float() * self.loss_scale
        self.module.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps

    @property
    def loss_scale(self) -> float:
        """fp16: the loss scaler's current scale; 1.0 otherwise."""
        if not self.fp16:
            return 1.0
        opt = self.module.optimizer
        if hasattr(opt, "loss_scale_config"):  # FP16_(Unfused)Optimizer, without ZeRO
            return float(opt.loss_scale_config.cur_scale)
        return float(opt.loss_scaler.cur_scale)  # the ZeRO optimizers

    def step(self, nonfinite: int = 0) -> int | None:
        """DeepSpeed's step: the optimizer steps only at the accumulation boundary. Returns None
        between boundaries; at a boundary, 0 when the update was applied (or, under fp16, skipped
        by the loss scaler for an overflow: `overflow_steps`, see `_step_fp16`), else the code
        (`flowpo.trainer.nonfinite`: 1 gradient norm, 2 loss, 3 log-probability) of the
        non-finite value that made every rank skip it. `nonfinite`: the worst code this rank saw
        since the last boundary (its backward carried NaN gradients, see
        `NonFiniteGuard.check`).

        A skipped step leaves the weights and the optimizer state untouched. DeepSpeed's ZeRO-2/3
        optimizers and its bf16 wrapper check the gradients themselves and skip (counted in its
        `skipped_steps`); without ZeRO in fp32 DeepSpeed steps the torch optimizer directly and
        would write NaN into the weights (both measured with deepspeed 0.19.8), so there the
        engine checks the gradients and suppresses the optimizer's step itself. The decision is
        agreed over ranks (max), so all ranks skip or step together."""
        ds = self.module
        if not ds.is_gradient_accumulation_boundary():
            ds.step()
            return None
        if self.fp16:
            return self._step_fp16(nonfinite)
        own_check = not hasattr(ds.optimizer, "overflow")  # the bare torch optimizer
        if self.cfg.engine.zero_stage == 0 or own_check:
            # DeepSpeed reports no global norm without ZeRO; the full grads are local here
            # (already averaged over ranks by DeepSpeed's backward at the boundary)
            grads = [p.grad for p in ds.parameters() if p.grad is not None]
            if grads:
                self._local_norm = float(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
                    )
                )
        if own_check:
            norm = getattr(self, "_local_norm", 0.0)
            code = self.max_over_ranks(max(nonfinite, 0 if math.isfinite(norm) else GRAD_NORM))
            if code:
                with _optimizer_step_suppressed(ds.optimizer):
                    ds.step()  # clipping and zero_grad run; the weights stay as they are
                ds.skipped_steps += 1
            else:
                ds.step()
            return code
        skipped = ds.skipped_steps
        ds.step()
        overflow = ds.skipped_steps > skipped
        code = self.max_over_ranks(max(nonfinite, GRAD_NORM if overflow else 0))
        if code and not overflow:  # the NaN-carrying backward makes DeepSpeed skip, always
            raise RuntimeError(
                "a non-finite value was seen before this optimizer step but DeepSpeed applied "
                "it; the weights may hold NaN"
            )
        return code

    def _step_fp16(self, nonfinite: int) -> int:
        """fp16 at a boundary: DeepSpeed's loss scaler checks the scaled gradients and skips the
        step on an overflow (every rank: ZeRO agrees on it, and without ZeRO the gradients are
        already averaged). An overflow with nothing non-finite seen and the scale above its
        floor is the scaler's normal work: counted in `overflow_steps`, returns 0. A non-finite
        loss or log-probability (`nonfinite`), or an overflow at the minimum scale (the
        gradient itself is non-finite), returns its code as the other precisions do."""
        ds = self.module
        scale, skipped = self.loss_scale, ds.skipped_steps
        ds.step()
        overflow = ds.skipped_steps > skipped
        if self._prescale:  # DeepSpeed's norm is of the scaled gradients here
            self._local_norm = float(ds.optimizer._global_grad_norm) / scale
        floor = overflow and scale <= self.cfg.engine.fp16_min_loss_scale
        code = self.max_over_ranks(max(nonfinite, GRAD_NORM if floor else 0))
        if code and not overflow:
            raise RuntimeError(
                "a non-finite value was seen before this optimizer step but DeepSpeed applied "
                "it; the weights may hold NaN"
            )
        if overflow and not code:
            self.overflow_steps += 1
        return code

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps applied so far (DeepSpeed counts accumulation boundaries; the skipped
        ones, non-finite gradients or fp16 overflows, are not updates)."""
        return int(self.module.global_steps) - int(self.module.skipped_steps)

    def grad_norm(self) -> float:
        """Norm of the last accumulated gradient (before clipping; inf or NaN after a skipped
        step)."""
        norm = None if self._prescale else self.module.get_global_grad_norm()
        if norm is None:
            norm = getattr(self, "_local_norm", None)
        return float(norm) if norm is not None else float("nan")

    def has_nonfinite_weights(self) -> bool:
        """Whether any trainable weight this rank holds (its ZeRO-3 shards) is NaN or infinite.
        Local: agree over ranks with `max_over_ranks`."""
        for p in self.module.module.parameters():
            if not p.requires_grad:
                continue
            held = p.ds_tensor if hasattr(p, "ds_tensor") else p
            if held.numel() and not bool(torch.isfinite(held.detach()).all()):
                return True
        return False

    def refresh_gathered(self, params) -> None:
        """ZeRO-3: after the partitions (ds_tensor) of `params` were changed in place (a weight
        swap, e.g. DiffusionNFT's old policy), drop the stale whole copies of those currently
        gathered (the persistent ones stay gathered between forwards), then re-gather the
        persistent ones, as DeepSpeed does after an optimizer step. Collective; a no-op
        without ZeRO-3."""
        if not self.zero3:
            return
        held = [
            p for p in params if getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"
        ]
        if held:
            held[0].partition(held)  # frees the whole copies; the partitions stay as they are
        persistent = [p for p in held if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].all_gather(persistent)

    @contextlib.contextmanager
    def reference(self):
        """The frozen base policy: LoRA adapters disabled, or the frozen copy (full FT)."""
        if self.lora:
            inner = self.module.module
            inner.disable_adapters()
            try:
                yield self.module
            finally:
                inner.enable_adapters()
        else:
            if self.ref_module is None:
                raise RuntimeError("no reference policy: it is built only when train.beta > 0")
            yield self.ref_module

    # -- checkpoints ----------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights (peft names) or, for full fine-tuning, the module's state dict (trained
        parameters and buffers; frozen parameters are the base model's), as full CPU tensors on rank 0 ({} on the other ranks). Under ZeRO-3 the shards are
        gathered one parameter at a time, so no rank ever holds the whole model at once.
        Collective: every rank must call it."""
        import deepspeed

        inner = self.module.module

        def gathered(params):
            if not self.zero3:
                return contextlib.nullcontext()
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

        if self.lora:
            from peft import get_peft_model_state_dict

            lora_params = [p for p in inner.parameters() if p.requires_grad]
            with gathered(lora_params):
                sd = get_peft_model_state_dict(inner) if self.is_rank0 else {}
                return {k: v.detach().cpu().clone() for k, v in sd.items()}
        params = dict(inner.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for key, value in inner.state_dict().items():
            if key in params and not params[key].requires_grad:
                continue  # outside the full-fine-tuning scope: the base model's, unchanged
            if key in params:
                with gathered([params[key]]):
                    if self.is_rank0:
                        out[key] = params[key].detach().cpu().clone()
            elif self.is_rank0:
                out[key] = value.detach().cpu().clone()
        return out

    def save(self, ckpt_dir: Path, client_state: dict[str, Any]) -> None:
        """DeepSpeed state (weights, optimizer, ZeRO partitions) of every rank under ckpt_dir."""
        self.module.save_checkpoint(
            str(ckpt_dir), tag="engine", client_state=client_state, exclude_frozen_parameters=True
        )

    def load(self, ckpt_dir: Path) -> dict[str, Any]:
        _, client_state = self.module.load_checkpoint(
            str(ckpt_dir), tag="engine", load_module_strict=False
        )
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed engine state under {ckpt_dir}/engine")
        return client_state
