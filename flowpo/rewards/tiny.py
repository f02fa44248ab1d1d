"""Tiny random reward models saved to local directories, in the layouts the real rewards load
(CLIP, the LAION aesthetic head, Mask2Former). For tests and CPU demos: scores are meaningless,
the plumbing is real."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_clip(out_dir: str, *, projection_dim: int = 8, image_size: int = 32) -> str:
    """A random CLIPModel + CLIPProcessor (byte-level BPE tokenizer trained in code)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from flowpo.models.tiny_tokenizers import clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=1200,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    tok = clip_tokenizer(77)
    assert len(tok) <= cfg.text_config.vocab_size and tok.eos_token_id == 1
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tok,
    )
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return out_dir


def make_tiny_aesthetic(out_dir: str) -> str:
    """Tiny CLIP in `out_dir` plus a random LAION-layout head `aesthetic_head.safetensors`."""
    from safetensors.torch import save_file

    from flowpo.rewards.aesthetic import AestheticHead

    make_tiny_clip(out_dir)
    torch.manual_seed(1)
    head = AestheticHead(8)
    save_file(head.state_dict(), str(Path(out_dir) / "aesthetic_head.safetensors"))
    return out_dir


def make_tiny_mask2former(out_dir: str, *, image_size: int = 64) -> str:
    """A random Mask2FormerForUniversalSegmentation with the 80 COCO classes and its processor."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    from flowpo.rewards.geneval_rules import COCO_CLASSES

    torch.manual_seed(0)
    backbone = SwinConfig(
        image_size=image_size,
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        hidden_dim=32,  # GroupNorm(32, .) in the pixel decoder needs multiples of 32
        mask_feature_size=32,
        feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_queries=10,
        common_stride=4,
        id2label=dict(enumerate(COCO_CLASSES)),
        label2id={c: i for i, c in enumerate(COCO_CLASSES)},
    )
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    proc = Mask2FormerImageProcessor(
        size={"shortest_edge": image_size, "longest_edge": image_size * 2}, num_labels=80
    )
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return out_dir


# a tiny open_clip model config, in the format of open_clip's model_configs/*.json
TINY_OPEN_CLIP = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
    # the bundled BPE vocabulary has 49408 entries, so the token table keeps that size
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}


def make_tiny_hpsv2(out_dir: str) -> str:
    """A random CLIPModel of `TINY_OPEN_CLIP` saved in HPS's published layout:
    `HPS_tiny.pt` = {"state_dict": open_clip keys} (torch.save) and `open_clip_config.json`."""
    import json

    from transformers import CLIPModel

    from flowpo.rewards.hpsv2 import clip_config, hf_to_openclip

    torch.manual_seed(0)
    model = CLIPModel(clip_config(TINY_OPEN_CLIP)).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_to_openclip(model.state_dict())
    torch.save({"state_dict": state}, out / "HPS_tiny.pt")
    (out / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP, indent=1))
    return out_dir


TINY_IMAGEREWARD = {
    "vision": dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    ),
    "text": dict(
        hidden_size=24,
        encoder_hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
    ),
}


def make_tiny_imagereward(out_dir: str) -> str:
    """A random BlipVisionModel + BlipTextModel + MLP head saved in ImageReward's published
    layout (`ImageReward_tiny.pt`, blip.visual_encoder.* / blip.text_encoder.* / mlp.layers.*,
    plus the unused blip.vision_proj / text_proj), its `model_config.json`, and a WordPiece
    tokenizer over the tiny word list in `bert/` (vocabulary + [DEC], [ENC] = the table size)."""
    import json

    from transformers import BertTokenizer

    from flowpo.models.tiny_tokenizers import WORDS
    from flowpo.rewards.imagereward import TEXT, VISION, ImageRewardModel, hf_to_imagereward

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(WORDS))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *[f"##{c}" for c in "sdey"]]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(str(out / "bert"))
    cfg = {k: dict(v) for k, v in TINY_IMAGEREWARD.items()}
    cfg["text"].update(vocab_size=len(vocab) + 2, bos_token_id=len(vocab), sep_token_id=3)
    (out / "model_config.json").write_text(json.dumps(cfg, indent=1))
    torch.manual_seed(0)
    model = ImageRewardModel({**VISION, **cfg["vision"]}, {**TEXT, **cfg["text"]}).eval()
    state = hf_to_imagereward(model.state_dict())
    state["blip.vision_proj.weight"] = torch.randn(4, cfg["vision"]["hidden_size"])
    state["blip.text_proj.weight"] = torch.randn(4, cfg["text"]["hidden_size"])
    torch.save(state, out / "ImageReward_tiny.pt")
    return out_dir
