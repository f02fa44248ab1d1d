"""Bagel-7B-MoT image generation: flowpo's own implementation, written from
`docs/bagel.md` (its section numbers are cited as §n); no code is copied from the
official ByteDance-Seed/Bagel repository or Flow-GRPO's Bagel integration.

Bagel is a Qwen2.5-7B decoder with a second set of weights per layer (Mixture-of-Transformers):
text tokens run through the understanding weights (transformers' `Qwen2Attention` projections,
`Qwen2MLP`, `Qwen2RMSNorm`), noisy VAE-latent tokens through the `*_moe_gen` copies. Both kinds
share one attention over the packed sequence. Only what Bagel adds is written here: qk-norm,
the MoT routing, the packed sequence with its mask and RoPE positions, the timestep and 2-D
latent position embeddings and the `vae2llm` / `llm2vae` heads. Parameter names equal the
official `ema.safetensors` names (§2), so the file loads unchanged.

Packed layout (§3), for a batch of B rows: every row is
`[text (Lt, padded) | <|vision_start|> | <|vision_end|> | latents (N)]`. The official order is
`[text | start | latents | end]`; attention is permutation-equivariant given the mask and the
positions, and the start/end/latent tokens share one RoPE position, so moving `end` before the
latents changes no output. It makes the und/gen routing two contiguous slices:
und = the first Lt + 2 tokens, gen = the last N. Text attends causally to valid text only; the
block (start, end, latents) attends to the row's valid text and to the whole block.
The unconditional CFG pass (§5) is the same row with text length 0.

Attention runs one of two ways (`Bagel.set_attention_backend`, the recipe's model.attn_backend):
`native` (default), torch SDPA over the padded batch with the boolean mask of `packed_mask`; or
`flash`, flash-attn's variable-length kernel over the valid tokens only (no padding), as the
official Bagel packs its sequences: two calls per layer, the text queries causal over their
row's text and the block queries over their row's text + block (`varlen_packing` builds the
metadata, `varlen_attention` runs them). The SDPA path is the flash path's CPU twin: the tests
hold the two equal with a torch stand-in for the kernel (tests/test_attn_backends.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

GEN = "_moe_gen"  # suffix of the generation expert's modules (§2)
TIMESTEP_FREQ_DIM = 256  # TimestepEmbedder input width (§4, §8)

# Modules of the official state dict that serve understanding only (§2); a T2I loader skips them
UNDERSTANDING_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")


def is_gen_param(name: str) -> bool:
    """Parameters Flow-GRPO's full fine-tuning trains: the generation expert (§9)."""
    return "moe_gen" in name


class MoTAttention(Qwen2Attention):
    """Qwen2 attention (q/k/v with bias, o without) plus the generation expert's projections
    and the four qk-norms. und rows use the base weights, gen rows the `_moe_gen` ones (§3)."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        h, hd = config.hidden_size, self.head_dim
        q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
        self.q_proj_moe_gen = nn.Linear(h, q_out, bias=True)
        self.k_proj_moe_gen = nn.Linear(h, kv_out, bias=True)
        self.v_proj_moe_gen = nn.Linear(h, kv_out, bias=True)
        self.o_proj_moe_gen = nn.Linear(q_out, h, bias=False)
        eps = config.rms_norm_eps
        for name in ("q_norm", "k_norm", "q_norm" + GEN, "k_norm" + GEN):
            setattr(self, name, Qwen2RMSNorm(hd, eps=eps))

    def _qkv(self, x: Tensor, sfx: str) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, H) -> q (B, L, nh, hd), k and v (B, L, nkv, hd); qk-norm before RoPE (§3)."""
        hd = self.head_dim
        q = getattr(self, "q_proj" + sfx)(x).unflatten(-1, (-1, hd))
        k = getattr(self, "k_proj" + sfx)(x).unflatten(-1, (-1, hd))
        v = getattr(self, "v_proj" + sfx)(x).unflatten(-1, (-1, hd))
        return getattr(self, "q_norm" + sfx)(q), getattr(self, "k_norm" + sfx)(k), v

    varlen_kernel: Callable | None = None  # flash_attn_varlen_func, set by the flash backend

    def forward(  # type: ignore[override]
        self, und: Tensor, gen: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | VarlenPacking
    ) -> tuple[Tensor, Tensor]:
        """und (B, Lu, H), gen (B, N, H) normed inputs -> attention outputs of the same shapes.
        mask: `packed_mask`'s (SDPA) or `varlen_packing`'s metadata (flash)."""
        lu = und.shape[1]
        parts = [self._qkv(und, ""), self._qkv(gen, GEN)]
        q, k, v = (torch.cat(t, dim=1).transpose(1, 2) for t in zip(*parts))  # (B, heads, L, hd)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if isinstance(mask, VarlenPacking):  # flash: the valid tokens only, GQA in the kernel
            kernel = self.varlen_kernel
            o = varlen_attention(q, k, v, mask, self.scaling, kernel).flatten(2)
        else:
            k = repeat_kv(k, self.num_key_value_groups)
            v = repeat_kv(v, self.num_key_value_groups)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            o = o.transpose(1, 2).flatten(2)  # (B, L, nh·hd)
        return self.o_proj(o[:, :lu]), self.o_proj_moe_gen(o[:, lu:])


