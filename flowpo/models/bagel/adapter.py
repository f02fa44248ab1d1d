"""Bagel-7B-MoT adapter: a local directory in the official layout (docs/bagel.md §1).

Text conditioning is the packed text segment `<|im_start|> prompt <|im_end|>` (no chat
template, §3): PromptEmbeds carries its token ids, and the embedding lookup and the text
prefill run inside the trainable module, so ZeRO-3 gathers every weight through the module's
own forward. Text-CFG's unconditional context is empty (§5): the same row with text length 0,
so no negative prompt is encoded. Latents are the patchified tokens (B, N, 64), N = h·w,
h = H/16 (§4). The schedule is Bagel's static timestep shift of linspace(1, 0, T+1) (§4 step 6:
Bagel's `num_timesteps` S = T+1 gives T model evaluations).

Batching (the official inferencer and Flow-GRPO run batch 1): B rows are padded to the longest
prompt of the batch and masked; the CFG renormalisation norm is taken per sample (§5). Padded
keys get zero attention weight, but the matrix shapes change with the batch, so a row's
velocity can differ from its batch-1 velocity by float rounding (measured in
tests/test_bagel.py::test_batch_invariance_is_within_rounding; in bf16 with CFG 4 up to 0.035
between a batch of 4 and two of 2). Training must therefore re-score in the sampling batches
themselves: `batch_invariant = False` makes the GRPO config check refuse a
train.micro_batch_size other than rollout.batch_size, and then the first ratio is exactly 1.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from flowpo.models.base import ModelAdapter, PromptEmbeds, register_model

log = logging.getLogger(__name__)

# docs/bagel.md §9 (Flow-GRPO's pickscore_bagel_lora): the generation expert's projections only
BAGEL_LORA_TARGETS = [
    "self_attn.q_proj_moe_gen",
    "self_attn.k_proj_moe_gen",
    "self_attn.v_proj_moe_gen",
    "self_attn.o_proj_moe_gen",
    "mlp_moe_gen.gate_proj",
    "mlp_moe_gen.up_proj",
    "mlp_moe_gen.down_proj",
]


def shift_schedule(num_steps: int, shift: float) -> Tensor:
    """(T+1,) float32: t = s·t̃/(1 + (s−1)·t̃) of t̃ = linspace(1, 0, T+1) (§4 step 6)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def cfg_combine(
    v_c: Tensor, v_u: Tensor, scale: float, renorm_min: float, renorm_type: str
) -> Tensor:
    """Text CFG with renormalisation (§5), per sample: g = v_u + s·(v_c − v_u), then
    g·clamp(‖v_c‖/(‖g‖+1e-8), renorm_min, 1). `global`: one norm per sample over all tokens
    and channels (the official norm spans the whole packed batch, which is one sample there);
    `channel`: per token over the features. float32 in, float32 out."""
    g = v_u + scale * (v_c - v_u)
    if renorm_min >= 1.0:
        return g
    dims = (1, 2) if renorm_type == "global" else (2,)
    ratio = v_c.norm(dim=dims, keepdim=True) / (g.norm(dim=dims, keepdim=True) + 1e-8)
    return g * ratio.clamp(renorm_min, 1.0)


