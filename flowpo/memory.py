"""Memory model: parameter counts of the real models and per-rank ZeRO memory on N GPUs.

Two parts:

(a) **Counts.** The real diffusers/transformers classes are instantiated on the meta device
    (no weights, no memory) from the published config values below, and their tensors are
    counted: the trained network, its frozen encoders and VAE, and the LoRA parameters that
    peft would add for a rank and target list (walked from the actual `nn.Linear` shapes).

(b) **Accounting.** The standard ZeRO model-state accounting of Rajbhandari et al. 2020
    ("ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", arXiv 1910.02054,
    §3.1 and §5.1): mixed-precision Adam holds 2Ψ bytes of bf16 parameters, 2Ψ of bf16
    gradients and KΨ = 12Ψ of optimizer state (fp32 master weights, Adam m and v). Stage 1
    partitions the optimizer state over the N data-parallel ranks, stage 2 also the gradients,
    stage 3 also the parameters:

        stage 0: (2 + 2 + 12)Ψ     stage 2: 2Ψ + (2 + 12)Ψ/N     stage 3: (2 + 2 + 12)Ψ/N

    ZeRO-Offload (Ren et al. 2021, arXiv 2101.06840) moves the optimizer state and the gradient
    partitions to host memory; ZeRO-3 parameter offload (ZeRO-Infinity, arXiv 2104.07857) moves
    the parameter partitions there too. Frozen weights (the LoRA base, the frozen reference
    policy of full fine-tuning with β > 0, text encoders, VAE) cost 2 bytes each: replicated
    under ZeRO-0/2, partitioned like the policy under ZeRO-3 (text encoders and VAE stay
    replicated: flowpo keeps them outside the DeepSpeed engine).

    Two DeepSpeed details are modelled because the measurement (benchmarks/bench_memory.py)
    shows them: under ZeRO-3 a tensor with at most `stage3_param_persistence_threshold`
    elements is gathered once and then kept whole on every rank, and DeepSpeed's
    communication buckets and the ZeRO-3 gathered working set (the block being computed) live
    on the GPU. **Activations are excluded**: they depend on resolution, batch and
    checkpointing, and come on top of every number here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30

# -- published configs --------------------------------------------------------------------------
# Values copied from the config.json files of the Hugging Face repositories named above each;
# only fields that change a parameter shape are needed (the rest keep the class defaults).

# fmt: off
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual attention in
# the first 13 blocks). The 384×384 positional table is a persistent buffer (226M elements):
# parameters 2.24B + buffer 0.23B = the 2.5B of Stability's model card.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# Qwen/Qwen-Image, transformer/config.json (60 dual-stream blocks, width 24 × 128)
QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
# openai/clip-vit-large-patch14 text tower (SD3 text_encoder, FLUX text_encoder)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu",
)
# laion/CLIP-ViT-bigG-14 text tower (stable-diffusion-3.5-medium, text_encoder_2/config.json)
CLIP_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
    num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
)
# google/t5-v1_1-xxl encoder (SD3 text_encoder_3, FLUX text_encoder_2)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
)
# stable-diffusion-3.5-medium vae/config.json and FLUX.1-dev vae/config.json: the same
# 16-channel AutoencoderKL without quant convs (Bagel's ae.safetensors is FLUX's, docs/bagel.md §6)
VAE_16CH = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
    use_quant_conv=False, use_post_quant_conv=False,
)
# Qwen/Qwen2.5-VL-7B-Instruct config.json (Qwen-Image's text_encoder)
QWEN25_VL_7B = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    tie_word_embeddings=False,
)
# Qwen/Qwen-Image vae/config.json (AutoencoderKLQwenImage, Wan-style 3-D causal VAE)
QWEN_IMAGE_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)
# ByteDance-Seed/BAGEL-7B-MoT llm_config.json = Qwen2.5-7B-Instruct (docs/bagel.md §1), with the
# overrides the official code applies: untied lm_head; qk-norm and the MoT `*_moe_gen`
# duplicates are added in `_bagel` (docs/bagel.md §2)
BAGEL_LLM = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
)
# fmt: on
BAGEL_MAX_LATENT_SIZE = 64  # latent_pos_embed rows = 64² (docs/bagel.md §1)
BAGEL_PATCH_DIM = 64  # 2² × 16 latent channels (docs/bagel.md §1)


# -- meta-device builders -----------------------------------------------------------------------
def _sd35_medium() -> dict[str, nn.Module]:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    return {
        "policy": SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
        "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        "t5_xxl": T5EncoderModel(T5Config(**T5_XXL)),
        "vae": AutoencoderKL(**VAE_16CH),
    }


def _flux1_dev() -> dict[str, nn.Module]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    return {
        "policy": FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER),
        "clip_l": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        "t5_xxl": T5EncoderModel(T5Config(**T5_XXL)),
        "vae": AutoencoderKL(**VAE_16CH),
    }


def _qwen_image() -> dict[str, nn.Module]:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return {
        "policy": QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER),
        "qwen2.5_vl_7b": Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B)),
        "vae": AutoencoderKLQwenImage(**QWEN_IMAGE_VAE),
    }


def _bagel() -> dict[str, nn.Module]:
    """Bagel-7B-MoT's T2I module tree with the state-dict names of docs/bagel.md §2: transformers'
    Qwen2 (q/k/v with bias, o without) plus qk-norms and the generation expert's `*_moe_gen`
    copies of every attention projection, MLP and norm, and the latent heads. The SigLIP ViT
    and connector serve understanding only and are not built (Flow-GRPO: visual_und=False)."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

    cfg = Qwen2Config(**BAGEL_LLM)
    lm = Qwen2ForCausalLM(cfg)
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    for layer in lm.model.layers:
        att = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            src = getattr(att, name)
            gen = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None)
            setattr(att, name + "_moe_gen", gen)
        for name in ("q_norm", "k_norm", "q_norm_moe_gen", "k_norm_moe_gen"):
            setattr(att, name, Qwen2RMSNorm(hd))
        layer.mlp_moe_gen = Qwen2MLP(cfg)
        layer.input_layernorm_moe_gen = Qwen2RMSNorm(h)
        layer.post_attention_layernorm_moe_gen = Qwen2RMSNorm(h)
    lm.model.norm_moe_gen = Qwen2RMSNorm(h)

    bagel = nn.Module()
    bagel.language_model = lm
    bagel.time_embedder = nn.Module()
    bagel.time_embedder.mlp = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))
    bagel.vae2llm = nn.Linear(BAGEL_PATCH_DIM, h)
    bagel.llm2vae = nn.Linear(h, BAGEL_PATCH_DIM)
    bagel.latent_pos_embed = nn.Module()
    bagel.latent_pos_embed.pos_embed = nn.Parameter(
        torch.empty(BAGEL_MAX_LATENT_SIZE**2, h), requires_grad=False
    )
    return {"policy": bagel, "vae": AutoencoderKL(**VAE_16CH)}