class MoTDecoderLayer(nn.Module):
    """One Qwen2 decoder layer with a `_moe_gen` copy of every weight (§3 layer forward)."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, Qwen2RMSNorm(h, eps=eps))
            setattr(self, name + GEN, Qwen2RMSNorm(h, eps=eps))

    def forward(
        self, und: Tensor, gen: Tensor, cos: Tensor, sin: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        a_u, a_g = self.self_attn(
            self.input_layernorm(und), self.input_layernorm_moe_gen(gen), cos, sin, mask
        )
        und, gen = und + a_u, gen + a_g
        und = und + self.mlp(self.post_attention_layernorm(und))
        gen = gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(gen))
        return und, gen


class MoTModel(nn.Module):
    """`language_model.model`: embeddings, MoT layers, the two final norms, RoPE."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)  # inv_freq: non-persistent, not stored


class MoTCausalLM(nn.Module):
    """`language_model`: the decoder and its (untied, unused for T2I) lm_head (§1, §2)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.model = MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (not ×1000) -> [cos(t·f), sin(t·f)] (cos first, 256) -> Linear, SiLU,
    Linear (§4)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, t: Tensor) -> Tensor:
        half = TIMESTEP_FREQ_DIM // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000.0) * k / half)
        arg = t.float()[:, None] * freqs[None]
        feats = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)  # (B, 256) float32
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def sincos_2d_table(grid: int, hidden: int) -> Tensor:
    """The fixed latent position table (§4): row `r·G + c` = [S(c), S(r)], S(p) =
    [sin(p·ω), cos(p·ω)], ω_j = 10000^(−j/(H/4)). Used only to initialise from scratch."""
    if hidden % 4:
        raise ValueError(f"hidden size ({hidden}) must be divisible by 4 for the 2-D sin-cos table")
    quarter = hidden // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    p = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]  # (G, H/4)
    s = torch.cat([torch.sin(p), torch.cos(p)], dim=-1)  # (G, H/2): S(p) per position
    rows = torch.arange(grid).repeat_interleave(grid)  # r of row r·G + c
    cols = torch.arange(grid).repeat(grid)
    return torch.cat([s[cols], s[rows]], dim=-1).float()


class LatentPositionEmbedding(nn.Module):
    """`latent_pos_embed.pos_embed` (G², H): a frozen parameter, stored in the checkpoint."""

    def __init__(self, max_latent_size: int, hidden: int):
        super().__init__()
        self.max_latent_size = max_latent_size
        table = sincos_2d_table(max_latent_size, hidden)
        self.pos_embed = nn.Parameter(table, requires_grad=False)

    def position_ids(self, h: int, w: int, device: torch.device) -> Tensor:
        """(h·w,) ids `row·G + col` of a row-major h×w patch grid ("extrapolate" rule, §4)."""
        g = self.max_latent_size
        if h > g or w > g:
            raise ValueError(
                f"latent grid {h}×{w} exceeds max_latent_size {g}: image sides must be at most "
                f"{16 * g} px"
            )
        r = torch.arange(h, device=device)[:, None]
        c = torch.arange(w, device=device)[None, :]
        return (r * g + c).reshape(-1)

    def forward(self, h: int, w: int) -> Tensor:
        return self.pos_embed[self.position_ids(h, w, self.pos_embed.device)]


def packed_mask(text_len: Tensor, lt: int, n_block: int) -> Tensor:
    """Boolean attention mask (B, 1, L, L), True = attend, for rows
    `[text (lt, first text_len valid) | block (n_block)]` (§3): text causal over valid text,
    block over valid text + the whole block, text never sees the block. Padding queries see
    themselves only (their outputs are discarded; a fully masked row would give NaN)."""
    length = lt + n_block
    dev = text_len.device
    idx = torch.arange(length, device=dev)
    is_text = idx < lt  # (L,)
    valid_text = (idx[None] < text_len[:, None]) & is_text[None]  # (B, L) keys
    causal = idx[:, None] >= idx[None, :]  # (L, L)
    text_rows = causal[None] & valid_text[:, None, :]
    block_rows = (valid_text | ~is_text[None])[:, None, :].expand(-1, length, -1)
    mask = torch.where(is_text[None, :, None], text_rows, block_rows)
    return (mask | torch.eye(length, dtype=torch.bool, device=dev)[None])[:, None]


@dataclass
class VarlenPacking:
    """Where the valid tokens of a padded packed batch (B rows of length L = lt + n_block:
    `[text (lt, the first text_len valid) | block (n_block)]`) go in flash-attn's
    variable-length layout: tokens of all rows concatenated, segment b from cu_seqlens[b] to
    cu_seqlens[b + 1] (int32, starting at 0), and the longest segment as a python int. Indices
    are row-major positions in the flattened (B·L) batch.

    Text call (causal): queries = keys = the valid text of each row with text; rows without
    text (the unconditional CFG pass) have no segment. Block call (full): queries = each row's
    block, keys = the row's valid text followed by its block."""

    text_index: Tensor  # (Tt,) long: the valid text tokens, row by row
    cu_text: Tensor  # (R + 1,) int32 over the R rows with text_len > 0
    max_text: int
    block_index: Tensor  # (B·n_block,) long
    cu_block: Tensor  # (B + 1,) int32: b·n_block
    max_block: int
    key_index: Tensor  # (Tt + B·n_block,) long: per row its valid text, then its block
    cu_keys: Tensor  # (B + 1,) int32: cumulative text_len + n_block
    max_keys: int
    length: int  # L, the padded row length


