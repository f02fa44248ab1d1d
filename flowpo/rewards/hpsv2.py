"""`hpsv2`: Human Preference Score v2 / v2.1 (Wu et al. 2023, arXiv 2306.09341).

HPS-v2 is open_clip's ViT-H-14 CLIP fine-tuned on human preferences; its score is the cosine
of the L2-normalised image and text embeddings (the HPSv2 code's `hpsv2.score` returns
`image_features @ text_features.T` of normalised features, about 0.2-0.4; its benchmark tables
print the mean x 100). `scale` defaults to 1, hpsv2.score's scale; `scale: 100` gives the
benchmark tables' units.

How it is built here (docs/rewards.md, "HPS-v2 and ImageReward"):
- Architecture: open_clip's `ViT-H-14` model config (embed 1024; vision width 1280, 32 layers,
  head width 80, patch 14, 224 px; text width 1024, 24 layers, 16 heads, 77 tokens, vocab
  49408, exact GELU, LayerNorm eps 1e-5), run as transformers' `CLIPModel`, the same network
  under other parameter names. open_clip itself cannot be imported here: it imports
  torchvision, whose PyPI wheels are CUDA builds that break on a CPU torch
  (docs/environment.md). `OPENCLIP_TO_HF` below maps the open_clip state dict onto CLIPModel.
- Tokenizer: open_clip's bundled BPE (`open_clip/bpe_simple_vocab_16e6.txt.gz`, the OpenAI
  CLIP vocabulary) read from the installed open-clip-torch package without importing it, with
  open_clip's text cleaning (ftfy, HTML unescape twice, whitespace, lower case), 77 tokens,
  padded with 0; or, with `tokenizer_dir`, a transformers CLIP tokenizer directory such as
  CLIP-ViT-H-14-laion2B-s32B-b79K (the same vocabulary).
- Image: CLIP's eval transform (bicubic short side to 224, centre crop, OpenAI mean/std).
- Weights: `checkpoint` = HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt), read with
  `torch.load(weights_only=True)` (its `state_dict` entry), or a safetensors conversion.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import re
from pathlib import Path

import torch

from flowpo.rewards.contract import RewardOutput
from flowpo.rewards.loading import clip_preprocess, load_state_file

# open_clip's model_configs/ViT-H-14.json (open-clip-torch 3.3.0)
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {
        "image_size": 224,
        "layers": 32,
        "width": 1280,
        "head_width": 80,
        "patch_size": 14,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 1024,
        "heads": 16,
        "layers": 24,
    },
}
FIX = (
    "download HPS_v2.1_compressed.pt (hub repository xswu/HPSv2) on a machine with network, "
    "copy it here and set reward.options.hpsv2.checkpoint=PATH"
)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"

# open_clip name (after `transformer.resblocks.{i}.` / `visual.transformer.resblocks.{i}.`)
# -> CLIPModel name (after `{text,vision}_model.encoder.layers.{i}.`)
BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# whole-model names; the two projections are transposed (open_clip multiplies x @ proj)
OPENCLIP_TO_HF = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
}
TRANSPOSED = ("text_projection", "visual.proj")


def openclip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT tower, built-in text tower) as CLIPModel's; raises
    ValueError naming the keys it does not know."""
    out, unknown = {}, []
    for key, t in state.items():
        m = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        m_in = re.match(
            r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key
        )
        if m_in:  # fused q, k, v of nn.MultiheadAttention
            tower = "vision_model" if m_in.group(1) else "text_model"
            pre = f"{tower}.encoder.layers.{m_in.group(2)}.self_attn."
            for name, part in zip(("q", "k", "v"), t.chunk(3, dim=0), strict=True):
                out[f"{pre}{name}_proj.{m_in.group(3)}"] = part.clone()
        elif m and m.group(3) in BLOCK:
            tower = "vision_model" if m.group(1) else "text_model"
            out[f"{tower}.encoder.layers.{m.group(2)}.{BLOCK[m.group(3)]}.{m.group(4)}"] = t
        elif key in OPENCLIP_TO_HF:
            out[OPENCLIP_TO_HF[key]] = t.t().contiguous() if key in TRANSPOSED else t
        elif key == "attn_mask":  # the causal mask buffer of old open_clip versions
            continue
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip ViT CLIP state dict: unknown keys {unknown[:8]}")
    return out


