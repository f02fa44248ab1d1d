"""Qwen-Image adapter: a local directory in the diffusers QwenImagePipeline layout.

Components: `QwenImageTransformer2DModel` (60-block dual-stream MMDiT, 20B), the Wan-style 3-D
causal `AutoencoderKLQwenImage` (one frame), a `Qwen2_5_VLForConditionalGeneration` text
encoder with its `Qwen2Tokenizer`, and `FlowMatchEulerDiscreteScheduler` with dynamic shift.

Text (as diffusers' `QwenImagePipeline.encode_prompt`): each prompt is wrapped in a chat
template with a fixed system message, tokenised, and the encoder's last hidden state is taken
at the non-padding positions; the template's first 34 tokens (system message and user header)
are dropped, what remains is cut to `max_sequence_length`, and the rows are right-padded with
zeros to the longest one, with a 0/1 mask (`PromptEmbeds.mask`). Each prompt is cached unpadded
and re-padded when a batch is assembled, so a batch equals the pipeline's encoding of it.

Latents are packed as the pipeline packs them: 2×2 patches of the (C, h, w) latent → (L, 4C),
L = (h/2)(w/2). True CFG: one forward on [negative; positive] (negative prompt " " by
default, as the pipeline's docs and Flow-GRPO's train_qwenimage.py use), combined in float32
as v_u + g·(v_c − v_u), then, by default, rescaled per token to the conditional prediction's
norm: v·‖v_c‖/‖v‖ along the channel axis (`QwenImagePipeline.__call__`; Flow-GRPO's
`compute_log_prob`). The sigma schedule is the pipeline's: linspace(1, 1/T, T), shifted by
mu(image tokens) with the model's scheduler (exponential time shift, shift_terminal).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from flowpo.models.base import ModelAdapter, ModelLoadError, PromptEmbeds, register_model

# QwenImagePipeline's prompt template and the number of its leading tokens that are dropped
# (diffusers pipeline_qwenimage.py: `prompt_template_encode`, `prompt_template_encode_start_idx`)
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_DROP = 34
TOKENIZER_MAX_LENGTH = 1024  # the pipeline's `tokenizer_max_length` (prompt tokens)


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): each 2×2 patch becomes one token, channels major."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """(B, (h/2)(w/2), 4C) -> (B, C, h, w), the inverse of `pack_latents`."""
    b, _, c4 = x.shape
    x = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    """Right-pad (B, L, ...) with zeros to (B, length, ...)."""
    if t.shape[1] == length:
        return t
    pad = t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


@register_model("qwen_image")
class QwenImageAdapter(ModelAdapter):
    """Qwen-Image (`QwenImagePipeline`): packed latents, true CFG with norm rescale."""

    pipeline_classes = ("QwenImagePipeline",)
    fp16_training = False  # not run in float16: trains in bf16 (ModelAdapter.fp16_training)
    # Flow-GRPO's Qwen-Image LoRA targets (scripts/train_qwenimage.py): joint attention
    # projections of both streams and both streams' MLPs
    lora_targets = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ]

    def __init__(
        self,
        model_dir: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
        guidance_scale: float = 1.0,
        max_sequence_length: int = 512,
        negative_prompt: str = " ",
        cfg_norm_rescale: bool = True,
    ) -> None:
        """`max_sequence_length`: prompt tokens kept after the template (the pipeline's 512
        default, at most 1024). `negative_prompt`: the CFG negative. `cfg_norm_rescale`:
        rescale the CFG output to the conditional norm (the pipeline always does).
        `resolution` defaults to the pipeline's 128 × VAE factor (1024 for Qwen-Image)."""
        super().__init__(
            model_dir,
            device=device,
            dtype=dtype,
            resolution=resolution,
            guidance_scale=guidance_scale,
        )
        from diffusers import QwenImagePipeline

        if not 0 < max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ValueError(
                f"model.options max_sequence_length ({max_sequence_length}) must be in "
                f"1..{TOKENIZER_MAX_LENGTH} (the pipeline's limit)"
            )
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = str(negative_prompt)
        self.cfg_norm_rescale = bool(cfg_norm_rescale)
        pipe = QwenImagePipeline.from_pretrained(self.model_dir, local_files_only=True, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self._transformer = pipe.transformer
        tcfg = pipe.transformer.config  # read once: the trainable module may be a wrapper
        if tcfg.guidance_embeds:
            raise ModelLoadError(
                f"model.path '{model_dir}' holds a guidance-distilled Qwen-Image transformer "
                "(guidance_embeds=true), which this adapter does not drive; use a true-CFG model"
            )
        self.packed_channels = int(tcfg.in_channels)  # 4 × VAE latent channels
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        if self.resolution is None:  # the pipeline's default height/width
            self.resolution = 128 * self.vae_scale_factor
        step = self.vae_scale_factor * 2
        if self.resolution % step:
            raise ValueError(
                f"model.resolution ({self.resolution}) must be a multiple of {step} for Qwen-Image "
                f"(VAE factor {self.vae_scale_factor} × 2×2 latent packing); the pipeline "
                f"would silently round it down to {self.resolution // step * step}"
            )
        self.height = self.width = int(self.resolution)
        self.latent_h = self.height // self.vae_scale_factor
        self.latent_w = self.width // self.vae_scale_factor
        self._check_template()
        self._sigma_cache: dict[tuple[int, int], Tensor] = {}
        self.freeze_frozen_parts()

    def _check_template(self) -> None:
        """Dropping 34 tokens removes exactly the template's prefix only if the tokenizer
        splits it into 34 tokens (the released Qwen2 tokenizer does)."""
        prefix = PROMPT_TEMPLATE.split("{}")[0]
        n = len(self.pipe.tokenizer(prefix).input_ids)
        if n != TEMPLATE_DROP:
            raise ModelLoadError(
                f"the tokenizer in '{self.model_dir}' splits Qwen-Image's prompt-template prefix "
                f"into {n} tokens, but the pipeline drops {TEMPLATE_DROP}: it is not the "
                "Qwen2 tokenizer this model was trained with"
            )

    @property
    def cfg_active(self) -> bool:
        return self.guidance_scale > 1.0  # the pipeline's `true_cfg_scale > 1`

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("text_encoder", "vae")
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n) is not None}

    # ---- text --------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """(B, L, C) last hidden states after the template, right-padded, with the (B, L) mask."""
        tok = self.pipe.tokenizer(
            [PROMPT_TEMPLATE.format(p) for p in prompts],
            max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_DROP,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        out = self.pipe.text_encoder(
            input_ids=tok.input_ids, attention_mask=tok.attention_mask, output_hidden_states=True
        )
        hidden = out.hidden_states[-1]  # (B, L_tok, C)
        keep = tok.attention_mask.bool()
        # real tokens of each row (padding may sit on either side), minus the template prefix
        rows = [h[k][TEMPLATE_DROP:][: self.max_sequence_length] for h, k in zip(hidden, keep)]
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([_pad_tokens(r[None], length)[0] for r in rows])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=hidden.device)
        for i, r in enumerate(rows):
            mask[i, : r.shape[0]] = 1
        return PromptEmbeds(prompt_embeds=embeds.to(self.dtype), mask=mask)

    # ---- latents and schedule ----------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        seq = (self.latent_h // 2) * (self.latent_w // 2)
        return (seq, self.packed_channels)  # (L, 4C)

    def initial_noise(self, n: int, generator: torch.Generator) -> Tensor:
        """Packed (n, L, 4C), drawn as the pipeline draws its (n, 1, C, h, w) latents (the
        frame axis of size 1 does not change the order), then packed."""
        c = self.packed_channels // 4
        shape = (n, c, self.latent_h, self.latent_w)
        x = torch.randn(shape, generator=generator, device=generator.device)
        return pack_latents(x).to(self.device)

    def sigmas(self, num_steps: int, latents: Tensor) -> Tensor:
        key = (int(num_steps), int(latents.shape[1]))
        if key not in self._sigma_cache:
            self._sigma_cache[key] = self._scheduler_sigmas(num_steps, int(latents.shape[1]))
        return self._sigma_cache[key].to(latents.device).clone()

    def _scheduler_sigmas(self, num_steps: int, image_seq_len: int) -> Tensor:
        """QwenImagePipeline.__call__'s schedule: linspace(1, 1/T, T) through a fresh copy of
        the model's scheduler with mu linear in the image tokens (base/max_image_seq_len)."""
        cfg = self.pipe.scheduler.config
        sched = type(self.pipe.scheduler).from_config(cfg)
        lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        s_lo, s_hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (s_hi - s_lo) / (hi - lo)
        mu = image_seq_len * m + (s_lo - m * lo)  # the pipeline's calculate_shift, same order
        sig = np.linspace(1.0, 1 / num_steps, num_steps)
        out = torch.full((1,), float("nan"))
        if num_steps >= 2 or not cfg.get("shift_terminal"):  # one step: 0/0 in the stretch
            sched.set_timesteps(device="cpu", sigmas=sig, mu=mu)
            out = sched.sigmas.to(torch.float32)
        if not torch.isfinite(out).all():
            raise ValueError(
                f"num_steps {num_steps}: the model's scheduler gives non-finite sigmas (its "
                f"shift_terminal stretch needs at least 2 steps); use sampling.num_steps >= 2"
            )
        return out

    # ---- velocity ----------------------------------------------------------------------
    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """v (B, L, 4C) float32 for packed latents (B, L, 4C) at sigma (B,); true CFG when
        g > 1. The text mask is always passed (never dropped when all ones), so a row's
        computation does not depend on which other rows share its batch."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; this adapter (resolution "
                f"{self.resolution}) expects (B, {', '.join(map(str, self.latent_shape))})"
            )
        if embeds.mask is None:
            raise ValueError("Qwen-Image embeddings carry a token mask: encode with this adapter")
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        b = latents.shape[0]
        x = latents.to(self.dtype)
        # the pipeline passes (sigma·1000 in the latents' dtype) / 1000: same rounding here
        t = self._sigma_batch(sigma, b, latents.device) * self.num_train_timesteps
        t = t.to(self.dtype) / self.num_train_timesteps
        pe, mask = embeds.prompt_embeds.to(self.dtype), embeds.mask
        cfg = g > 1.0
        if cfg:
            if not embeds.has_negative or embeds.neg_mask is None:
                raise ValueError(
                    f"guidance_scale {g} > 1 needs negative embeddings: encode the prompts with "
                    "an adapter whose guidance_scale > 1"
                )
            # one forward on [uncond; cond]; the two texts are padded to a common length
            length = max(pe.shape[1], embeds.neg_prompt_embeds.shape[1])
            neg = embeds.neg_prompt_embeds.to(self.dtype)
            pe = torch.cat([_pad_tokens(neg, length), _pad_tokens(pe, length)])
            mask = torch.cat([_pad_tokens(embeds.neg_mask, length), _pad_tokens(mask, length)])
            x, t = torch.cat([x, x]), torch.cat([t, t])
        out = self._transformer(
            hidden_states=x,
            timestep=t,
            guidance=None,
            encoder_hidden_states=pe,
            encoder_hidden_states_mask=mask.to(pe.device),
            img_shapes=[[(1, self.latent_h // 2, self.latent_w // 2)]] * x.shape[0],
            return_dict=False,
        )[0]
        # float32 before the CFG combination: g·(v_c − v_u) amplifies bf16 rounding
        out = out.float()
        if not cfg:
            return out
        v_u, v_c = out.chunk(2)
        v = v_u + g * (v_c - v_u)
        if self.cfg_norm_rescale:
            v = v * (v_c.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True))
        return v

    # ---- images ------------------------------------------------------------------------
    def unpack(self, latents: Tensor) -> Tensor:
        """Packed (B, L, 4C) -> spatial (B, C, h, w)."""
        return unpack_latents(latents, self.latent_h, self.latent_w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from packed latents (B, L, 4C)."""
        vae = self.pipe.vae
        z = self.unpack(latents.to(device=self.device, dtype=vae.dtype))[:, :, None]  # 1 frame
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        z = z / inv_std + mean  # the pipeline's arithmetic: z·std as z / (1/std)
        img = vae.decode(z, return_dict=False)[0][:, :, 0]
        return (img.float() / 2 + 0.5).clamp(0, 1)
