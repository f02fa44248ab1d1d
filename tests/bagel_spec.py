"""Bagel's velocity for one sample, docs/bagel.md §3-§4 read literally (float64), written
independently of flowpo/models/bagel: the official token order [text | start | latents | end],
the expert chosen per token, the explicit attention mask, grouped-query attention head by head.
Only the state dict (official names) is shared with the module under test."""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def spec_velocity(sd, cfg, x, t, ids, soi, eoi, grid_hw, max_latent):
    """One sample, docs/bagel.md §3-§4 read literally, float64: the official token order
    [text | start | latents | end], per-token expert choice, explicit mask, manual GQA."""
    silu = torch.nn.functional.silu
    hdim, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd, eps = hdim // nh, cfg.rms_norm_eps
    hh, ww = grid_hw
    n, lt = hh * ww, len(ids)
    emb = sd["language_model.model.embed_tokens.weight"]
    # §4 step 2: TE(t) with raw t, cos first; PE row r·G + c; vae2llm
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    te = torch.cat([torch.cos(t * f), torch.sin(t * f)])
    te = silu(sd["time_embedder.mlp.0.weight"] @ te + sd["time_embedder.mlp.0.bias"])
    te = sd["time_embedder.mlp.2.weight"] @ te + sd["time_embedder.mlp.2.bias"]
    pe = sd["latent_pos_embed.pos_embed"][
        [r * max_latent + c for r in range(hh) for c in range(ww)]
    ]
    lat = x @ sd["vae2llm.weight"].T + sd["vae2llm.bias"] + te + pe
    xs = torch.cat([emb[ids], emb[[soi]], lat, emb[[eoi]]])
    length = lt + n + 2
    gen = torch.tensor([False] * (lt + 1) + [True] * n + [False])[:, None]  # (L, 1)
    # §3: text causal over text; every block row sees all text and the whole block
    mask = torch.ones(length, length, dtype=torch.bool)
    for i in range(lt):
        mask[i, i + 1 :] = False
    pos = torch.tensor(list(range(lt)) + [lt] * (n + 2), dtype=torch.float64)
    theta = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[:, None]  # (L, 1, hd)

    def rope(v):
        rot = torch.cat([-v[..., hd // 2 :], v[..., : hd // 2]], -1)
        return v * ang.cos() + rot * ang.sin()

    def pick(und, gen_):  # per-token expert choice
        return torch.where(gen if und.ndim == 2 else gen[..., None], gen_, und)

    for i in range(cfg.num_hidden_layers):
        w = {
            k[len(f"language_model.model.layers.{i}.") :]: v
            for k, v in sd.items()
            if k.startswith(f"language_model.model.layers.{i}.")
        }
        hn = pick(
            _rms(xs, w["input_layernorm.weight"], eps),
            _rms(xs, w["input_layernorm_moe_gen.weight"], eps),
        )
        qkv = {}
        for name, heads in (("q", nh), ("k", nkv), ("v", nkv)):
            u = hn @ w[f"self_attn.{name}_proj.weight"].T + w[f"self_attn.{name}_proj.bias"]
            g = hn @ w[f"self_attn.{name}_proj_moe_gen.weight"].T
            g = g + w[f"self_attn.{name}_proj_moe_gen.bias"]
            u, g = u.view(length, heads, hd), g.view(length, heads, hd)
            if name != "v":  # qk-norm per head, before RoPE
                u = _rms(u, w[f"self_attn.{name}_norm.weight"], eps)
                g = _rms(g, w[f"self_attn.{name}_norm_moe_gen.weight"], eps)
            qkv[name] = pick(u, g)
        q, k, v = rope(qkv["q"]), rope(qkv["k"]), qkv["v"]
        o = torch.empty(length, nh, hd, dtype=torch.float64)
        for head in range(nh):
            kv = head // (nh // nkv)
            att = (q[:, head] @ k[:, kv].T) / math.sqrt(hd)
            o[:, head] = att.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, kv]
        o = o.reshape(length, nh * hd)
        xs = xs + pick(
            o @ w["self_attn.o_proj.weight"].T, o @ w["self_attn.o_proj_moe_gen.weight"].T
        )
        hn = pick(
            _rms(xs, w["post_attention_layernorm.weight"], eps),
            _rms(xs, w["post_attention_layernorm_moe_gen.weight"], eps),
        )
        mlp = {}
        for m in ("mlp", "mlp_moe_gen"):
            gate, up = hn @ w[f"{m}.gate_proj.weight"].T, hn @ w[f"{m}.up_proj.weight"].T
            mlp[m] = (silu(gate) * up) @ w[f"{m}.down_proj.weight"].T
        xs = xs + pick(mlp["mlp"], mlp["mlp_moe_gen"])
    out = _rms(xs[lt + 1 : lt + 1 + n], sd["language_model.model.norm_moe_gen.weight"], eps)
    return out @ sd["llm2vae.weight"].T + sd["llm2vae.bias"]
