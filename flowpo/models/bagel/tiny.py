"""A tiny random Bagel in the official directory layout (`flowpo make-tiny bagel DIR`).

Sizes follow docs/bagel.md §8: Qwen2 decoder hidden 64, 2 layers, 4 heads, 2 KV heads (head dim 16),
MLP 128; max_latent_size 8 (images up to 128 px); z = 16 latent channels, patch 2 (P = 64);
FLUX-layout autoencoder with ch 32, ch_mult [1, 1, 1, 1] (keeps ×8), 1 res-block per level.
Norm weights and `llm2vae` are randomised (the official init zeroes `llm2vae`, which would give
v = 0, and equal norms would hide a und/gen mix-up). The tokenizer is a byte-level BPE in the
Qwen2 format, trained in code with a fixed tie-break, plus the Qwen2.5 special tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowpo.models.bagel.checkpoint import AE_WEIGHTS, BOS, EOI, EOS, SOI

TINY_LLM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    hidden_act="silu",
)
TINY_MAX_LATENT_SIZE = 8
TINY_VAE = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z=16)
_SPECIALS = ["<|endoftext|>", BOS, EOS, SOI, EOI]


def tiny_tokenizer() -> Any:
    """A Qwen2Tokenizer (byte-level BPE, Qwen2 pre-tokeniser) over flowpo's tiny word list,
    with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|vision_end|>`."""
    from tokenizers import pre_tokenizers
    from transformers import AddedToken, Qwen2Tokenizer

    from flowpo.models.tiny_tokenizers import WORDS, replay_merges

    probe = Qwen2Tokenizer()  # only for its pre-tokeniser (Qwen2 regex + byte level)
    pre = probe._tokenizer.pre_tokenizer
    # deterministic BPE (the `tokenizers` trainer breaks ties in hash order); byte-level: no
    # end-of-word suffix; it merges until no pair is left, so every listed word is one token
    merges = replay_merges(pre, " ".join(WORDS), None, suffix="")
    vocab: dict[str, int] = {}
    for piece in sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    for s in _SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=4096)
    tok.add_tokens([AddedToken(s, special=True) for s in _SPECIALS[1:]])
    return tok


def write_tiny_bagel(out_dir: str, *, seed: int = 0, resolution: int = 32) -> str:
    """Write a tiny random Bagel to `out_dir` (llm_config.json, ema.safetensors,
    ae.safetensors, tokenizer files); the same seed gives the same weights. `resolution` only
    has to fit the position table (≤ 16 · 8 = 128 px); the adapter takes the size at load."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    from flowpo.models.bagel.checkpoint import bfl_from_diffusers, save_bagel
    from flowpo.models.bagel.modeling import Bagel

    if resolution % 16 or not 16 <= resolution <= 16 * TINY_MAX_LATENT_SIZE:
        raise ValueError(
            f"resolution ({resolution}) must be a multiple of 16 between 16 and "
            f"{16 * TINY_MAX_LATENT_SIZE} for the tiny Bagel (max_latent_size "
            f"{TINY_MAX_LATENT_SIZE})"
        )
    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids([SOI, EOI])
    cfg = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=False, **TINY_LLM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Bagel(
            cfg, max_latent_size=TINY_MAX_LATENT_SIZE, start_of_image=ids[0], end_of_image=ids[1]
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:  # every RMSNorm weight, und and gen
                    p.uniform_(0.5, 1.5)
            model.llm2vae.weight.normal_(0, 0.1)
            model.llm2vae.bias.normal_(0, 0.1)
        v = TINY_VAE
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(v["ch_mult"]),
            up_block_types=("UpDecoderBlock2D",) * len(v["ch_mult"]),
            block_out_channels=tuple(v["ch"] * m for m in v["ch_mult"]),
            layers_per_block=v["num_res_blocks"],
            latent_channels=v["z"],
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    out = Path(out_dir)
    save_bagel(model, out)
    save_file(bfl_from_diffusers(vae), str(out / AE_WEIGHTS))
    tok.save_pretrained(str(out))
    return str(out)