def _bagel_gen_only(name: str) -> bool:
    # Flow-GRPO's full fine-tuning of Bagel trains only the generation expert (docs/bagel.md §9)
    return "moe_gen" in name


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], dict[str, nn.Module]]
    lora_targets: Sequence[str]
    lora_rank: int
    full_trainable: Callable[[str], bool] | None = None
    """Which policy parameters full fine-tuning trains (None: all)."""
    note: str = ""


def _adapter_targets(family: str) -> list[str]:
    from flowpo.models.bagel import BagelAdapter
    from flowpo.models.flux import FluxAdapter
    from flowpo.models.qwen_image import QwenImageAdapter
    from flowpo.models.sd3 import SD3Adapter

    adapters = {
        "sd3": SD3Adapter,
        "flux": FluxAdapter,
        "qwen_image": QwenImageAdapter,
        "bagel": BagelAdapter,  # docs/bagel.md §9: the generation expert's projections
    }
    return list(adapters[family].lora_targets)


# LoRA ranks: Flow-GRPO's SD3.5/FLUX recipes (configs/*_flow_grpo_*.yaml: r 32), Qwen-Image's
# (configs/qwen_image_pickscore.yaml: r 64 on the adapter's targets) and Bagel's (docs/bagel.md §9:
# r 64).
MODELS: dict[str, ModelSpec] = {
    "SD3.5-M": ModelSpec(
        "SD3.5-M", _sd35_medium, (), 32, note="transformer; CLIP-L, CLIP-G, T5-XXL, VAE frozen"
    ),
    "FLUX.1-dev": ModelSpec(
        "FLUX.1-dev", _flux1_dev, (), 32, note="transformer; CLIP-L, T5-XXL, VAE frozen"
    ),
    "Qwen-Image": ModelSpec(
        "Qwen-Image", _qwen_image, (), 64, note="transformer; Qwen2.5-VL-7B, VAE frozen"
    ),
    "Bagel-7B-MoT": ModelSpec(
        "Bagel-7B-MoT",
        _bagel,
        (),
        64,
        full_trainable=_bagel_gen_only,
        note="full = generation expert (moe_gen) only; und expert, embeddings, VAE frozen",
    ),
}
_TARGET_FAMILY = {
    "SD3.5-M": "sd3",
    "FLUX.1-dev": "flux",
    "Qwen-Image": "qwen_image",
    "Bagel-7B-MoT": "bagel",
}