def varlen_packing(text_len: Tensor, lt: int, n_block: int) -> VarlenPacking:
    """The varlen metadata of the padded packed batch that `packed_mask` masks (same rows)."""
    dev = text_len.device
    b, length = text_len.shape[0], lt + n_block
    lens = text_len.to(torch.long)
    pos = torch.arange(length, device=dev)
    row_start = torch.arange(b, device=dev)[:, None] * length
    is_text = (pos[None] < lens[:, None]) & (pos[None] < lt)  # (B, L) valid text
    is_block = (pos >= lt)[None].expand(b, -1)
    keep = is_text | is_block
    flat = (row_start + pos[None]).reshape(-1)

    def cumulative(seg: Tensor) -> Tensor:
        return F.pad(torch.cumsum(seg, 0), (1, 0)).to(torch.int32)

    with_text = lens[lens > 0]
    return VarlenPacking(
        text_index=flat[is_text.reshape(-1)],
        cu_text=cumulative(with_text),
        max_text=int(with_text.max()) if with_text.numel() else 0,
        block_index=flat[is_block.reshape(-1)],
        cu_block=cumulative(torch.full((b,), n_block, device=dev)),
        max_block=n_block,
        key_index=flat[keep.reshape(-1)],  # row-major: a row's text precedes its block
        cu_keys=cumulative(lens + n_block),
        max_keys=int(lens.max()) + n_block if b else n_block,
        length=length,
    )


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, pack: VarlenPacking, scale: float, kernel: Callable
) -> Tensor:
    """Bagel's packed attention through a flash-attn-style varlen kernel
    `kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=,
    causal=)` on (tokens, heads, head_dim) inputs. q (B, nh, L, hd), k and v (B, nkv, L, hd)
    -> (B, L, nh, hd); padding positions come out 0 (nothing reads them)."""
    b, nh, length, hd = q.shape

    def tokens(x: Tensor) -> Tensor:  # (B, h, L, hd) -> (B·L, h, hd)
        return x.transpose(1, 2).reshape(b * length, x.shape[1], hd)

    q, k, v = tokens(q), tokens(k), tokens(v)
    out = q.new_zeros(q.shape)
    if pack.text_index.numel():
        ti = pack.text_index
        o_text = kernel(
            q[ti], k[ti], v[ti], pack.cu_text, pack.cu_text, pack.max_text, pack.max_text,
            softmax_scale=scale, causal=True,
        )  # fmt: skip
        out = out.index_copy(0, ti, o_text.to(out.dtype))
    ki = pack.key_index
    o_block = kernel(
        q[pack.block_index], k[ki], v[ki], pack.cu_block, pack.cu_keys, pack.max_block,
        pack.max_keys, softmax_scale=scale, causal=False,
    )  # fmt: skip
    out = out.index_copy(0, pack.block_index, o_block.to(out.dtype))
    return out.reshape(b, length, nh, hd)