def hf_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `openclip_to_hf` (for writing tiny checkpoints in the published layout)."""
    inv = {v: k for k, v in OPENCLIP_TO_HF.items()}
    block_inv = {v: k for k, v in BLOCK.items()}
    out, qkv = {}, {}
    for key, t in state.items():
        m = re.match(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        pre = "" if m is None or m.group(1) == "text" else "visual."
        if m and m.group(3) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((pre, m.group(2), m.group(4)), {})[m.group(3)[10]] = t
        elif m and m.group(3) in block_inv:
            out[f"{pre}transformer.resblocks.{m.group(2)}.{block_inv[m.group(3)]}.{m.group(4)}"] = t
        elif key in inv:
            out[inv[key]] = t.t().contiguous() if inv[key] in TRANSPOSED else t
    for (pre, i, kind), parts in qkv.items():
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{pre}transformer.resblocks.{i}.attn.in_proj_{kind}"] = fused
    return out


def clip_config(oc: dict):
    """transformers CLIPConfig of an open_clip model config (ViT vision tower, built-in text)."""
    from transformers import CLIPConfig

    v, t = oc["vision_cfg"], oc["text_cfg"]
    mlp = v.get("mlp_ratio", 4.0)
    return CLIPConfig(
        text_config=dict(
            vocab_size=t["vocab_size"],
            hidden_size=t["width"],
            intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            max_position_embeddings=t["context_length"],
            hidden_act="gelu",  # open_clip's nn.GELU unless a -quickgelu config
            layer_norm_eps=1e-5,
            bos_token_id=t["vocab_size"] - 2,
            eos_token_id=t["vocab_size"] - 1,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=v["width"],
            intermediate_size=int(v["width"] * mlp),
            num_hidden_layers=v["layers"],
            num_attention_heads=v["width"] // v.get("head_width", 64),
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=oc["embed_dim"],
    )


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes, in the order of CLIP's (and GPT-2's) BPE vocabulary:
    the printable Latin-1 bytes keep their own character, the rest map to 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


def bundled_bpe_path() -> Path:
    """open-clip-torch's bundled vocabulary, located without importing open_clip (which needs
    torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "reward.options.hpsv2.tokenizer_dir: empty, and open-clip-torch (whose bundled BPE "
            "vocabulary it then uses) is not installed; run scripts/setup.sh, or set "
            "tokenizer_dir to a CLIP tokenizer directory (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def bpe_tokenizer(bpe_gz: Path, vocab_size: int = 49408):
    """transformers CLIPTokenizer over an OpenAI-CLIP BPE merges file: the vocabulary is the 256
    byte characters, the same with the end-of-word mark `</w>`, one entry per merge (the first
    vocab_size - 514 lines after the header), then <|startoftext|> and <|endoftext|>."""
    from transformers import CLIPTokenizer

    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : vocab_size - 512 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    pieces = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab = {p: i for i, p in enumerate([*pieces, SOT, EOT])}
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOT, pad_token=EOT)


def clean_text(text: str) -> str:
    """open_clip's text cleaning: ftfy (when installed), HTML unescaped twice, whitespace
    collapsed; lower case is the tokenizer's."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: list[str], context_length: int) -> torch.Tensor:
    """(B, context_length) ids as open_clip's tokenizer gives them: <sot> text <eot>, cut to the
    context with <eot> kept last, zero-padded."""
    ids = torch.zeros(len(prompts), context_length, dtype=torch.long)
    for i, p in enumerate(prompts):
        # split_special_tokens: a literal "<|endoftext|>" in a prompt is text, as in open_clip
        toks = tokenizer(clean_text(p), add_special_tokens=False, split_special_tokens=True)
        toks = toks["input_ids"]
        toks = [tokenizer.convert_tokens_to_ids(SOT), *toks][: context_length - 1]
        toks.append(tokenizer.convert_tokens_to_ids(EOT))
        ids[i, : len(toks)] = torch.tensor(toks)
    return ids


def load_hps(
    checkpoint: str,
    model_config: str = "",
    tokenizer_dir: str = "",
    device="cpu",
    dtype=torch.float32,
):
    """(CLIPModel in eval mode, tokenizer, open_clip model config) from local files only."""
    from transformers import CLIPModel, CLIPTokenizer

    where = "reward.options.hpsv2"
    oc = VIT_H_14
    if model_config:
        try:
            oc = json.loads(Path(model_config).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}.model_config: cannot read '{model_config}': {e}") from None
    state = load_state_file(checkpoint, f"{where}.checkpoint", FIX)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved checkpoints
    model = CLIPModel(clip_config(oc))
    try:
        missing, unexpected = model.load_state_dict(openclip_to_hf(state), strict=False)
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"{where}.checkpoint: '{checkpoint}' does not fit the open_clip config "
            f"({model_config or 'ViT-H-14'}): {str(e)[:400]}"
        ) from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{where}.checkpoint: '{checkpoint}' is not an open_clip ViT CLIP checkpoint: "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if tokenizer_dir:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    else:
        tokenizer = bpe_tokenizer(bundled_bpe_path(), oc["text_cfg"]["vocab_size"])
    return model, tokenizer, oc


def hpsv2(
    checkpoint: str,
    tokenizer_dir: str = "",
    model_config: str = "",
    scale: float = 1.0,
    device: str = "",
    dtype: str = "float32",
):
    from flowpo.rewards.clip_rewards import DTYPES, default_device, features_tensor

    if dtype not in DTYPES:
        raise ValueError(f"reward.options.hpsv2.dtype '{dtype}': choose one of {sorted(DTYPES)}")
    model, tokenizer, oc = load_hps(
        checkpoint, model_config, tokenizer_dir, device or default_device(), DTYPES[dtype]
    )
    dev, wdtype = model.logit_scale.device, next(model.parameters()).dtype
    size, ctx = oc["vision_cfg"]["image_size"], oc["text_cfg"]["context_length"]

    @torch.no_grad()
    def fn(images, prompts, metadata) -> RewardOutput:
        pix = clip_preprocess(images, size).to(dev, wdtype)
        ids = tokenize(tokenizer, list(prompts), ctx).to(dev)
        # no attention mask: open_clip's text tower is causal only, and the pooled <eot>
        # token sees nothing after it
        img = features_tensor(model.get_image_features(pixel_values=pix))
        txt = features_tensor(model.get_text_features(input_ids=ids))
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        cos = (img * txt).sum(-1).cpu()
        return RewardOutput(scores=(scale * cos).float(), details={"cos": cos})

    return fn
