"""Stable Diffusion 3 / 3.5 adapter: a local directory in the StableDiffusion3Pipeline layout.

Text: CLIP-L and CLIP-G (+ T5 when `text_encoder_3` is present) through the pipeline's own
`encode_prompt`. Latents (B, C, H/f, W/f) with f the VAE factor. The transformer takes the
timestep sigma·1000 and predicts v = ε − x0; CFG with the "" negative is one batched forward.
Everything matches `StableDiffusion3Pipeline.__call__` (tested against it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowpo.models.base import ModelAdapter, PromptEmbeds, register_model


@register_model("sd3")
class SD3Adapter(ModelAdapter):
    """SD3 / SD3.5 (`StableDiffusion3Pipeline`) with classifier-free guidance inside velocity()."""

    pipeline_classes = ("StableDiffusion3Pipeline",)
    # Flow-GRPO's SD3.5 LoRA targets: joint attention projections of both streams
    lora_targets = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ]

    def __init__(
        self,
        model_dir: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
        guidance_scale: float = 1.0,
        max_sequence_length: int | None = None,
    ) -> None:
        """`max_sequence_length`: T5 tokens; default min(256 (the pipeline's), tokenizer max)."""
        super().__init__(
            model_dir,
            device=device,
            dtype=dtype,
            resolution=resolution,
            guidance_scale=guidance_scale,
        )
        import json
        from pathlib import Path

        from diffusers import StableDiffusion3Pipeline

        index = json.loads((Path(self.model_dir) / "model_index.json").read_text())
        # A directory whose model_index.json names no VAE ("vae": [null, null]) is a pixel-space
        # model of the same family (the shapes-world base): latents are images in [-1, 1].
        self.pixel_space = index.get("vae", [None, None])[0] is None
        extra = {"vae": None} if self.pixel_space else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(
            self.model_dir, local_files_only=True, dtype=dtype, **extra
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self._transformer = pipe.transformer
        # read once: the trainable module may later be a wrapper without `.config`
        tcfg = pipe.transformer.config
        self.patch_size = int(tcfg.patch_size)
        self.latent_channels = int(tcfg.in_channels)
        self.vae_scale_factor = 1 if self.pixel_space else int(pipe.vae_scale_factor)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        if self.resolution is None:  # the pipeline's default height/width
            self.resolution = int(tcfg.sample_size) * self.vae_scale_factor
        step = self.vae_scale_factor * self.patch_size
        if self.resolution % step:
            raise ValueError(
                f"resolution ({self.resolution}) must be a multiple of {step} "
                f"(VAE factor {self.vae_scale_factor} × patch size {self.patch_size})"
            )
        self.height = self.width = int(self.resolution)
        if max_sequence_length is None:
            max_sequence_length = 256
            if pipe.tokenizer_3 is not None:
                max_sequence_length = min(max_sequence_length, pipe.tokenizer_3.model_max_length)
        self.max_sequence_length = int(max_sequence_length)
        self._sigma_cache: dict[tuple[int, tuple[int, ...]], Tensor] = {}
        self.freeze_frozen_parts()

    @property
    def cfg_active(self) -> bool:
        return self.guidance_scale > 1.0  # as StableDiffusion3Pipeline.do_classifier_free_guidance

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n) is not None}

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(prompt_embeds=pe.to(self.dtype), pooled=pooled.to(self.dtype))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.latent_channels, self.height // f, self.width // f)  # (C, h, w)

    def initial_noise(self, n: int, generator: torch.Generator) -> Tensor:
        # drawn on the generator's device, as diffusers' randn_tensor does, then moved
        x = torch.randn((n, *self.latent_shape), generator=generator, device=generator.device)
        return x.to(self.device)

    def sigmas(self, num_steps: int, latents: Tensor) -> Tensor:
        key = (int(num_steps), tuple(latents.shape[1:]))
        if key not in self._sigma_cache:
            self._sigma_cache[key] = self._scheduler_sigmas(num_steps, latents)
        return self._sigma_cache[key].to(latents.device).clone()

    def _scheduler_sigmas(self, num_steps: int, latents: Tensor) -> Tensor:
        """Exactly what StableDiffusion3Pipeline.__call__ sets: a fresh scheduler from the
        model's config (static `shift`; dynamic only if the config asks for it)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        cfg = self.pipe.scheduler.config
        sched = type(self.pipe.scheduler).from_config(cfg)
        kw = {}
        if cfg.get("use_dynamic_shifting", None):
            h, w = latents.shape[-2:]
            seq_len = (h // self.patch_size) * (w // self.patch_size)
            kw["mu"] = calculate_shift(
                seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        sched.set_timesteps(num_steps, device="cpu", **kw)
        return sched.sigmas.to(torch.float32)

    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """v (B, C, h, w) float32 for latents (B, C, h, w) at sigma (B,); CFG when g > 1."""
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        b = latents.shape[0]
        x = latents.to(self.dtype)
        # same float32 product as the scheduler's `timesteps = sigmas * num_train_timesteps`
        t = self._sigma_batch(sigma, b, latents.device) * self.num_train_timesteps
        pe = embeds.prompt_embeds.to(self.dtype)
        pooled = embeds.pooled.to(self.dtype)
        cfg = g > 1.0
        if cfg:
            if not embeds.has_negative:
                raise ValueError(
                    f"guidance_scale {g} > 1 needs negative embeddings: encode the prompts with "
                    "an adapter whose guidance_scale > 1"
                )
            # one forward on [uncond; cond], as the pipeline batches it
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            pe = torch.cat([embeds.neg_prompt_embeds.to(self.dtype), pe])
            pooled = torch.cat([embeds.neg_pooled.to(self.dtype), pooled])
        out = self._transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=pe,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        # float32 before the CFG combination: g·(v_c − v_u) amplifies bf16 rounding
        out = out.float()
        if cfg:
            v_u, v_c = out.chunk(2)
            return v_u + g * (v_c - v_u)
        return out

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from latents (B, C, h, w)."""
        if self.pixel_space:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        vae = self.pipe.vae
        shift = vae.config.shift_factor or 0.0
        z = latents.to(device=self.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)
