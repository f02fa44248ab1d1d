"""FLUX.1 adapter: a local directory in the FluxPipeline layout.

Text: CLIP pooled + T5 sequence embeddings through the pipeline's `encode_prompt`. Latents
are kept packed, as the pipeline does: 2×2 latent patches → (B, L, 4C) with L = (h/2)(w/2);
decode() unpacks. No CFG: FLUX.1-dev takes the guidance scale as a distilled-guidance input
(only if the transformer has `guidance_embeds`). The sigma schedule shifts with the image
sequence length (mu from the scheduler config). Matches `FluxPipeline.__call__`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from flowpo.models.base import ModelAdapter, PromptEmbeds, register_model


@register_model("flux")
class FluxAdapter(ModelAdapter):
    """FLUX.1 (`FluxPipeline`): packed latents, distilled guidance, dynamic shift."""

    pipeline_classes = ("FluxPipeline",)
    fp16_training = False  # not run in float16: trains in bf16 (ModelAdapter.fp16_training)
    # the SD3 set on both streams of the double blocks (single blocks' attention matches
    # `attn.to_q/k/v` too), plus the feed-forwards and the single blocks' MLP input
    lora_targets = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
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
        """`max_sequence_length`: T5 tokens; default min(512 (the pipeline's), tokenizer max).
        `resolution` defaults to the VAE config's sample_size (1024 for FLUX.1)."""
        super().__init__(
            model_dir,
            device=device,
            dtype=dtype,
            resolution=resolution,
            guidance_scale=guidance_scale,
        )
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(self.model_dir, local_files_only=True, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self._transformer = pipe.transformer
        tcfg = pipe.transformer.config  # read once: the trainable module may be a wrapper
        self.guidance_embeds = bool(tcfg.guidance_embeds)
        self.packed_channels = int(tcfg.in_channels)  # 4 × VAE latent channels
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        if self.resolution is None:
            self.resolution = int(pipe.vae.config.sample_size)
        self.height = self.width = int(self.resolution)
        # latent grid, as FluxPipeline.prepare_latents rounds it (even, for 2×2 packing)
        self.latent_h = 2 * (self.height // (self.vae_scale_factor * 2))
        self.latent_w = 2 * (self.width // (self.vae_scale_factor * 2))
        if max_sequence_length is None:
            max_sequence_length = min(512, pipe.tokenizer_2.model_max_length)
        self.max_sequence_length = int(max_sequence_length)
        self._sigma_cache: dict[tuple[int, int], Tensor] = {}
        self.freeze_frozen_parts()

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("text_encoder", "text_encoder_2", "vae")
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n) is not None}

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        pe, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        # text ids are all zeros (L, 3): recomputed in velocity() rather than stored per row
        return PromptEmbeds(prompt_embeds=pe.to(self.dtype), pooled=pooled.to(self.dtype))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        seq = (self.latent_h // 2) * (self.latent_w // 2)
        return (seq, self.packed_channels)  # (L, 4C)

    def initial_noise(self, n: int, generator: torch.Generator) -> Tensor:
        """Packed (n, L, 4C); drawn unpacked (n, C, h, w) then packed, like the pipeline, so
        the same generator state gives the pipeline's own initial latents."""
        c = self.packed_channels // 4
        shape = (n, c, self.latent_h, self.latent_w)
        x = torch.randn(shape, generator=generator, device=generator.device)
        x = self.pipe._pack_latents(x, n, c, self.latent_h, self.latent_w)
        return x.to(self.device)

    def sigmas(self, num_steps: int, latents: Tensor) -> Tensor:
        key = (int(num_steps), int(latents.shape[1]))
        if key not in self._sigma_cache:
            self._sigma_cache[key] = self._scheduler_sigmas(num_steps, int(latents.shape[1]))
        return self._sigma_cache[key].to(latents.device).clone()

    def _scheduler_sigmas(self, num_steps: int, image_seq_len: int) -> Tensor:
        """Exactly FluxPipeline.__call__: linspace(1, 1/T) shifted by mu(image_seq_len)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        sched = type(self.pipe.scheduler).from_config(cfg)
        sig = np.linspace(1.0, 1 / num_steps, num_steps)
        if cfg.get("use_flow_sigmas", False):
            sig = None
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sched.set_timesteps(num_steps if sig is None else None, device="cpu", sigmas=sig, mu=mu)
        return sched.sigmas.to(torch.float32)

    def _ids(self, text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """txt_ids (L_txt, 3) zeros and img_ids (L, 3) = (0, row, col), as the pipeline."""
        txt_ids = torch.zeros(text_len, 3, device=device, dtype=self.dtype)
        img_ids = self.pipe._prepare_latent_image_ids(
            1, self.latent_h // 2, self.latent_w // 2, device, self.dtype
        )
        return txt_ids, img_ids

    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """v (B, L, 4C) float32 for packed latents (B, L, 4C) at sigma (B,)."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; this adapter (resolution "
                f"{self.resolution}) expects (B, {', '.join(map(str, self.latent_shape))})"
            )
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        b = latents.shape[0]
        x = latents.to(self.dtype)
        # the pipeline passes (sigma·1000 in the latents' dtype) / 1000: same rounding here
        t = self._sigma_batch(sigma, b, latents.device) * self.num_train_timesteps
        t = t.to(self.dtype) / self.num_train_timesteps
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), g, device=latents.device, dtype=torch.float32)
        txt_ids, img_ids = self._ids(embeds.prompt_embeds.shape[1], latents.device)
        out = self._transformer(
            hidden_states=x,
            timestep=t,
            guidance=guidance,
            pooled_projections=embeds.pooled.to(self.dtype),
            encoder_hidden_states=embeds.prompt_embeds.to(self.dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out.float()

    def unpack(self, latents: Tensor) -> Tensor:
        """Packed (B, L, 4C) -> spatial (B, C, h, w)."""
        return self.pipe._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from packed latents (B, L, 4C)."""
        vae = self.pipe.vae
        shift = vae.config.shift_factor or 0.0
        z = self.unpack(latents.to(device=self.device, dtype=vae.dtype))
        z = z / vae.config.scaling_factor + shift
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)