def lora_targets_for(model: str) -> list[str]:
    spec = MODELS[model]
    return list(spec.lora_targets) if spec.lora_targets else _adapter_targets(_TARGET_FAMILY[model])


# -- counting -----------------------------------------------------------------------------------
def _matches(name: str, targets: Iterable[str]) -> bool:
    # peft's rule for a list of target names: the full module name, or a suffix after a dot
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_numels(module: nn.Module, targets: Iterable[str], rank: int) -> list[int]:
    """Per-tensor sizes of the LoRA parameters peft adds: A (r × in) and B (out × r) for every
    `nn.Linear` whose name matches a target."""
    targets = list(targets)
    out: list[int] = []
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and _matches(name, targets):
            out += [rank * mod.in_features, mod.out_features * rank]
    if not out:
        raise ValueError(f"no nn.Linear in the module matches the LoRA targets {targets}")
    return out


def largest_block(module: nn.Module) -> int:
    """Parameters of the largest entry of any nn.ModuleList: the unit ZeRO-3 gathers at once."""
    best = 0
    for mod in module.modules():
        if isinstance(mod, nn.ModuleList):
            for block in mod:
                best = max(best, sum(p.numel() for p in block.parameters()))
    return best


def persistent_buffers(module: nn.Module) -> int:
    """Elements of the buffers saved in the state dict (e.g. SD3's positional table); the
    non-persistent ones (RoPE frequencies) are recomputed and negligible."""
    return sum(
        buf.numel()
        for mod in module.modules()
        for name, buf in mod._buffers.items()
        if buf is not None and name not in mod._non_persistent_buffers_set
    )


@dataclass(frozen=True)
class ModelCounts:
    """Tensor sizes of one real model (elements, per tensor where ZeRO needs them)."""

    name: str
    policy: tuple[int, ...]  # every parameter of the trained network
    full_trainable: tuple[int, ...]  # the subset full fine-tuning trains
    lora: tuple[int, ...]  # LoRA A/B tensors
    lora_rank: int
    lora_targets: tuple[str, ...]
    buffers: int  # persistent buffers of the policy (replicated, never partitioned)
    encoders: dict[str, int] = field(default_factory=dict)  # frozen text encoders, VAE
    largest_block: int = 0

    @property
    def policy_total(self) -> int:
        return sum(self.policy)

    @property
    def trainable_full_total(self) -> int:
        return sum(self.full_trainable)

    @property
    def lora_total(self) -> int:
        return sum(self.lora)

    @property
    def encoders_total(self) -> int:
        return sum(self.encoders.values())


@functools.cache
def count_model(model: str) -> ModelCounts:
    """Instantiate `model`'s real classes on the meta device and count their tensors."""
    spec = MODELS[model]
    with torch.device("meta"):
        parts = spec.build()
    policy = parts.pop("policy")
    named = list(policy.named_parameters())
    keep = spec.full_trainable or (lambda _name: True)
    targets = lora_targets_for(model)
    return ModelCounts(
        name=model,
        policy=tuple(p.numel() for _, p in named),
        full_trainable=tuple(p.numel() for n, p in named if keep(n)),
        lora=tuple(lora_numels(policy, targets, spec.lora_rank)),
        lora_rank=spec.lora_rank,
        lora_targets=tuple(targets),
        buffers=persistent_buffers(policy),
        encoders={k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()},
        largest_block=largest_block(policy),
    )


# -- ZeRO accounting ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """Bytes per element. Default: bf16 mixed precision with fp32 Adam (the ZeRO paper's K=12)."""

    param: int = 2
    grad: int = 2
    master: int = 4  # fp32 master copy; 0 when the parameters are themselves fp32 masters
    adam: int = 8  # Adam m and v in fp32


BF16_ADAM = Precision()