@register_model("bagel")
class BagelAdapter(ModelAdapter):
    """Bagel-7B-MoT T2I: MoT decoder over packed text + latent tokens, FLUX autoencoder."""

    pipeline_classes = ()  # not a diffusers pipeline: detected by its own files
    layout_files = ("llm_config.json", "ema.safetensors", "ae.safetensors")
    lora_targets = BAGEL_LORA_TARGETS
    batch_invariant = False  # text trimmed to the batch's longest prompt (module docstring)
    fp16_training = False  # not run in float16: trains in bf16 (ModelAdapter.fp16_training)

    def __init__(
        self,
        model_dir: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
        guidance_scale: float = 1.0,
        timestep_shift: float = 3.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_renorm_min: float = 0.0,
        cfg_renorm_type: str = "global",
        max_text_tokens: int = 512,
    ) -> None:
        """Defaults are the T2I settings of docs/bagel.md §7 as Flow-GRPO uses them: shift 3, text
        CFG at every step (interval [0, 1]; the official notebook uses [0.4, 1]), global
        renorm with min 0. `resolution` (square, a multiple of 16, ≤ 16·max_latent_size)
        defaults to 16·max_latent_size (1024 px). These are the recipe's `model.options`."""
        super().__init__(
            model_dir,
            device=device,
            dtype=dtype,
            resolution=resolution,
            guidance_scale=guidance_scale,
        )
        from transformers import AutoTokenizer

        from flowpo.models.bagel.checkpoint import (
            AE_WEIGHTS,
            BOS,
            EOI,
            EOS,
            SOI,
            load_bagel,
            load_flux_vae,
        )

        if cfg_renorm_type not in ("global", "channel"):
            raise ValueError(
                f"model.options.cfg_renorm_type '{cfg_renorm_type}': choose global or channel"
            )
        if len(cfg_interval) != 2 or not 0.0 <= cfg_interval[0] < cfg_interval[1] <= 1.0:
            raise ValueError(
                f"model.options.cfg_interval {list(cfg_interval)} must be [lo, hi] with "
                "0 <= lo < hi <= 1 (CFG where lo < t <= hi)"
            )
        if max_text_tokens < 3:
            raise ValueError(f"model.options.max_text_tokens ({max_text_tokens}) must be >= 3")
        self.max_text_tokens = int(max_text_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        bos, eos, soi, eoi = self.tokenizer.convert_tokens_to_ids([BOS, EOS, SOI, EOI])
        self.bos, self.eos = int(bos), int(eos)
        self.pad_id = int(eos)  # padding is masked: any id works
        model = load_bagel(
            self.model_dir, dtype=dtype, device=self.device, start_of_image=soi, end_of_image=eoi
        )
        self._transformer = model.eval()
        self.vae = load_flux_vae(f"{self.model_dir}/{AE_WEIGHTS}", dtype=dtype, device=self.device)
        self.max_latent_size = model.max_latent_size  # read once: the module may be wrapped
        self.patch_dim = model.patch_dim
        if self.resolution is None:
            self.resolution = 16 * self.max_latent_size
        res = int(self.resolution)
        if res % 16 or res > 16 * self.max_latent_size:
            raise ValueError(
                f"resolution ({res}) must be a multiple of 16 and at most "
                f"{16 * self.max_latent_size} (latent_pos_embed has {self.max_latent_size}² rows)"
            )
        self.height = self.width = res
        self.grid = (res // 16, res // 16)  # (h, w) patch grid
        self.timestep_shift = float(timestep_shift)
        self.cfg_interval = (float(cfg_interval[0]), float(cfg_interval[1]))
        self.cfg_renorm_min = float(cfg_renorm_min)
        self.cfg_renorm_type = cfg_renorm_type
        self._warned_long = False
        self.freeze_frozen_parts()

    def frozen_modules(self) -> dict[str, nn.Module]:
        # the text "encoder" is the understanding expert inside the trainable module
        return {"vae": self.vae}

    def set_attention_backend(self, name: str) -> None:
        """native (SDPA, padded) or flash (flash-attn varlen over the valid tokens, CUDA)."""
        self.trainable_module.set_attention_backend(name)

    def full_trainable(self, name: str) -> bool:
        """Full fine-tuning trains the generation expert only (Flow-GRPO, docs/bagel.md §9)."""
        from flowpo.models.bagel.modeling import is_gen_param

        return is_gen_param(name)

    # ---- prompts -----------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """prompt_embeds: (B, max_text_tokens) long token ids `<|im_start|> p <|im_end|>`,
        padded; extra["text_len"]: (B,) valid lengths."""
        width = self.max_text_tokens
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        lens = torch.zeros(len(prompts), dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = self.tokenizer.encode(p, add_special_tokens=False)
            if len(toks) > width - 2:
                if not self._warned_long:
                    log.warning("prompt of %d tokens cut to %d: %r", len(toks), width - 2, p)
                    self._warned_long = True
                toks = toks[: width - 2]
            row = [self.bos, *toks, self.eos]
            ids[i, : len(row)] = torch.tensor(row)
            lens[i] = len(row)
        return PromptEmbeds(
            prompt_embeds=ids.to(self.device), extra={"text_len": lens.to(self.device)}
        )

    # ---- sampling ----------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.grid[0] * self.grid[1], self.patch_dim)  # (N, 64)

    def initial_noise(self, n: int, generator: torch.Generator) -> Tensor:
        # drawn directly in token layout, float32 (§4 step 1)
        x = torch.randn((n, *self.latent_shape), generator=generator, device=generator.device)
        return x.to(self.device)

    def sigmas(self, num_steps: int, latents: Tensor) -> Tensor:
        return shift_schedule(num_steps, self.timestep_shift).to(latents.device)

    def _cfg_rows(self, t: Tensor, g: float) -> Tensor:
        """(B,) bool: rows whose t lies in the CFG interval lo < t ≤ hi (§5)."""
        lo, hi = self.cfg_interval
        return (t > lo) & (t <= hi) if g > 1.0 else torch.zeros_like(t, dtype=torch.bool)

    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """v (B, N, 64) float32 for latent tokens (B, N, 64) at t = sigma (B,)."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; this adapter (resolution "
                f"{self.resolution}) expects (B, {', '.join(map(str, self.latent_shape))})"
            )
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        b = latents.shape[0]
        t = self._sigma_batch(sigma, b, latents.device)
        lens = embeds.extra["text_len"].to(latents.device)
        ids = embeds.prompt_embeds[:, : int(lens.max())].to(latents.device)  # trim padding
        use_cfg = self._cfg_rows(t, g)
        x, tt = latents, t
        if bool(use_cfg.any()):  # one forward on [cond; uncond], uncond = empty context
            x, tt = torch.cat([x, x]), torch.cat([t, t])
            ids, lens = torch.cat([ids, ids]), torch.cat([lens, torch.zeros_like(lens)])
        out = self._transformer(x, tt, ids, lens, self.grid)
        # float32 before the CFG combination: s·(v_c − v_u) amplifies bf16 rounding
        out = out.float()
        if out.shape[0] == b:
            return out
        v_c, v_u = out.chunk(2)
        v = cfg_combine(v_c, v_u, g, self.cfg_renorm_min, self.cfg_renorm_type)
        return torch.where(use_cfg[:, None, None], v, v_c)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from latent tokens (B, N, 64) (§4 step 8)."""
        from flowpo.models.bagel.modeling import unpatchify

        vae = self.vae
        z = unpatchify(latents.to(device=self.device, dtype=torch.float32), *self.grid)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)