def packed_positions(text_len: Tensor, lt: int, n_block: int) -> Tensor:
    """RoPE positions (B, L): text 0..lt−1; every block token at the row's text length (§3)."""
    b = text_len.shape[0]
    text = torch.arange(lt, device=text_len.device)[None].expand(b, -1)
    block = text_len[:, None].expand(-1, n_block)
    return torch.cat([text, block], dim=1)


def patchify(z: Tensor, p: int = 2) -> Tensor:
    """VAE latents (B, C, p·h, p·w) -> tokens (B, h·w, p²·C): z[c, p·r+py, p·c'+px] ->
    token[r·w + c', (p·py + px)·C + c] (§4 step 1)."""
    b, c, hh, ww = z.shape
    h, w = hh // p, ww // p
    x = z.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, py, px, C)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(x: Tensor, h: int, w: int, p: int = 2) -> Tensor:
    """Tokens (B, h·w, p²·C) -> latents (B, C, p·h, p·w); the inverse of `patchify`."""
    b, _, d = x.shape
    c = d // (p * p)
    z = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, py, w, px)
    return z.reshape(b, c, h * p, w * p)


class Bagel(nn.Module):
    """Bagel's T2I module tree (§2): `language_model`, `time_embedder`, `vae2llm`, `llm2vae`,
    `latent_pos_embed`. `forward` is one velocity evaluation (§4) on a packed batch."""

    def __init__(
        self,
        llm_config: Qwen2Config,
        *,
        max_latent_size: int = 64,
        latent_channels: int = 16,
        latent_patch_size: int = 2,
        start_of_image: int,
        end_of_image: int,
    ):
        super().__init__()
        h = llm_config.hidden_size
        if h % llm_config.num_attention_heads or llm_config.num_attention_heads % max(
            1, llm_config.num_key_value_heads
        ):
            raise ValueError("llm_config: hidden % heads and heads % kv_heads must be 0")
        self.llm_config = llm_config
        self.latent_patch_size = latent_patch_size
        self.latent_channels = latent_channels
        self.patch_dim = latent_patch_size**2 * latent_channels  # P = 64 (§1)
        self.start_of_image, self.end_of_image = int(start_of_image), int(end_of_image)
        self.language_model = MoTCausalLM(llm_config)
        self.time_embedder = TimestepEmbedder(h)
        self.vae2llm = nn.Linear(self.patch_dim, h)
        self.llm2vae = nn.Linear(h, self.patch_dim)
        self.latent_pos_embed = LatentPositionEmbedding(max_latent_size, h)
        self.gradient_checkpointing = False
        self.attn_backend = "native"

    @property
    def max_latent_size(self) -> int:
        return self.latent_pos_embed.max_latent_size

    def set_attention_backend(self, name: str, kernel: Callable | None = None) -> None:
        """`native` (SDPA over the padded batch) or `flash` (flash-attn's varlen kernel, which
        needs the flash_attn package and a CUDA device). `kernel` replaces
        flash_attn_varlen_func (tests run the flash path on CPU with a torch stand-in)."""
        if name not in ("native", "flash"):
            raise ValueError(f"model.attn_backend={name}: Bagel runs native or flash")
        if name == "flash" and kernel is None:
            try:
                from flash_attn import flash_attn_varlen_func as kernel
            except ImportError as e:
                raise RuntimeError(
                    f"model.attn_backend=flash needs flash-attn ({e}); pip install "
                    "'flash-attn>=2.6.3' or use model.attn_backend=native"
                ) from None
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "model.attn_backend=flash needs a CUDA device; use model.attn_backend=native"
                )
        self.attn_backend = name
        for layer in self.language_model.model.layers:
            layer.self_attn.varlen_kernel = kernel if name == "flash" else None

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each MoT layer in backward (the Engine calls this when configured)."""
        self.gradient_checkpointing = True

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        text_ids: Tensor,
        text_len: Tensor,
        grid: tuple[int, int],
    ) -> Tensor:
        """Velocity tokens (B, N, P) in the module dtype.

        latents (B, N, P) patchified noisy latents; timesteps (B,) t in (0, 1]; text_ids
        (B, Lt) long, the first text_len[b] valid (`<|im_start|>` prompt `<|im_end|>`, or
        length 0 for the unconditional pass); grid (h, w) with N = h·w.
        """
        lm = self.language_model.model
        b, n, _ = latents.shape
        h, w = grid
        if h * w != n:
            raise ValueError(f"grid {h}×{w} does not match {n} latent tokens")
        dtype, dev = self.vae2llm.weight.dtype, latents.device
        lt = text_ids.shape[1]
        special = torch.tensor([self.start_of_image, self.end_of_image], device=dev)
        ids = torch.cat([text_ids, special[None].expand(b, -1)], dim=1)  # (B, Lt + 2)
        und = lm.embed_tokens(ids)
        gen = self.vae2llm(latents.to(dtype))
        gen = gen + self.time_embedder(timesteps)[:, None] + self.latent_pos_embed(h, w)[None]
        if self.attn_backend == "flash":
            mask = varlen_packing(text_len, lt, n + 2)
        else:
            mask = packed_mask(text_len, lt, n + 2)
        cos, sin = lm.rotary_emb(und, packed_positions(text_len, lt, n + 2))
        for layer in lm.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                und, gen = checkpoint(layer, und, gen, cos, sin, mask, use_reentrant=False)
            else:
                und, gen = layer(und, gen, cos, sin, mask)
        # und rows would take lm.norm; only the latent rows are read out (§4 step 4)
        return self.llm2vae(lm.norm_moe_gen(gen))

    # ---- LoRA (peft), the calls flowpo's Engine makes on the trainable module ---------------
    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """Inject peft LoRA layers (as diffusers' and transformers' `add_adapter` do)."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(adapter_config, self, adapter_name)

    def _set_adapters(self, enabled: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in self.modules():
            if isinstance(m, BaseTunerLayer):
                m.enable_adapters(enabled)

    def disable_adapters(self) -> None:
        self._set_adapters(False)

    def enable_adapters(self) -> None:
        self._set_adapters(True)
