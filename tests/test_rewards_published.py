"""`hpsv2` and `imagereward` on tiny random weights saved in the published checkpoint layouts:
each scores as an independent forward written over the published keys (open_clip's CLIP,
ImageReward's BLIP ViT + BERT-with-cross-attention + MLP), in process and through the reward
service; the HPS tokenizer gives open_clip's token ids; a missing checkpoint or a pickle that
needs code stops with the option and the fix; the E-GRPO recipe's reward options validate."""

from __future__ import annotations

import argparse
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from flowpo.rewards.base import build_reward, check_reward_options
from flowpo.rewards.loading import clip_preprocess
from flowpo.rewards.tiny import make_tiny_hpsv2, make_tiny_imagereward

PROMPTS = ["a red cat on a bench", "two dogs &amp; a   cat", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    make_tiny_hpsv2(str(root / "hps"))
    make_tiny_imagereward(str(root / "ir"))
    return root


def hps_opts(root) -> dict:
    return dict(
        checkpoint=str(root / "hps" / "HPS_tiny.pt"),
        model_config=str(root / "hps" / "open_clip_config.json"),
        device="cpu",
    )


def ir_opts(root) -> dict:
    return dict(
        checkpoint=str(root / "ir" / "ImageReward_tiny.pt"),
        tokenizer_dir=str(root / "ir" / "bert"),
        model_config=str(root / "ir" / "model_config.json"),
        device="cpu",
    )


def images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


# -- independent reference forwards over the published keys ----------------------------------


def mha(x, sd, pre, heads, mask=None):
    """nn.MultiheadAttention (open_clip's attention) with the checkpoint's fused in_proj."""
    attn = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
    attn.load_state_dict(
        {k.removeprefix(pre): v for k, v in sd.items() if k.startswith(pre)}, strict=True
    )
    return attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def ln(x, sd, pre, eps):
    return F.layer_norm(x, x.shape[-1:], sd[pre + ".weight"], sd[pre + ".bias"], eps)


def lin(x, sd, pre):
    return F.linear(x, sd[pre + ".weight"], sd.get(pre + ".bias"))


def openclip_tower(x, sd, pre, layers, heads, mask=None):
    for i in range(layers):
        b = f"{pre}transformer.resblocks.{i}."
        x = x + mha(ln(x, sd, b + "ln_1", 1e-5), sd, b + "attn.", heads, mask)
        h = F.gelu(lin(ln(x, sd, b + "ln_2", 1e-5), sd, b + "mlp.c_fc"))
        x = x + lin(h, sd, b + "mlp.c_proj")
    return x


def openclip_cosine(sd, cfg, pixels, ids):
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).mT
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = ln(x, sd, "visual.ln_pre", 1e-5)
    x = openclip_tower(x, sd, "visual.", v["layers"], v["width"] // v["head_width"])
    img = ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]
    y = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    n = ids.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    y = ln(openclip_tower(y, sd, "", t["layers"], t["heads"], causal), sd, "ln_final", 1e-5)
    txt = y[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]  # <eot>: largest id
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def bert_attention(x, kv, sd, pre, heads, mask):
    b, n, d = x.shape
    q, k, v = (lin(z, sd, f"{pre}.self.{p}") for z, p in ((x, "query"), (kv, "key"), (kv, "value")))
    q, k, v = (z.view(b, -1, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.mT / math.sqrt(d // heads) + mask).softmax(-1)
    out = lin((att @ v).transpose(1, 2).reshape(b, n, d), sd, f"{pre}.output.dense")
    return ln(out + x, sd, f"{pre}.output.LayerNorm", 1e-12)


def imagereward_raw(sd, cfg, pixels, ids, attn_mask):
    """BLIP's ViT (timm layout, fused qkv, LayerNorm 1e-6) and BLIP's med.py BERT with
    cross-attention, then the MLP on [CLS]: ImageReward.score before (x - mean) / std."""
    v, t = cfg["vision"], cfg["text"]
    pre = "blip.visual_encoder."
    x = (
        F.conv2d(
            pixels,
            sd[pre + "patch_embed.proj.weight"],
            sd[pre + "patch_embed.proj.bias"],
            stride=v["patch_size"],
        )
        .flatten(2)
        .mT
    )
    x = torch.cat([sd[pre + "cls_token"].expand(len(x), 1, -1), x], 1) + sd[pre + "pos_embed"]
    heads, d = v["num_attention_heads"], v["hidden_size"]
    for i in range(v["num_hidden_layers"]):
        b = f"{pre}blocks.{i}."
        h = ln(x, sd, b + "norm1", 1e-6)
        q, k, val = (
            lin(h, sd, b + "attn.qkv").view(len(x), -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(q, k, val).transpose(1, 2).reshape(x.shape)
        x = x + lin(a, sd, b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    img = ln(x, sd, pre + "norm", 1e-6)
    pre = "blip.text_encoder."
    pos = torch.arange(ids.shape[1])
    y = sd[pre + "embeddings.word_embeddings.weight"][ids]
    y = ln(
        y + sd[pre + "embeddings.position_embeddings.weight"][pos],
        sd,
        pre + "embeddings.LayerNorm",
        1e-12,
    )
    pad = (1.0 - attn_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(t["num_hidden_layers"]):
        b = f"{pre}encoder.layer.{i}."
        y = bert_attention(y, y, sd, b + "attention", t["num_attention_heads"], pad)
        y = bert_attention(y, img, sd, b + "crossattention", t["num_attention_heads"], 0.0)
        h = F.gelu(lin(y, sd, b + "intermediate.dense"))
        y = ln(lin(h, sd, b + "output.dense") + y, sd, b + "output.LayerNorm", 1e-12)
    h = y[:, 0]
    for j in (0, 2, 4, 6, 7):  # dropouts at 1, 3, 5; no activations
        h = lin(h, sd, f"mlp.layers.{j}")
    return h.squeeze(-1)


# -- scores ----------------------------------------------------------------------------------


def test_hpsv2_scores_the_open_clip_cosine_of_its_checkpoint(tiny):
    import json

    from flowpo.rewards.hpsv2 import bpe_tokenizer, bundled_bpe_path, tokenize

    fn = build_reward("hpsv2", **hps_opts(tiny))
    x = images()
    out = fn(x, PROMPTS, [{}] * 3)
    sd = torch.load(tiny / "hps" / "HPS_tiny.pt", weights_only=True)["state_dict"]
    cfg = json.loads((tiny / "hps" / "open_clip_config.json").read_text())
    ids = tokenize(bpe_tokenizer(bundled_bpe_path()), PROMPTS, 77)
    with torch.no_grad():
        ref = openclip_cosine(sd, cfg, clip_preprocess(x, 32), ids)
    torch.testing.assert_close(out.scores, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.details["cos"], ref, atol=1e-5, rtol=1e-4)
    assert out.scores.dtype == torch.float32 and out.scores.std() > 0
    # scale multiplies the cosine (100: the HPS benchmark tables' units)
    scaled = build_reward("hpsv2", scale=100.0, **hps_opts(tiny))(x, PROMPTS, [{}] * 3)
    torch.testing.assert_close(scaled.scores, 100 * out.scores, rtol=1e-5, atol=1e-4)


def test_hps_tokenizer_gives_open_clips_token_ids():
    """The bundled BPE through transformers' CLIPTokenizer and open_clip's cleaning give the ids
    of open_clip's own SimpleTokenizer (its tokenizer.py loaded alone: open_clip's package
    imports torchvision, which this machine cannot load)."""
    from flowpo.rewards.hpsv2 import bpe_tokenizer, bundled_bpe_path, tokenize

    path = bundled_bpe_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_alone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.SimpleTokenizer()
    prompts = [
        *PROMPTS,
        "A photo of an astronaut riding a horse, 8k, trending on ArtStation!!",
        "Café crème — naïve résumé's \"quotes\" and 'ticks' <|endoftext|>",
        " ".join(["word"] * 100),  # longer than 77 tokens: cut, <eot> kept last
        "日本の猫 🐱 & émojis",
    ]
    ours = tokenize(bpe_tokenizer(bundled_bpe_path()), prompts, 77)
    assert torch.equal(ours, reference(prompts, context_length=77))


def test_imagereward_scores_blip_with_the_published_normalisation(tiny):
    import json

    from transformers import BertTokenizer

    from flowpo.rewards.imagereward import MEAN, STD

    fn = build_reward("imagereward", **ir_opts(tiny))
    x = images(seed=1)
    out = fn(x, PROMPTS, [{}] * 3)
    sd = torch.load(tiny / "ir" / "ImageReward_tiny.pt", weights_only=True)
    cfg = json.loads((tiny / "ir" / "model_config.json").read_text())
    tok = BertTokenizer.from_pretrained(str(tiny / "ir" / "bert"))
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert (t["input_ids"][:, 0] == tok.cls_token_id).all()  # [CLS] first, as ImageReward
    with torch.no_grad():
        raw = imagereward_raw(sd, cfg, clip_preprocess(x, 32), t["input_ids"], t["attention_mask"])
    torch.testing.assert_close(out.details["raw"], raw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.scores, (raw - MEAN) / STD, atol=1e-5, rtol=1e-4)
    assert (MEAN, STD) == (0.16717362830052426, 1.0333394966054072)


def test_clip_preprocess_resizes_the_short_side_and_centre_crops():
    from PIL import Image

    x = images(1)  # 40 x 48 -> short side 32: 32 x 38, crop 3 px from the left
    arr = (x[0].permute(1, 2, 0) * 255).round().byte().numpy()
    ref = Image.fromarray(arr).resize((38, 32), Image.BICUBIC).crop((3, 0, 35, 32))
    ref = torch.tensor(list(ref.getdata()), dtype=torch.float32).view(32, 32, 3).permute(2, 0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    torch.testing.assert_close(clip_preprocess(x, 32)[0], (ref / 255 - mean) / std)


# -- service path ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_published_rewards_score_the_same_through_the_service(tiny, name):
    from flowpo.rewards.client import RemoteReward
    from flowpo.rewards.server import ThreadedServer, create_app

    fn = build_reward(name, **(hps_opts if name == "hpsv2" else ir_opts)(tiny))
    x = images(4, seed=2)
    prompts = [*PROMPTS, "a blue bird"]
    with ThreadedServer(create_app([fn], name=name)) as srv:
        client = RemoteReward(srv.url, name=name, batch_size=2, timeout_s=30)
        assert client.health()["reward"] == name
        remote = client(x, prompts, [{}] * 4)
    # PNG is lossless: the service scores the same uint8 pixels
    torch.testing.assert_close(remote.scores, fn(x, prompts, [{}] * 4).scores)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_missing_checkpoint_names_the_option_and_the_fix(tiny, tmp_path, name):
    opts = (hps_opts if name == "hpsv2" else ir_opts)(tiny)
    opts["checkpoint"] = str(tmp_path / "absent.pt")
    with pytest.raises(
        ValueError,
        match=rf"reward\.options\.{name}\.checkpoint: no checkpoint "
        r"file at .*absent\.pt.*set reward\.options\." + name,
    ):
        build_reward(name, **opts)


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_a_pickle_that_needs_code_is_refused_not_run(tiny, tmp_path, name):
    opts = (hps_opts if name == "hpsv2" else ir_opts)(tiny)
    state = torch.load(opts["checkpoint"], weights_only=True)
    # what an unrestricted torch.save of a training script's objects looks like
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "code.pt")
    opts["checkpoint"] = str(tmp_path / "code.pt")
    with pytest.raises(
        ValueError,
        match=rf"reward\.options\.{name}\.checkpoint: .*code\.pt' is a "
        r"pickle that needs code to load.*weights_only",
    ):
        build_reward(name, **opts)


def test_imagereward_tokenizer_of_another_size_is_refused(tiny, tmp_path):
    from transformers import BertTokenizer

    BertTokenizer(
        vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "a": 5}
    ).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match=r"imagereward\.tokenizer_dir: .* 8 tokens"):
        build_reward("imagereward", **{**ir_opts(tiny), "tokenizer_dir": str(tmp_path / "bert")})


def test_egrpo_recipe_names_an_existing_reward_with_valid_options():
    from flowpo.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(str(ROOT / "configs" / "flux_egrpo_hps.yaml"))
    check_reward_options(cfg.reward.weights, cfg.reward.options)
    assert cfg.reward.options["hpsv2"]["checkpoint"].endswith("HPS_v2.1_compressed.pt")