def zero_numels(
    all_params: Sequence[int],
    trainable: Sequence[int],
    stage: int,
    world: int,
    persistence_threshold: int = 0,
) -> dict[str, int]:
    """Elements held by the fullest rank under ZeRO `stage` on `world` ranks (ZeRO paper §5.1).

    `all_params`: every tensor of the wrapped module (trainable and frozen, in module order),
    `trainable`: the trained ones. The fp32 master and Adam m, v are partitioned from stage 1,
    gradients from stage 2, parameters at stage 3. Two DeepSpeed details, both measured by
    benchmarks/bench_memory.py: at stage 2 a rank holds the whole gradient of every tensor
    that overlaps its slice of the flat buffer (so a tensor straddling a boundary is held by
    both ranks); at stage 3 each tensor is split into ceil(n/N) per rank, and tensors with
    n <= `persistence_threshold` may in addition be kept whole once gathered (an upper bound:
    DeepSpeed keeps only some of them).
    """
    total, t = sum(all_params), sum(trainable)
    if stage >= 3 and world > 1:
        params = sum(-(-n // world) for n in all_params)
        params += sum(n for n in all_params if n <= persistence_threshold)
    else:
        params = total
    shard = -(-t // world)
    return {
        "params": params,
        "grads": _stage2_grads(trainable, world) if stage == 2 else shard if stage == 3 else t,
        "master": shard if stage >= 1 else t,
        "adam": 2 * (shard if stage >= 1 else t),  # m and v
    }


def _stage2_grads(trainable: Sequence[int], world: int) -> int:
    """Largest per-rank gradient buffer of ZeRO-2: the tensors overlapping each rank's slice
    [k·P, (k+1)·P) of the flat trainable buffer, P = ceil(Ψ/N), held whole."""
    size = -(-sum(trainable) // world)
    best = 0
    for k in range(world):
        lo, hi, held, start = k * size, (k + 1) * size, 0, 0
        for n in trainable:
            if start < hi and start + n > lo:
                held += n
            start += n
        best = max(best, held)
    return best


@dataclass(frozen=True)
class Strategy:
    name: str
    stage: int
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state + gradient partitions → CPU
    offload_params: bool = False  # ZeRO-3 parameter partitions → CPU


STRATEGIES = (
    Strategy("ZeRO-2", 2),
    Strategy("ZeRO-3", 3),
    Strategy("ZeRO-3+offload", 3, offload_optimizer=True, offload_params=True),
)


def ds_buffer_sizes(config_dir: Path | None = None) -> dict[str, int]:
    """Bucket sizes (elements) of flowpo's ds_configs/zero{2,3}.json templates."""
    config_dir = config_dir or Path(__file__).resolve().parents[1] / "ds_configs"
    z2 = json.loads((config_dir / "zero2.json").read_text())["zero_optimization"]
    z3 = json.loads((config_dir / "zero3.json").read_text())["zero_optimization"]
    return {
        "z2_reduce": int(z2["reduce_bucket_size"]),
        "z2_allgather": int(z2["allgather_bucket_size"]),
        "z3_reduce": int(z3["reduce_bucket_size"]),
        "z3_prefetch": int(z3["stage3_prefetch_bucket_size"]),
        "z3_persistence": int(z3["stage3_param_persistence_threshold"]),
    }


@dataclass
class MemoryEstimate:
    """Bytes per rank; GPU parts and host (CPU) parts of one configuration."""

    params: float  # policy weights (trainable + frozen base), bf16, incl. buffers
    grads: float
    optimizer: float  # fp32 master + Adam m, v
    reference: float  # frozen reference policy (full fine-tuning, β > 0)
    encoders: float  # frozen text encoders + VAE, replicated
    buffers: float  # DeepSpeed buckets + ZeRO-3 gathered working set
    cpu: float  # offloaded to host memory, per rank

    @property
    def gpu(self) -> float:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.reference
            + self.encoders
            + self.buffers
        )


def estimate(
    counts: ModelCounts,
    *,
    lora: bool,
    beta: float,
    strategy: Strategy,
    world: int = 8,
    precision: Precision = BF16_ADAM,
    buffers: dict[str, int] | None = None,
) -> MemoryEstimate:
    """Per-rank bytes of training `counts` with `strategy` on `world` GPUs (no activations)."""
    b = buffers or ds_buffer_sizes()
    stage = strategy.stage
    thr = b["z3_persistence"] if stage == 3 else 0
    trainable = counts.lora if lora else counts.full_trainable
    wrapped = counts.policy + counts.lora if lora else counts.policy
    z = zero_numels(wrapped, trainable, stage, world, thr)
    p = precision
    params = z["params"] * p.param
    grads = z["grads"] * p.grad
    optimizer = z["master"] * p.master + z["master"] * p.adam
    # full fine-tuning with β > 0 keeps a frozen copy of the trained weights (LoRA: the base
    # with adapters disabled, no copy); ZeRO-3 shards it like the policy (inference engine)
    reference = 0.0
    if not lora and beta > 0:
        ref = counts.full_trainable
        reference = zero_numels(ref, (), stage, world, thr)["params"] * p.param
    cpu = 0.0
    if strategy.offload_optimizer:
        cpu += optimizer + grads
        optimizer = grads = 0.0
    if strategy.offload_params and stage == 3:
        # persistent (small) tensors stay on the GPU; the partitions move to the host
        persistent = sum(n for n in wrapped if n <= thr) * p.param
        cpu += params - persistent + reference
        params, reference = persistent, 0.0
    if stage == 2:
        buf = (b["z2_reduce"] + b["z2_allgather"]) * p.grad
    elif stage == 3:
        buf = b["z3_reduce"] * p.grad + (b["z3_prefetch"] + counts.largest_block) * p.param
    else:
        buf = 0.0
    return MemoryEstimate(
        params=params + counts.buffers * p.param,
        grads=grads,
        optimizer=optimizer,
        reference=reference,
        encoders=counts.encoders_total * p.param,
        buffers=buf,
        cpu=cpu,
    )


def fit_table(
    models: Sequence[str] = tuple(MODELS),
    *,
    world: int = 8,
    gpu_gib: float = 80.0,
    strategies: Sequence[Strategy] = STRATEGIES,
) -> list[dict[str, Any]]:
    """One row per (model, mode): per-GPU GiB of each strategy and whether it fits `gpu_gib`.

    Modes: LoRA (reference = adapters disabled), full fine-tuning with β = 0 (no reference)
    and with β > 0 (frozen reference copy)."""
    rows = []
    bufs = ds_buffer_sizes()
    for model in models:
        c = count_model(model)
        for mode, lora, beta in (
            (f"LoRA r{c.lora_rank}", True, 0.0),
            ("full, β=0", False, 0.0),
            ("full, β>0", False, 0.04),
        ):
            row: dict[str, Any] = {
                "model": model,
                "mode": mode,
                "trainable_B": (c.lora_total if lora else c.trainable_full_total) / 1e9,
                "policy_B": c.policy_total / 1e9,
                "encoders_B": c.encoders_total / 1e9,
            }
            for s in strategies:
                e = estimate(c, lora=lora, beta=beta, strategy=s, world=world, buffers=bufs)
                row[s.name] = {
                    "gpu_gib": e.gpu / GIB,
                    "fits": e.gpu <= gpu_gib * GIB,
                    "cpu_gib_per_node": e.cpu * world / GIB,
                    "parts_gib": {
                        k: getattr(e, k) / GIB
                        for k in (
                            "params",
                            "grads",
                            "optimizer",
                            "reference",
                            "encoders",
                            "buffers",
                        )
                    },
                }
            rows.append(row)
    return rows


def format_fit_table(
    rows: list[dict[str, Any]], strategies: Sequence[Strategy] = STRATEGIES
) -> str:
    """Markdown table of `fit_table` rows."""
    names = [s.name for s in strategies]
    head = "| model | mode | trained params | encoders | " + " | ".join(names) + " |"
    sep = "|---|---|---|---|" + "---|" * len(names)
    lines = [head, sep]
    for r in rows:
        cells = []
        for n in names:
            cell = r[n]
            text = f"{cell['gpu_gib']:.1f} {'yes' if cell['fits'] else '**no**'}"
            if cell["cpu_gib_per_node"] > 0:
                text += f" (host {cell['cpu_gib_per_node']:.0f}/node)"
            cells.append(text)
        lines.append(
            f"| {r['model']} | {r['mode']} | {_fmt_count(r['trainable_B'])} | "
            f"{r[names[0]]['parts_gib']['encoders']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _fmt_count(billions: float) -> str:
    return f"{billions:.2f}B" if billions >= 0.995 else f"{billions * 1e3:.1f}M"


def counts_summary(models: Sequence[str] = tuple(MODELS)) -> list[dict[str, Any]]:
    """Parameter counts per model (billions), for the benchmark's JSON and README."""
    out = []
    for model in models:
        c = count_model(model)
        out.append(
            {
                "model": model,
                "policy_params_B": c.policy_total / 1e9,
                "policy_buffers_B": c.buffers / 1e9,
                "full_trainable_B": c.trainable_full_total / 1e9,
                "lora_rank": c.lora_rank,
                "lora_params_M": c.lora_total / 1e6,
                "lora_targets": list(c.lora_targets),
                "encoders_B": {k: v / 1e9 for k, v in c.encoders.items()},
                "largest_block_M": c.largest_block / 1e6,
                "note": MODELS[model].note,
            }
        )
    return out
